"""`cast bench`: extraction vs a bare forward pass (both models of the pair) and a naive dump, the
unit writer vs a plain write of the same bytes, head training from
the store vs recomputing activations, peak memory and bytes per token (the bars in
docs/design.md#performance-bars)."""
from __future__ import annotations

import sys

import bench
from jobs.args import Command, to_dataclass


def cmd_bench(ns) -> int:
    from bench.config import BenchConfig
    from bench.run import run_bench

    res = run_bench(to_dataclass(BenchConfig, ns))
    print(res["table"])
    print(f"\n[bench] JSON: {res['json']}", file=sys.stderr)
    return 0


BENCH = Command("benchmark extraction, the store and head training against naive alternatives", cmd_bench,
                description=bench.__doc__, preformatted=True, config="bench.config:BenchConfig")
