"""`cast validate`'s report: report.json, report.md, report.png and the per-system files, and
the one table of every task's transferred systems that `cast run` ends in.

Exact-match recovery leads every table: it is what a user of the transferred LoRA gets. The
answer log-likelihood's recovery follows as the secondary measure (it moves with a partial
transfer long before exact match flips; docs/design.md#tasks-and-validation).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.lora.evaluate import resampled_means
from storage.fs import writing

BASE, REFERENCE = "target-base", "retrained"
"""The report.json keys recovery is measured between (pipeline/assemble/validate.py SYSTEMS)."""


def paired_ratio_ci(x, base, ref, n_boot: int, seed: int = 0, groups: list[str] | None = None):
    """Recovery and ratio with percentile intervals, resampling whole groups (items; default:
    each example alone) with the same draws for the three systems (paired)."""
    x, base, ref = (np.asarray(v, dtype=np.float64) for v in (x, base, ref))
    mx, mb, mr = resampled_means([x, base, ref], groups, n_boot, seed)
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


def write_report(cfg, task_name: str, systems: list, results: dict, out: Path, seconds: float, src_name: str,
                 tgt_name: str, resampled: dict, notes: dict) -> dict:
    """`systems`: the scored rows of validate's table, in order; `results`: key -> SystemScore;
    `resampled`: what the intervals resample (items or examples); `notes`: key -> extra JSON
    for that system (the export's measured fidelity)."""
    from pipeline.lora.tasks import task_group

    base, ref = results[BASE], results[REFERENCE]
    groups = resampled.pop("groups")
    derived = {}
    for s in systems:
        if not s.transferred:
            continue
        r = results[s.key]
        derived[s.key] = {}
        if r.em:
            rec, rat = paired_ratio_ci(*(_correct(x) for x in (r, base, ref)), cfg.n_boot, groups=groups)
            derived[s.key].update(recovery=rec, ratio=rat)
        derived[s.key]["ll_recovery"] = paired_ratio_ci(r.ll, base.ll, ref.ll, cfg.n_boot, groups=groups)[0]
    report = {"task": task_name, "group": task_group(task_name), "source": src_name, "target": tgt_name,
              "n": len(base.ll), "resampled": resampled, "seconds": seconds, "config": asdict(cfg),
              "systems": {s.key: {"label": s.label, **results[s.key].as_json(), **notes.get(s.key, {})}
                          for s in systems},
              "transfer": derived}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    for s in systems:
        r = results[s.key]
        if r.em:
            r.em.to_json(out / "predictions" / f"{s.key}.json")
        (out / "answer_ll" / f"{s.key}.json").parent.mkdir(parents=True, exist_ok=True)
        (out / "answer_ll" / f"{s.key}.json").write_text(json.dumps([round(float(v), 4) for v in r.ll]))
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


def _label(key: str, s: dict) -> str:
    return s.get("label", key)  # reports written before the system table keyed rows by their label


def _resampled(report: dict) -> str:
    r = report.get("resampled")
    if not r:
        return "paired bootstrap 95 % intervals over the test examples"
    what = (f"the {r['count']} items its {r['examples']} prompts share (prompts of one item are not independent)"
            if r["unit"] == "item" else f"the {r['count']} test examples")
    return f"paired bootstrap 95 % intervals resampling {what}, the same draws for every system"


def format_report(report: dict) -> str:
    group = f", {report['group']} task" if report.get("group") else ""
    lines = [f"## {report['task']}: {report['source']} -> {report['target']} ({report['n']} test examples{group})",
             "", "| system | EM recovery [95% CI] | exact match [95% CI] | LL recovery [95% CI] | answer LL "
             "| off-task ppl | KL to base |", "|---|---|---|---|---|---|---|"]
    for k, s in report["systems"].items():
        t = report["transfer"].get(k, {})
        em = f"{s['exact_match']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]" if "exact_match" in s else "-"
        off = s.get("offtask") or {}
        ppl, kl = (f"{off['perplexity']:.2f}", f"{off['kl_to_base']:.4f}") if off else ("", "")
        ll = f"{s['answer_ll']:.3f}" if "answer_ll" in s else ""
        lines.append(f"| {_label(k, s)} | {_fmt(t.get('recovery'))} | {em} | {_fmt(t.get('ll_recovery'))} | {ll} "
                     f"| {ppl} | {kl} |")
    lines += ["", "EM recovery = (exact match of the system - target base) / (retrained - target base), the headline; "
              "LL recovery, the same for the answer's log-likelihood (teacher-forced, answer + eos), is secondary: "
              "it moves with a partial transfer before exact match does. n/a where the retrained LoRA does not beat "
              f"the base. Intervals: {_resampled(report)}. Off-task: perplexity and KL(base || system) per token on "
              "held-out generic text, at the same positions for every system."]
    timed = [f"{_label(k, s)} {s['seconds']:.0f}" for k, s in report["systems"].items() if "seconds" in s]
    if timed:
        lines += ["", f"Seconds per system (building it, then scoring it; {report['seconds']:.0f} in all): "
                      + ", ".join(timed) + "."]
    for k, s in report["systems"].items():
        f = (s.get("fidelity") or {}).get("vs_bridged")
        if f:
            lines += ["", f"{_label(k, s)} against the bridge it was exported from, on {f['tokens']} held-out tokens: "
                          f"max |logit diff| {f['max_abs_logit_diff']:.4g}, top-1 agreement {f['top1_agreement']:.4f}, "
                          f"KL {f['kl']:.3g}."]
    return "\n".join(lines) + "\n"


def format_summary(reports: list[dict]) -> str:
    """Every task's transferred systems in one table, form tasks apart from skill tasks,
    exact-match recovery first."""
    lines = ["| task | group | system | EM recovery [95% CI] | exact match | LL recovery [95% CI] | KL to base |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(reports, key=lambda r: (r.get("group", ""), r["task"])):
        for k, t in r["transfer"].items():
            s = r["systems"][k]
            em = f"{s['exact_match']:.2f}" if "exact_match" in s else "-"
            kl = f"{s['offtask']['kl_to_base']:.3f}" if s.get("offtask") else ""
            lines.append(f"| {r['task']} | {r.get('group', '')} | {_label(k, s)} | {_fmt(t.get('recovery')) or '-'} | "
                         f"{em} | {_fmt(t.get('ll_recovery'))} | {kl} |")
    return "\n".join(lines) + "\n"


def plot_report(report: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in report["systems"].values() if "exact_match" in s]
    names = [s["label"] for s in rows]
    em = [s["exact_match"] for s in rows]
    err = [[e - s["ci_low"] for s, e in zip(rows, em)], [s["ci_high"] - e for s, e in zip(rows, em)]]
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
