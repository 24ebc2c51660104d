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


def time_interleaved(methods: dict, reps: int, cpu: dict | None = None, settle=os.sync) -> dict[str, list[float]]:
    """Run every method once per repetition, in a rotating order (A,B,C / B,C,A / ...).
    Returns wall seconds per method; `cpu` (if given) receives the process CPU seconds.

    `settle` runs, untimed, before every method: by default os.sync(), so that no method
    is timed while the disk still flushes what the one before it wrote. Without it the
    unit writer, run after an extraction that had just written 1.7 GB, took 5.26 s and
    3.11 s, and 2.17 s after the plain write (whose 1.7 GB had been fsync'd)."""
    names = list(methods)
    times = {n: [] for n in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            settle()
            c0 = time.process_time()
            dt = methods[name](rep)
            dc = time.process_time() - c0
            times[name].append(dt)
            if cpu is not None:
                cpu.setdefault(name, []).append(dc)
            log(f"rep {rep + 1}/{reps} {name}: {dt:.2f}s (cpu {dc:.2f}s, load {os.getloadavg()[0]:.1f})")
    return times

