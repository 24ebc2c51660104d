"""`cast validate`: does the behaviour carry over? One report per task comparing

    target base | target + LoRA retrained on target (same recipe) | target + CAST (mlp heads)
    target + CAST (ridge heads) | target + CAST exported (the ridge bridge as a plain PEFT LoRA)
    target + weight-space transfer | target + logit proxy | source base | source + LoRA

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
from pipeline.assemble.scoring import heldout_ids, score_system
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
    decode: bool = True
    """Greedy-decode every system for exact match; --no-decode keeps only the measures that need no decoding
    (answer log-likelihood, off-task damage): seconds per system instead of minutes, for ablations."""
    offtask_sequences: int = 32
    """Held-out generic sequences (64 tokens, from the corpus's end, never read by the stores) on which each
    system's perplexity and KL to its base model are measured; 0: skip."""
    systems: str = "all"
    """Systems scored besides the target base and the retrained reference (always: recovery needs them):
    'all' or a comma-separated subset of source, mlp, ridge, exported, weight-space, proxy (the logit proxy:
    the target decoding with the source LoRA's change of log-probabilities; docs/design.md#the-logit-proxy)."""
    corpus: str = "nlp-corpus"
    """Generic text of the off-task measures (the built-in corpus, or a file, directory or glob)."""
    device: str | None = None
    """torch device; default CUDA when present, else CPU."""

    def __post_init__(self):
        for name, low in (("limit", 1), ("batch_size", 1), ("n_boot", 1), ("offtask_sequences", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")


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


SYSTEMS = ("source", "mlp", "ridge", "exported", "weight-space", "proxy")


def chosen_systems(cfg: ValidateConfig) -> set[str]:
    chosen = set(SYSTEMS) if cfg.systems == "all" else {x.strip() for x in cfg.systems.split(",") if x.strip()}
    if not chosen or chosen - set(SYSTEMS):
        raise BridgeError(f"--systems {cfg.systems}: choose 'all' or from {', '.join(SYSTEMS)}")
    return chosen


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
    chosen = chosen_systems(cfg)
    bridges = [k for k in ("mlp", "ridge") if k in chosen or (k == "ridge" and "exported" in chosen)]
    for kind in bridges:  # the bridges are built later: refuse now, before any decoding
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
    # Unwrapped copies: the off-task KL is measured against them, and PEFT wraps models in place.
    # The source side is loaded (and its held-out text tokenized) only when its rows are scored.
    sides = ("source", "target") if "source" in chosen else ("target",)
    ref = {side: load_model(hs.index["inputs"][side]["model"], device=cfg.device) for side in sides}
    held = {side: heldout_ids(cfg, lm.tokenizer, [hs.source, hs.target]) for side, lm in ref.items()}

    def score(label: str, lm_model, tok, proxy=None) -> None:
        side = label.split()[0]
        results[label] = score_system(lm_model, tok, task, ref[side].model, held[side], cfg, progress, proxy)
        print(f"[cast] {label:<28} {results[label].summary()}", file=sys.stderr)

    tgt = ref["target"]
    if "source" in chosen:
        src = ref["source"]
        score("source base", src.model, src.tokenizer)
        score("source + LoRA", load_adapter(load_model(src_name, device=cfg.device).model, cfg.adapter),
              src.tokenizer)
    score("target base", tgt.model, tgt.tokenizer)
    retrained = _ensure_retrained(cfg, meta, tgt_name, train_task, out)
    score("target + retrained LoRA", load_adapter(load_model(tgt_name, device=cfg.device).model, retrained),
          tgt.tokenizer)
    for kind in bridges:
        path = out / f"bridged-{kind}"
        run_transfer(TransferConfig(adapter=cfg.adapter, heads=cfg.heads, out=str(path), kind=kind,
                                    carry=cfg.carry, force=True))
        if kind in chosen:
            bridged = load_bridged(path, device=cfg.device)
            score(f"target + CAST ({kind})", bridged.model, bridged.tokenizer)
    if "exported" in chosen:  # the ridge bridge folded into a plain PEFT LoRA: does serving it keep the behaviour?
        export_peft(ExportConfig(bridged=str(out / "bridged-ridge"), out=str(out / "exported-lora"), force=True,
                                 eval_sequences=0, device=cfg.device))
        score("target + CAST exported",
              load_adapter(load_model(tgt_name, device=cfg.device).model, out / "exported-lora"), tgt.tokenizer)
    if "weight-space" in chosen:
        ws_path = out / "weightspace-lora"
        # Fresh copies: PEFT wrapped the models above in place.
        weightspace_adapter(cfg.adapter, load_model(src_name, device=cfg.device).model,
                            load_model(tgt_name, device=cfg.device).model, hs.mapping, ws_path, cfg.carry)
        score("target + weight-space", load_adapter(load_model(tgt_name, device=cfg.device).model, ws_path),
              tgt.tokenizer)
    if "proxy" in chosen:
        run_transfer(TransferConfig(adapter=cfg.adapter, heads=cfg.heads, out=str(out / "bridged-proxy"), kind="proxy",
                                    force=True))
        proxied = load_bridged(out / "bridged-proxy", device=cfg.device)
        score("target + logit proxy", proxied.model, proxied.tokenizer, proxied.logits_processor)
    return write_report(cfg, task.name, results, out, time.perf_counter() - t0, src_name, tgt_name)


def write_report(cfg, task_name: str, results: dict, out: Path, seconds: float, src_name: str, tgt_name: str) -> dict:
    from pipeline.lora.tasks import task_group

    base, ref = results["target base"], results["target + retrained LoRA"]
    derived = {}
    for k, r in results.items():
        if not k.startswith("target + ") or r is ref:
            continue
        derived[k] = {"ll_recovery": paired_ratio_ci(r.ll, base.ll, ref.ll, cfg.n_boot)[0]}
        if r.em:
            rec, rat = paired_ratio_ci(*(_correct(x) for x in (r, base, ref)), cfg.n_boot)
            derived[k].update(recovery=rec, ratio=rat)
    report = {"task": task_name, "group": task_group(task_name), "source": src_name, "target": tgt_name,
              "n": len(base.ll), "seconds": seconds, "config": asdict(cfg),
              "systems": {k: r.as_json() for k, r in results.items()}, "transfer": derived}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    for k, r in results.items():
        name = k.replace(' ', '_').replace('+', 'plus').replace('(', '').replace(')', '')
        if r.em:
            r.em.to_json(out / "predictions" / f"{name}.json")
        (out / "answer_ll" / f"{name}.json").parent.mkdir(parents=True, exist_ok=True)
        (out / "answer_ll" / f"{name}.json").write_text(json.dumps([round(float(v), 4) for v in r.ll]))
    (out / "report.md").write_text(format_report(report))
    if cfg.decode:
        plot_report(report, out / "report.png")
    return report


def _correct(score) -> list[float]:
    return [float(p["correct"]) for p in score.em.predictions]


def _fmt(d: dict | None) -> str:
    if not d:
        return ""
    v = d["value"]
    return "n/a" if v != v else f"{v:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"


def format_report(report: dict) -> str:
    group = f", {report['group']} task" if report.get("group") else ""
    lines = [f"## {report['task']}: {report['source']} -> {report['target']} ({report['n']} test examples{group})",
             "", "| system | exact match [95% CI] | EM recovery [95% CI] | answer LL | LL recovery [95% CI] "
             "| off-task ppl | KL to base |", "|---|---|---|---|---|---|---|"]
    for k, s in report["systems"].items():
        t = report["transfer"].get(k, {})
        em = f"{s['exact_match']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]" if "exact_match" in s else "-"
        off = s.get("offtask") or {}
        ppl, kl = (f"{off['perplexity']:.2f}", f"{off['kl_to_base']:.4f}") if off else ("", "")
        ll = f"{s['answer_ll']:.3f}" if "answer_ll" in s else ""
        lines.append(f"| {k} | {em} | {_fmt(t.get('recovery'))} | {ll} | {_fmt(t.get('ll_recovery'))} | {ppl} | {kl} |")
    lines += ["", "recovery = (system - target base) / (retrained - target base), for exact match and for the "
              "answer's log-likelihood (teacher-forced, answer + eos); n/a where the retrained LoRA does not beat "
              "the base. Off-task: perplexity and KL(base || system) per token on held-out generic text."]
    return "\n".join(lines) + "\n"


def format_summary(reports: list[dict]) -> str:
    """Every task's transferred systems in one table, form tasks apart from skill tasks."""
    lines = ["| task | group | system | exact match | EM recovery [95% CI] | LL recovery [95% CI] | KL to base |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(reports, key=lambda r: (r.get("group", ""), r["task"])):
        for k, t in r["transfer"].items():
            s = r["systems"][k]
            em = f"{s['exact_match']:.2f}" if "exact_match" in s else "-"
            kl = f"{s['offtask']['kl_to_base']:.3f}" if s.get("offtask") else ""
            lines.append(f"| {r['task']} | {r.get('group', '')} | {k} | {em} | {_fmt(t.get('recovery')) or '-'} | "
                         f"{_fmt(t.get('ll_recovery'))} | {kl} |")
    return "\n".join(lines) + "\n"


def plot_report(report: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["systems"])
    names = [n for n in names if "exact_match" in report["systems"][n]]
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
