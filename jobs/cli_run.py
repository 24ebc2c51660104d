"""`cast run`: every stage on the embedded defaults."""
from __future__ import annotations

import json

from jobs.args import Command, to_dataclass


def cmd_run(ns) -> int:
    """Train a source LoRA per task, extract both models (smollm2-135m source, gemma3-270m
    target) over the built-in corpus, align, map layers, train heads, transfer and validate,
    ending in RUN/report.md. Resumable: re-running skips finished work."""
    from pipeline.run import RunConfig, run_pipeline

    res = run_pipeline(to_dataclass(RunConfig, ns), progress=not ns.quiet)
    print(json.dumps({k: res[k] for k in ("out", "seconds", "timings")}, indent=2))
    return 0


RUN = Command("the whole pipeline on the embedded defaults", cmd_run, config="pipeline.run:RunConfig",
              quiet="no progress bars")
