"""`cast bench`: extraction vs a bare forward pass and a naive dump, head training from
the store vs recomputing activations, peak memory and bytes per token (the bars in
docs/design.md#performance-bars)."""
from __future__ import annotations

import sys

import bench
from jobs.args import Command, add_dataclass_args, to_dataclass


def cmd_bench(ns) -> int:
    from bench.run import BenchConfig, run_bench

    res = run_bench(to_dataclass(BenchConfig, ns))
    print(res["table"])
    print(f"\n[bench] JSON: {res['json']}", file=sys.stderr)
    return 0


def _bench_args(p) -> None:
    from bench.run import BenchConfig

    add_dataclass_args(p, BenchConfig)


BENCH = Command(
    help="benchmark extraction, the store and head training against naive alternatives",
    description=bench.__doc__, add_args=_bench_args, run=cmd_bench, preformatted=True)
