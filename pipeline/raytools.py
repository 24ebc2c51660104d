"""Starting or joining a Ray cluster the same way for every stage."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager


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
        # Ray nices its workers to 15 by default; here the workers *are* the job, and a
        # niced extraction actor loses the CPU to anything else on the machine.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            num_cpus=num_cpus or os.cpu_count(),
            log_to_driver=True,
            configure_logging=False,
        )
        print("[cast] started a local Ray on 127.0.0.1", file=sys.stderr)
    try:
        yield ray
    finally:
        ray.shutdown()
