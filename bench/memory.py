"""(d) of `cast bench`: peak memory of an extraction, each in a fresh process
(bench/memchild.py), so one measurement's heap does not inflate the next."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.config import BenchConfig


def peak_rss(cfg: BenchConfig, work: Path, tokens: int | None) -> dict:
    """Peak RSS of a fresh `cast extract --workers 0` process (tokens None: load the model only)."""
    job = {"model": cfg.model, "corpus": cfg.corpus, "sites": cfg.sites, "layers": cfg.layers, "dtype": cfg.dtype,
           "max_chars": cfg.max_chars, "unit_tokens": cfg.mem_unit_tokens, "batch_tokens": cfg.batch_tokens,
           "tokens": tokens, "out": str(work / f"mem-{tokens}.zarr"), "threads": cfg.threads}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "bench.memchild", json.dumps(job)], capture_output=True,
                         text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"memory child for {tokens} tokens failed:\n{res.stderr[-2000:]}")
    shutil.rmtree(job["out"], ignore_errors=True)
    return json.loads(res.stdout.strip().splitlines()[-1])
