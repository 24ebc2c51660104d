"""`cast bench`: extraction vs a bare forward pass and a naive dump, head training from
the store vs recomputing activations, peak memory and bytes per token (DESIGN §9)."""
from __future__ import annotations

import sys
from pathlib import Path

from jobs.args import add_dataclass_args, to_dataclass


def _bench_run():
    try:
        import bench.run as run
    except ModuleNotFoundError:  # an installed `cast` run outside the checkout: bench/ sits beside jobs/
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import bench.run as run
    return run


def cmd_bench(ns) -> int:
    run = _bench_run()
    res = run.run_bench(to_dataclass(run.BenchConfig, ns))
    print(res["table"])
    print(f"\n[bench] JSON: {res['json']}", file=sys.stderr)
    return 0


def register(sub) -> None:
    run = _bench_run()
    s = sub.add_parser(
        "bench", help="benchmark extraction, the store and head training against naive alternatives",
        description=run.__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    add_dataclass_args(s, run.BenchConfig)
    s.set_defaults(func=cmd_bench)
