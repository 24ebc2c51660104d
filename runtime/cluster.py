"""Starting or joining a Ray cluster the same way for every stage."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

LOOPBACK = "127.0.0.1"


def pin_to_loopback() -> None:
    """Keep a local Ray on 127.0.0.1. Ray replaces a loopback --node-ip-address with the
    machine's outward address unless it believes clustering is off, so turn that off for
    this process (already imported constants included) and for the processes Ray spawns."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # Ray nices its workers to 15 by default; here the workers *are* the job, and a
    # niced extraction actor loses the CPU to anything else on the machine.
    os.environ.setdefault("RAY_worker_niceness", "0")
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def start_local_ray(num_cpus: int | None = None, log_to_driver: bool = True):
    import ray

    pin_to_loopback()
    ray.init(_node_ip_address=LOOPBACK, include_dashboard=False, num_cpus=num_cpus or os.cpu_count(),
             log_to_driver=log_to_driver, configure_logging=False)
    return ray


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None):
    """Join `address`, or start a private local Ray bound to 127.0.0.1 (never another
    interface) and shut it down afterwards. An already-initialised Ray is reused."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        start_local_ray(num_cpus)
        print(f"[cast] started a local Ray on {LOOPBACK}", file=sys.stderr)
    try:
        yield ray
    finally:
        ray.shutdown()


def node_resources(ray) -> list[dict]:
    """Resources of each alive node: {"node": id, "ip": ..., "CPU": n, "GPU": n, ...}."""
    return [{"node": n["NodeID"], "ip": n.get("NodeManagerAddress", "?"), **n.get("Resources", {})}
            for n in ray.nodes() if n.get("Alive")]


AUTOSCALING_ENV = "CAST_AUTOSCALING"


def autoscaling() -> bool:
    """Whether the cluster says it may add nodes (CAST_AUTOSCALING=1 in its environment, as
    infra/ sets it): then a worker no current node fits waits for one. Ray offers no way to
    ask: every head runs an autoscaler monitor, a fixed cluster's included."""
    return os.environ.get(AUTOSCALING_ENV, "") not in ("", "0")


def worker_cpus(nodes: list[dict], workers: int, gpus: float) -> int:
    """Default CPUs per worker: an equal share of the cluster's CPUs, but never more than
    the largest node that has the GPUs asked for (a share of two nodes fits on neither)."""
    total = sum(n.get("CPU", 0) for n in nodes)
    fitting = [n.get("CPU", 0) for n in nodes if n.get("GPU", 0) >= gpus] or [0]
    return max(1, min(int(total) // max(1, workers), int(max(fitting))))


def check_fits(nodes: list[dict], cpus: float, gpus: float, flags: tuple[str, str]) -> None:
    """Refuse, naming the flags, a worker that asks for more than any one node has: Ray
    would otherwise wait for it forever. With an autoscaler, a larger node may come."""
    if any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
        return
    have = ", ".join(f"{n['ip']} {n.get('CPU', 0):g} CPU {n.get('GPU', 0):g} GPU" for n in nodes) or "no nodes"
    asked = f"{flags[0]} {cpus:g}" + (f" {flags[1]} {gpus:g}" if flags[1] and gpus else "")
    if autoscaling():
        print(f"[cast] {asked}: no node has that much now ({have}); waiting for the autoscaler "
              f"({AUTOSCALING_ENV} is set)", file=sys.stderr)
        return
    raise ValueError(f"{asked}: each worker would need {cpus:g} CPU(s) and {gpus:g} GPU(s) on one node, but no "
                     f"node of the cluster has that much ({have}); ask for less or add a bigger node (on an "
                     f"autoscaling cluster that can add one, set {AUTOSCALING_ENV}=1 on its nodes to wait for it)")
