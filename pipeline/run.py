"""`cast run`: the whole pipeline on the embedded defaults, resumable stage by stage.

    RUN/lora/<task>/            source LoRA per task             (skipped when present)
    RUN/source.zarr, target.zarr activation stores               (committed units skipped)
    RUN/align, RUN/layermap     alignment and layer map          (skipped when present)
    RUN/heads                   projection heads                 (unchanged heads skipped)
    RUN/distilled/<task>/       the proxy distilled into a target LoRA, zero task data (skipped when present)
    RUN/validate/<task>/        per-task report                  (skipped when present)
                                (each task's distillation then validation; --task-workers: side by side)
    RUN/report.md               all tasks in one table
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import MISSING, dataclass, field, fields

from heads.headset import write_summary
from heads.run import TrainHeadsConfig, run_train_heads
from pipeline.align.layermap import LayermapConfig, run_layermap
from pipeline.align.pairs import AlignConfig, run_align
from pipeline.assemble.report import format_report, format_summary
from pipeline.assemble.student import StudentConfig, run_distill
from pipeline.assemble.transfer import needed_heads
from pipeline.assemble.validate import ValidateConfig, run_validate
from pipeline.cache.corpus import BUILTIN, fetch_builtin
from pipeline.cache.extract import ExtractConfig, run_extract
from pipeline.cache.hooks import lora_sites
from pipeline.cache.models import DEFAULT_SOURCE, DEFAULT_TARGET, REGISTRY, fetch_model
from pipeline.lora.adapters import parse_targets
from pipeline.lora.train import LoraTrainConfig, train_lora
from runtime.work import run_items
from storage.check import verify
from storage.fs import as_path


def sets(*targets: tuple[type, str], default=MISSING):
    """A `cast run` flag that sets these fields of the stage configs. Its default (unless
    the run gives its own) and its --help (unless a docstring follows it) are the first
    target's: each is stated once, in the stage that uses it."""
    cls, name = targets[0]
    stage_default = next(f.default for f in fields(cls) if f.name == name)
    return field(default=stage_default if default is MISSING else default, metadata={"sets": targets})


@dataclass
class RunConfig:
    """The whole pipeline; defaults are the embedded real pair, corpus and tasks."""

    out: str = "runs/default"
    """Run directory or object-store URL (s3://bucket/runs/x): every stage's output goes
    under it; re-running resumes."""
    source: str = DEFAULT_SOURCE
    """Source model (the LoRA's base)."""
    target: str = DEFAULT_TARGET
    """Target model (receives the transferred LoRA)."""
    tasks: str = "add2,codebook,reverse,capital"
    """Built-in tasks: a source LoRA is trained on each, transferred and validated (skill tasks add2, codebook,
    reverse, sentiment; form tasks capital, plural)."""
    corpus: str = sets((ExtractConfig, "corpus"), (ValidateConfig, "corpus"), (StudentConfig, "corpus"))
    max_tokens: int = sets((ExtractConfig, "max_tokens"))
    targets: str = sets((LoraTrainConfig, "targets"))
    """Modules the LoRAs adapt (sites extracted and heads trained follow from these)."""
    rank: int = sets((LoraTrainConfig, "rank"))
    lora_steps: int = sets((LoraTrainConfig, "steps"))
    """LoRA training steps (the retrained target reference uses the same recipe)."""
    head_epochs: int = sets((TrainHeadsConfig, "epochs"), default=8)
    head_hidden: int = sets((TrainHeadsConfig, "hidden"), default=256)
    limit: int = sets((ValidateConfig, "limit"), default=100)
    """Test examples per system and task (9 systems are scored for each task, 8 of them decoded)."""
    carry: str = sets((ValidateConfig, "carry"))
    distill_steps: int = sets((StudentConfig, "steps"))
    """Steps of `cast distill` per task (0: no distilled LoRA, no such row in the reports)."""
    workers: int = sets((ExtractConfig, "workers"))
    """Ray extraction actors per model (0: in-process); head training uses 2 tasks."""
    address: str | None = sets((ExtractConfig, "address"), (TrainHeadsConfig, "address"))
    cpus_per_worker: int = sets((ExtractConfig, "cpus_per_worker"))
    gpus_per_worker: float = sets((ExtractConfig, "gpus_per_worker"))
    cpus_per_head: int = sets((TrainHeadsConfig, "cpus_per_head"))
    task_workers: int = 0
    """Tasks distilled and validated side by side, each on its own Ray worker with
    --cpus-per-task CPUs and as many torch threads; 0: one task after another in this
    process, with torch's own threads, so its numbers are those of `cast distill` and
    `cast validate` run alone. On a cluster (--address) each task can take a node; on one
    2-core machine two one-thread tasks side by side saved about 7 percent of the time one
    after the other takes, and one thread rounds differently from two (docs/results.md)."""
    cpus_per_task: int = 1
    """CPUs (and torch threads) each task's worker takes."""

    def __post_init__(self):
        for name, low in (("task_workers", 0), ("cpus_per_task", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")

    def stage(self, cls: type, **given):
        """The `cls` config of this run: the flags above that set its fields, then `given`."""
        values = {name: getattr(self, f.name) for f in fields(self)
                  for target, name in f.metadata.get("sets", ()) if target is cls}
        return cls(**{**values, **given})


def _stage(name: str):
    print(f"\n[cast run] === {name} ===", file=sys.stderr)
    return time.perf_counter()


class TaskStages:
    """One task's distillation (zero task data, salience read from the source store) and
    validation, as a worker for run_items: returns the report and the seconds of each."""

    def __init__(self, cfg: RunConfig, source_store: str, heads: str, progress: bool):
        self.cfg, self.store, self.heads, self.progress = cfg, source_store, heads, progress

    def run(self, task: str) -> dict:
        cfg, out, timings = self.cfg, as_path(self.cfg.out), {}
        distilled = out / "distilled" / task
        if cfg.distill_steps and not (distilled / "cast_distill.json").exists():
            t0 = time.perf_counter()
            run_distill(cfg.stage(StudentConfig, adapter=str(out / "lora" / task), out=str(distilled),
                                  target=cfg.target, store=self.store, force=True), progress=self.progress)
            timings[f"distill {task}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = run_validate(cfg.stage(ValidateConfig, adapter=str(out / "lora" / task), heads=self.heads,
                                        out=str(out / "validate" / task),
                                        distilled=str(distilled) if cfg.distill_steps else None),
                              progress=self.progress)
        timings[f"validate {task}"] = time.perf_counter() - t0
        return {"report": report, "timings": timings}

    def flush(self) -> None:
        pass  # each task's outputs are committed before run() returns


def run_pipeline(cfg: RunConfig, progress: bool = True) -> dict:
    out = as_path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    targets = parse_targets(cfg.targets)
    # Seconds per stage that ran, in order, written to run.json: where a run's time went.
    timings, t_all = {}, time.perf_counter()

    # Fetched first and timed apart, so that from an empty cache the downloads are not
    # counted as LoRA training or extraction (a no-op when cached).
    fetch = [m for m in dict.fromkeys((cfg.source, cfg.target)) if m in REGISTRY]
    if fetch or cfg.corpus in BUILTIN:
        t0 = _stage(f"fetch {', '.join([*fetch, *([cfg.corpus] if cfg.corpus in BUILTIN else [])])}")
        for model in fetch:
            fetch_model(model)
        if cfg.corpus in BUILTIN:
            fetch_builtin(cfg.corpus)
        timings["fetch"] = time.perf_counter() - t0

    for task in tasks:
        adapter = out / "lora" / task
        if not (adapter / "adapter_model.safetensors").exists():
            t0 = _stage(f"LoRA on {cfg.source}: {task}")
            train_lora(cfg.stage(LoraTrainConfig, model=cfg.source, out=str(adapter), task=task,
                                 targets=",".join(targets), force=True), progress=progress)
            timings[f"lora {task}"] = time.perf_counter() - t0

    sites = ",".join(dict.fromkeys(["resid", *lora_sites(targets)]))
    stores, extraction = {}, {}
    for role, model in (("source", cfg.source), ("target", cfg.target)):
        t0 = _stage(f"extract {role} {model} ({sites})")
        stores[role] = out / f"{role}.zarr"
        extraction[role] = run_extract(cfg.stage(ExtractConfig, model=model, out=str(stores[role]), sites=sites),
                                       progress=progress)
        timings[f"extract {role}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = verify(stores[role])
        if not report.ok:
            raise RuntimeError("\n".join(report.lines()))
        timings[f"verify {role}"] = time.perf_counter() - t0

    align, lmap, heads = out / "align", out / "layermap", out / "heads"
    if not (align / "align.json").exists():
        t0 = _stage("align")
        run_align(AlignConfig(src_store=str(stores["source"]), tgt_store=str(stores["target"]), out=str(align)))
        timings["align"] = time.perf_counter() - t0
    if not (lmap / "layermap.json").exists():
        t0 = _stage("layermap")
        run_layermap(LayermapConfig(src_store=str(stores["source"]), tgt_store=str(stores["target"]),
                                    align=str(align), out=str(lmap)))
        timings["layermap"] = time.perf_counter() - t0
    t0 = _stage("train heads")
    # Only the heads validate's bridges read (a third of the full cross product is never used).
    kinds = TrainHeadsConfig.kinds.split(",")
    only = ",".join(f"{k}:{d}:{s}" for k in kinds for d, s in needed_heads(targets, k))
    index = run_train_heads(cfg.stage(TrainHeadsConfig, src_store=str(stores["source"]),
                                      tgt_store=str(stores["target"]), align=str(align), layermap=str(lmap),
                                      out=str(heads), sites=",".join(lora_sites(targets)), workers=2, only=only),
                            progress=progress)
    write_summary(index, heads)
    timings["train heads"] = time.perf_counter() - t0

    # Each task's distillation and validation read only committed artifacts and write
    # under their own directories: independent work, one task after another here or side
    # by side on Ray workers (--task-workers).
    todo = [t for t in tasks if not (out / "validate" / t / "report.json").exists()]
    if todo:
        _stage(f"distill and validate {', '.join(todo)}"
               + (f" ({min(cfg.task_workers, len(todo))} side by side)" if cfg.task_workers else ""))
    t0, done, per_task = time.perf_counter(), {}, {}

    def finished(task, res) -> None:
        done[task], per_task[task] = res["report"], res["timings"]
        print(f"[cast run] {task}: " + ", ".join(f"{k} {v:.0f} s" for k, v in res["timings"].items()),
              file=sys.stderr)

    run_items(todo, TaskStages, (cfg, str(stores["source"]), str(heads), progress and not cfg.task_workers),
              workers=cfg.task_workers, address=cfg.address, cpus_per_worker=cfg.cpus_per_task,
              label=lambda task: f"task {task}", on_result=finished, flags=("--cpus-per-task", ""))
    if todo:
        timings["distill and validate"] = time.perf_counter() - t0
    reports = [done.get(t) or json.loads((out / "validate" / t / "report.json").read_text()) for t in tasks]
    summary = "\n".join(format_report(r) for r in reports)
    (out / "report.md").write_text(f"# CAST run: {cfg.source} -> {cfg.target}\n\n## All tasks\n\n"
                                   f"{format_summary(reports)}\n{summary}")
    seconds = time.perf_counter() - t_all
    result = {"out": str(out), "seconds": seconds, "timings": timings,
              "unaccounted_seconds": seconds - sum(timings.values()),  # summaries, skipped stages' checks
              # inside "distill and validate", per task (side by side: they overlap)
              "tasks": per_task, "task_workers": cfg.task_workers,
              "extraction": extraction,  # per store: tokens extracted, seconds, tokens/s
              "reports": [str(out / "validate" / t / "report.json") for t in tasks]}
    (out / "run.json").write_text(json.dumps(result, indent=2))
    print(summary)
    return result
