"""Timing methods side by side, and the small helpers every measurement shares."""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

from pipeline.cache.extract import pad_batch


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def dir_bytes(path: Path, pattern: str = "**/*") -> int:
    return sum(f.stat().st_size for f in Path(path).glob(pattern) if f.is_file())


def padded(unit, batch: list[int], pad: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The padded (ids, mask) Extractor.run builds for one batch, and its rows' lengths."""
    ids, mask = pad_batch(unit.input_ids, batch, pad)
    return ids, mask, [len(unit.input_ids[i]) for i in batch]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def time_interleaved(methods: dict, reps: int, cpu: dict | None = None) -> dict[str, list[float]]:
    """Run every method once per repetition, in a rotating order (A,B,C / B,C,A / ...).
    Returns wall seconds per method; `cpu` (if given) receives the process CPU seconds."""
    names = list(methods)
    times = {n: [] for n in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            c0 = time.process_time()
            dt = methods[name](rep)
            dc = time.process_time() - c0
            times[name].append(dt)
            if cpu is not None:
                cpu.setdefault(name, []).append(dc)
            log(f"rep {rep + 1}/{reps} {name}: {dt:.2f}s (cpu {dc:.2f}s, load {os.getloadavg()[0]:.1f})")
    return times

