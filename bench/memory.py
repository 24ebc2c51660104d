"""(d) of `cast bench`: peak memory of an extraction. `peak_rss` runs each measurement in
a fresh process (this module as a script), so one measurement's heap does not inflate
the next:

    python -m bench.memory '{"model": ..., "tokens": 1024, "out": ..., ...}'

Runs what `cast extract --workers 0` runs (plan, store, one Extractor, every unit,
flush) and reports, in MiB:
  load_peak_mb      peak RSS up to the loaded model (the loader's transient peak)
  after_load_mb     RSS once the model is loaded
  extract_peak_mb   peak RSS while extracting: the kernel's high-water mark is reset
                    after the load (/proc/self/clear_refs), so this is the working set
                    extraction adds, which must not grow with the corpus
  peak_rss_mb       peak RSS of the whole process (ru_maxrss)
"tokens": null loads the model only. Prints one JSON line.
"""
from __future__ import annotations

import json
import os
import resource
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
    res = subprocess.run([sys.executable, "-m", "bench.memory", json.dumps(job)], capture_output=True,
                         text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"memory child for {tokens} tokens failed:\n{res.stderr[-2000:]}")
    shutil.rmtree(job["out"], ignore_errors=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(job: dict) -> dict:
    import torch

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    from pipeline.cache.extract import ExtractConfig, Extractor, open_or_create, prepare

    if job["tokens"] is None:
        from pipeline.cache.models import load_model

        load_model(job["model"])
        return {"peak_rss_mb": _maxrss_mb(), "load_peak_mb": _maxrss_mb(), "after_load_mb": _status_mb("VmRSS"),
                "extract_peak_mb": None, "tokens": 0, "units": 0}
    cfg = ExtractConfig(model=job["model"], out=job["out"], corpus=job["corpus"], sites=job["sites"],
                        layers=job["layers"], dtype=job["dtype"], max_tokens=job["tokens"],
                        max_chars=job["max_chars"], unit_tokens=job["unit_tokens"],
                        batch_tokens=job["batch_tokens"], workers=0)
    _, plan, meta = prepare(cfg)
    open_or_create(cfg, meta)
    worker = Extractor(cfg.model, cfg.out, meta["layers"], meta["sites"], cfg.dtype, cfg.batch_tokens)
    load_peak, after_load = _maxrss_mb(), _status_mb("VmRSS")
    reset = _reset_peak()
    for unit in plan.units:
        worker.run(unit)
    worker.flush()
    return {"peak_rss_mb": _maxrss_mb(), "load_peak_mb": load_peak, "after_load_mb": after_load,
            "extract_peak_mb": _status_mb("VmHWM") if reset else None,
            "tokens": sum(u.n_tokens for u in plan.units), "units": len(plan.units)}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
