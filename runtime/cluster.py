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
