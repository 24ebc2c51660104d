"""`cast validate`: does the behaviour carry over? One report per task comparing

    target base | target + LoRA retrained on target (same recipe) | target + CAST (mlp heads)
    target + CAST (ridge heads) | target + CAST exported (the ridge bridge as a plain PEFT LoRA)
    target + weight-space transfer | source base | source + LoRA

with recovery = (CAST - base) / (retrained - base) and ratio = CAST / retrained, each with
a paired bootstrap interval over the test examples. JSON, Markdown and a bar chart.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from heads.headset import load_heads
from pipeline.assemble.bridge import BridgeError, read_lora
from storage.fs import as_path, writing


@dataclass
class ValidateConfig:
    """What `cast validate` does; every field is a flag of the same name."""

    adapter: str
    """Source LoRA adapter (from `cast lora train`: its recipe is reused for the retrained baseline)."""
    heads: str
    """Head set from `cast train-heads` (must contain mlp and ridge heads for the adapter's modules)."""
    out: str
    """Report directory; artifacts made along the way (retrained LoRA, bridges) are kept there and reused."""
    task: str | None = None
    """Built-in task name; default: the task the adapter was trained on."""
    task_file: str | None = None
    """Test split as JSONL {"prompt", "answer"} (instead of --task)."""
    task_seed: int = 0
    """Seed of the built-in task's split (must match training to keep test prompts unseen)."""
    limit: int = 200
    """Test examples evaluated per system."""
    batch_size: int = 16
    """Generation batch size."""
    carry: str = "all"
    """Source LoRA layers carried: 'all' or 'mapped' (see `cast transfer --help`)."""
    retrained: str | None = None
    """An existing target LoRA to use as the retrained reference (default: train one with the same recipe)."""
    n_boot: int = 2000
    """Bootstrap resamples for the intervals."""
    device: str | None = None
    """torch device; default CUDA when present, else CPU."""


def paired_ratio_ci(x, base, ref, n_boot: int, seed: int = 0):
    """Recovery and ratio with percentile intervals, resampling examples jointly."""
    x, base, ref = (np.asarray(v, dtype=np.float64) for v in (x, base, ref))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    mx, mb, mr = x[idx].mean(1), base[idx].mean(1), ref[idx].mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rec = np.where(mr - mb > 0, (mx - mb) / (mr - mb), np.nan)
        rat = np.where(mr > 0, mx / mr, np.nan)

    def summary(point, samples):
        ok = samples[np.isfinite(samples)]
        lo, hi = (np.quantile(ok, [0.025, 0.975]) if len(ok) > n_boot // 2 else (np.nan, np.nan))
        return {"value": point, "ci_low": float(lo), "ci_high": float(hi)}

    dx, db, dr = x.mean(), base.mean(), ref.mean()
    return (summary(float((dx - db) / (dr - db)) if dr > db else float("nan"), rec),
            summary(float(dx / dr) if dr > 0 else float("nan"), rat))


def _ensure_retrained(cfg: ValidateConfig, meta: dict, target_name: str, task, out: Path) -> str:
    from pipeline.lora.train import LoraTrainConfig, train_lora

    if cfg.retrained:
        return cfg.retrained
    path = out / "retrained-target-lora"
    if (path / "adapter_model.safetensors").exists():
        return str(path)
    r = meta["recipe"]
    print(f"[cast] training the reference LoRA on {target_name} with the source recipe {r}", file=sys.stderr)
    train_lora(LoraTrainConfig(model=target_name, out=str(path), targets=",".join(r["targets"]), rank=r["rank"],
                               alpha=r["alpha"], dropout=r["dropout"], steps=r["steps"], batch_size=r["batch_size"],
                               lr=r["lr"], seed=r["seed"], device=cfg.device), task=task)
    return str(path)


def run_validate(cfg: ValidateConfig, progress: bool = True) -> dict:
    from pipeline.lora.evaluate import evaluate_model
    from pipeline.lora.adapters import load_adapter, read_adapter_meta
    from pipeline.cache.models import load_model
    from pipeline.lora.tasks import load_task
    from pipeline.assemble.transfer import TransferConfig, check_adapter, load_bridged, run_transfer
    from pipeline.assemble.weightspace import weightspace_adapter
    from pipeline.assemble.export import ExportConfig, export_peft

    out = as_path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = read_adapter_meta(cfg.adapter)
    if meta is None:
        raise BridgeError(f"--adapter {cfg.adapter}: validate needs cast_lora.json (the training recipe) to "
                          f"retrain the reference on the target; train it with `cast lora train`")
    hs = load_heads(cfg.heads)
    lw = read_lora(cfg.adapter)
    for kind in ("mlp", "ridge"):  # both bridges are built later: refuse now, before any decoding
        check_adapter(cfg.adapter, lw, hs, kind)
    task_name = cfg.task or (None if cfg.task_file else meta["task"]["name"])
    task = load_task(task_name, cfg.task_file, split="test", seed=cfg.task_seed)
    train_task = load_task(task_name, None, split="train", seed=cfg.task_seed) if task_name else None
    if train_task is None and cfg.retrained is None:  # refused before minutes of decoding, not after
        raise BridgeError("--task-file gives only a test split: pass --retrained with a target LoRA trained "
                          "on the matching training file")
    src_name, tgt_name = hs.source["model"], hs.target["model"]
    t0 = time.perf_counter()
    results = {}

    def score(label: str, lm_model, tok) -> None:
        res = evaluate_model(lm_model, tok, task, limit=cfg.limit, batch_size=cfg.batch_size,
                             n_boot=cfg.n_boot, progress=progress)
        results[label] = res
        print(f"[cast] {label:<28} {res.summary()}", file=sys.stderr)

    src = load_model(src_name, device=cfg.device)
    score("source base", src.model, src.tokenizer)
    score("source + LoRA", load_adapter(src.model, cfg.adapter), src.tokenizer)
    tgt = load_model(tgt_name, device=cfg.device)
    score("target base", tgt.model, tgt.tokenizer)
    retrained = _ensure_retrained(cfg, meta, tgt_name, train_task, out)
    score("target + retrained LoRA", load_adapter(load_model(tgt_name, device=cfg.device).model, retrained),
          tgt.tokenizer)
    for kind in ("mlp", "ridge"):
        path = out / f"bridged-{kind}"
        run_transfer(TransferConfig(adapter=cfg.adapter, heads=cfg.heads, out=str(path), kind=kind,
                                    carry=cfg.carry, force=True))
        bridged = load_bridged(path, device=cfg.device)
        score(f"target + CAST ({kind})", bridged.model, bridged.tokenizer)
    # The ridge bridge folded into a plain PEFT LoRA (cast export): does serving it keep the behaviour?
    export_peft(ExportConfig(bridged=str(out / "bridged-ridge"), out=str(out / "exported-lora"), force=True,
                             eval_sequences=0, device=cfg.device))
    score("target + CAST exported", load_adapter(load_model(tgt_name, device=cfg.device).model, out / "exported-lora"),
          tgt.tokenizer)
    ws_path = out / "weightspace-lora"
    # Fresh copies: PEFT wrapped the models above in place.
    weightspace_adapter(cfg.adapter, load_model(src_name, device=cfg.device).model,
                        load_model(tgt_name, device=cfg.device).model, hs.mapping, ws_path, cfg.carry)
    score("target + weight-space", load_adapter(load_model(tgt_name, device=cfg.device).model, ws_path),
          tgt.tokenizer)
    return write_report(cfg, task.name, results, out, time.perf_counter() - t0, src_name, tgt_name)


def write_report(cfg, task_name: str, results: dict, out: Path, seconds: float, src_name: str, tgt_name: str) -> dict:
    vec = {k: [float(p["correct"]) for p in r.predictions] for k, r in results.items()}
    base, ref = vec["target base"], vec["target + retrained LoRA"]
    derived = {}
    for k in ("target + CAST (mlp)", "target + CAST (ridge)", "target + CAST exported", "target + weight-space"):
        rec, rat = paired_ratio_ci(vec[k], base, ref, cfg.n_boot)
        derived[k] = {"recovery": rec, "ratio": rat}
    report = {"task": task_name, "source": src_name, "target": tgt_name, "n": len(base), "seconds": seconds,
              "config": asdict(cfg),
              "systems": {k: {"exact_match": r.exact_match, "ci_low": r.ci_low, "ci_high": r.ci_high,
                              "correct": r.correct, "n": r.n} for k, r in results.items()},
              "transfer": derived}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    for k, r in results.items():
        r.to_json(out / "predictions" / f"{k.replace(' ', '_').replace('+', 'plus').replace('(', '').replace(')', '')}.json")
    (out / "report.md").write_text(format_report(report))
    plot_report(report, out / "report.png")
    return report


def _fmt(d: dict) -> str:
    v = d["value"]
    return "n/a" if v != v else f"{v:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"


def format_report(report: dict) -> str:
    lines = [f"## {report['task']}: {report['source']} -> {report['target']} ({report['n']} test examples)", "",
             "| system | exact match [95% CI] | recovery [95% CI] | CAST/retrained [95% CI] |", "|---|---|---|---|"]
    for k, s in report["systems"].items():
        t = report["transfer"].get(k)
        lines.append(f"| {k} | {s['exact_match']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}] | "
                     f"{_fmt(t['recovery']) if t else ''} | {_fmt(t['ratio']) if t else ''} |")
    lines += ["", "recovery = (system - target base) / (retrained - target base); n/a where the retrained "
              "LoRA does not beat the base."]
    return "\n".join(lines) + "\n"


def plot_report(report: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["systems"])
    em = [report["systems"][n]["exact_match"] for n in names]
    err = [[e - report["systems"][n]["ci_low"] for n, e in zip(names, em)],
           [report["systems"][n]["ci_high"] - e for n, e in zip(names, em)]]
    colours = ["#999999" if n.startswith("source") else "#4c72b0" if "CAST" in n else "#dd8452" for n in names]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(range(len(names)), em, yerr=err, color=colours, capsize=3)
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right")
    ax.set_ylabel("exact match")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report['task']}: {report['source']} -> {report['target']}")
    fig.tight_layout()
    with writing(png) as where:  # png may be on object storage: matplotlib writes locally
        fig.savefig(where, dpi=110)
    plt.close(fig)
