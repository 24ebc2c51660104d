"""Running a stage's items in this process or as Ray work, with retries.

A stage hands over its items (extraction units, heads to fit) and a worker class:

    class Worker:
        def __init__(self, *args): ...     # the costly part, once per worker (load a model)
        def run(self, item): ...           # one item; returns what on_result receives
        def flush(self): ...               # finish what run() handed off (a write in flight)

With workers=0 one Worker runs here. Otherwise `workers` Ray actors each hold one, and
every actor is handed the next item as soon as it is free. A failed item goes to the
back of the queue and is retried up to `retries` times; past that the run fails. An
actor that died (a killed worker process) is replaced. Items must be idempotent:
a retried item redoes its whole commit (see docs/design.md#commit-protocol).
"""
from __future__ import annotations

import sys
from typing import Callable, Iterable


class Hosted:
    """A Worker inside a Ray actor, with torch limited to the CPUs Ray reserved for it."""

    def __init__(self, threads: int, worker_cls: type, args: tuple):
        import torch

        torch.set_num_threads(threads)
        self.worker = worker_cls(*args)

    def where(self) -> str:
        """Node id, address and pid of this actor, for the log."""
        import os

        import ray

        ctx = ray.get_runtime_context()
        return f"node {ctx.get_node_id()} ({ray.util.get_node_ip_address()}) pid {os.getpid()}"

    def run(self, item):
        return self.worker.run(item)

    def flush(self) -> None:
        self.worker.flush()

    def call(self, method: str, *args):
        """Any other method of the worker (benchmarks retarget an extractor's store)."""
        return getattr(self.worker, method)(*args)


def remote_workers(ray, worker_cls: type, args: tuple, n: int, cpus_per_worker: int,
                   gpus_per_worker: float = 0.0) -> list:
    """n Ray actors, each hosting one worker_cls(*args), spread over the nodes that fit
    them (each reads and writes its own units: spreading spreads the I/O and memory too)."""
    actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, scheduling_strategy="SPREAD")(Hosted)
    return [actor.remote(cpus_per_worker, worker_cls, args) for _ in range(n)]


def _announce(ray, actors: list, first: int = 0) -> None:
    """Say where each actor runs (waits until each is up: its model is loaded)."""
    for i, where in enumerate(ray.get([a.where.remote() for a in actors]), start=first):
        print(f"[cast] worker {i} on {where}", file=sys.stderr, flush=True)


class WorkerLost(RuntimeError):
    """A Ray worker died (its process killed, its node gone) and no retry was left."""


class _Attempts:
    """Counts failures per item; says so on stderr, and ends the run past `retries`."""

    def __init__(self, retries: int, label: Callable):
        self.retries, self.label, self.counts = retries, label, {}

    def failed(self, item, err: BaseException, lost: bool = False) -> None:
        name = self.label(item)
        cause = getattr(err, "cause", None) or err  # a Ray task error carries the worker's exception
        if getattr(cause, "no_retry", False):  # bad input (a damaged store): one line, no retries
            raise cause from None
        n = self.counts[name] = self.counts.get(name, 0) + 1
        if n > self.retries:
            if lost:  # not the item's fault: say what happened and how to go on, not a traceback
                raise WorkerLost(f"{name}: its Ray worker died ({str(err).splitlines()[0][:200]}); every item "
                                 f"committed so far is kept, run the same command again to resume") from err
            if self.retries == 0:
                raise cause from None  # nothing was retried: the caller sees the error itself
            raise RuntimeError(f"{name} failed {n} times; last error: {err}") from err
        print(f"[cast] {name} failed ({type(err).__name__}: {err}); retry {n}/{self.retries}", file=sys.stderr)


def run_items(items: Iterable, worker_cls: type, args: tuple = (), *, workers: int, address: str | None = None,
              cpus_per_worker: int | None = None, gpus_per_worker: float = 0.0, retries: int = 0,
              label: Callable = str, on_result: Callable | None = None,
              flags: tuple[str, str] = ("--cpus-per-worker", "--gpus-per-worker")) -> None:
    """Run every item through worker_cls(*args).run, here (workers=0) or on Ray actors.

    cpus_per_worker: CPUs each actor reserves (and torch threads it uses); default an
    equal share of the cluster's CPUs, at most one node's. A worker larger than every node
    is refused, naming `flags` (the stage's resource flags). on_result(item, result) is
    called here, in the order items finish.
    """
    queue = list(items)
    if not queue:
        return
    attempts = _Attempts(retries, label)
    done = on_result or (lambda item, result: None)
    if workers == 0:
        worker = worker_cls(*args)
        while queue:
            item = queue.pop(0)
            try:
                result = worker.run(item)
            except Exception as err:  # noqa: BLE001 - counted, retried, re-raised past `retries`
                attempts.failed(item, err)
                queue.append(item)
                continue
            done(item, result)
        worker.flush()
        return
    _run_on_ray(queue, worker_cls, args, workers, address, (cpus_per_worker, gpus_per_worker, flags), attempts, done)


def _run_on_ray(queue, worker_cls, args, workers, address, resources, attempts, done):
    from runtime.cluster import check_fits, node_resources, ray_session, worker_cpus

    cpus_per_worker, gpus_per_worker, flags = resources
    with ray_session(address) as ray:
        from ray.exceptions import RayActorError

        nodes = node_resources(ray)
        cpus = cpus_per_worker or worker_cpus(nodes, workers, gpus_per_worker)
        check_fits(nodes, cpus, gpus_per_worker, flags)
        actors = remote_workers(ray, worker_cls, args, min(workers, len(queue)), cpus, gpus_per_worker)
        _announce(ray, actors)
        idle, pending = list(actors), {}
        while queue or pending:
            while queue and idle:
                actor, item = idle.pop(0), queue.pop(0)
                pending[actor.run.remote(item)] = (actor, item)
            ready, _ = ray.wait(list(pending), num_returns=1)
            actor, item = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except Exception as err:  # noqa: BLE001 - task errors and dead workers alike
                attempts.failed(item, err, lost=isinstance(err, RayActorError))
                queue.append(item)
                if isinstance(err, RayActorError):  # its process is gone: start another
                    fresh = remote_workers(ray, worker_cls, args, 1, cpus, gpus_per_worker)[0]
                    _announce(ray, [fresh], first=actors.index(actor))
                    actors[actors.index(actor)] = actor = fresh
            else:
                done(item, result)
            idle.append(actor)
        try:
            ray.get([a.flush.remote() for a in actors])
        except RayActorError as err:  # its last items may be reported done but not committed
            first = str(err).splitlines()[0][:200]
            raise WorkerLost(f"a Ray worker died before its last items were committed ({first}); every item "
                             f"committed so far is kept, run the same command again to resume") from err
