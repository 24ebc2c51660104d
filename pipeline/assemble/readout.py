"""`cast readout`: per bridged layer, how well the target side reproduces what the source
LoRA actually reads (docs/results.md#what-the-lora-reads-through-the-bridge).

A head's R² is over the whole activation, but a rank-r LoRA reads only r numbers of it,
A·x. Through the bridge it reads A·E(x_t) instead of A·x_s, so what decides whether a
layer's LoRA can work through the bridge is the R² of those r numbers, on text the heads
never saw:

    R²(A·x) = 1 - Σ |A·E(x_t) - A·x_s|² / Σ |A·x_s - mean|²     over held-out aligned tokens

beside the whole activation's R² and the norm ratio |A·E(x_t)| / |A·x_s| (a bridge that
amplifies what the LoRA reads shows it here first). Rows come only from segments no
head trained on (heads.train.unseen_pairs): the heads' held-out segments, plus, for heads
fitted on a --max-pairs sample, the segments it left out.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import storage
from heads.data import gather
from heads.headset import load_heads
from heads.train import unseen_pairs
from pipeline.assemble.bridge import BridgeError, assign_layers, read_lora
from pipeline.assemble.transfer import check_base
from pipeline.cache.hooks import IN_SITE
from storage.artifacts import load_alignment
from storage.fs import as_path, writing


@dataclass
class ReadoutConfig:
    """What `cast readout` does; every field is a flag of the same name."""

    adapter: str
    """Source LoRA adapter whose reads are scored (its A matrices, per layer and module)."""
    heads: str
    """Head set from `cast train-heads`; its index names the stores and alignment it was fitted on."""
    out: str
    """Directory for readout.json, readout.md and readout.png."""
    kinds: str = ""
    """Encoder kinds scored, comma-separated (mlp, ridge); default: every kind the head set has."""
    carry: str = "all"
    """Which target layer reads each source LoRA layer, as in `cast transfer --carry`."""
    max_rows: int = 20_000
    """Unseen aligned tokens scored per layer at most (a fixed random subset)."""

    def __post_init__(self):
        if self.max_rows < 10:
            raise ValueError(f"--max-rows must be at least 10, got {self.max_rows}")


def r2(pred: np.ndarray, true: np.ndarray) -> float:
    """Variance-weighted R² over all columns (raw units)."""
    sst = ((true - true.mean(0)) ** 2).sum()
    return float(1.0 - ((pred - true) ** 2).sum() / max(sst, 1e-12))


def score_read(a: np.ndarray, x_hat: np.ndarray, x_s: np.ndarray) -> dict:
    """R² and cosine of A·x_hat against A·x_s, the norm ratio, and the whole activation's R²."""
    ax, ax_hat = x_s @ a.T, x_hat @ a.T                                      # (n, r)
    cos = (ax * ax_hat).sum(1) / (np.linalg.norm(ax, axis=1) * np.linalg.norm(ax_hat, axis=1) + 1e-12)
    return {"r2_ax": r2(ax_hat, ax), "cos_ax": float(cos.mean()),
            "norm_ratio": float(np.linalg.norm(ax_hat, axis=1).mean() / max(np.linalg.norm(ax, axis=1).mean(), 1e-12)),
            "r2_x": r2(x_hat, x_s)}


def run_readout(cfg: ReadoutConfig) -> dict:
    hs = load_heads(cfg.heads)
    lora = read_lora(cfg.adapter)
    check_base(cfg.adapter, hs)
    paths, opts = hs.index["paths"], hs.index["options"]
    src, tgt = storage.open_store(paths["src_store"]), storage.open_store(paths["tgt_store"])
    src_rows, tgt_rows = unseen_pairs(load_alignment(paths["align"]).pairs(), opts)
    if len(src_rows) > cfg.max_rows:
        pick = np.sort(np.random.default_rng(0).choice(len(src_rows), cfg.max_rows, replace=False))
        src_rows, tgt_rows = src_rows[pick], tgt_rows[pick]
    present = sorted({h["spec"]["kind"] for h in hs.entries("encoder")})
    kinds = [k.strip() for k in cfg.kinds.split(",") if k.strip()] or present
    if set(kinds) - set(present):
        raise BridgeError(f"--kinds {cfg.kinds}: the head set {cfg.heads} has encoder heads of kind(s) {present} only")
    rows = []
    for t, source_layers in sorted(assign_layers(lora.source_layers, hs.mapping, cfg.carry).items()):
        for s in source_layers:
            acts: dict = {}  # q, k and v read the same site: each (layer, site) is read and encoded once
            for module in sorted(m for (l, m) in lora.layers if l == s):
                site = IN_SITE[module]
                if site not in src.sites or site not in tgt.sites:
                    raise BridgeError(f"--heads {cfg.heads}: its stores lack site {site!r} that {module} reads")
                if site not in acts:
                    acts[site] = (gather(tgt.array(t, site), tgt_rows).astype(np.float32),
                                  gather(src.array(s, site), src_rows).astype(np.float32))
                x_t, x_s = acts[site]
                a = lora.layers[(s, module)][0].numpy()
                if a.shape[1] != x_s.shape[1]:
                    raise BridgeError(f"--adapter {cfg.adapter}: layer {s} {module} reads {a.shape[1]} dims, but the "
                                      f"head set's source store has {x_s.shape[1]} there; the adapter is for another model")
                for kind in kinds:
                    if (site, kind) not in acts:
                        with torch.no_grad():
                            acts[(site, kind)] = hs.head("encoder", t, site, kind)(torch.from_numpy(x_t)).numpy()
                    x_hat = acts[(site, kind)]
                    rows.append({"target_layer": t, "source_layer": s, "mapped_source_layer": hs.mapping[t],
                                 "module": module, "site": site, "kind": kind, "rank": int(a.shape[0]),
                                 **score_read(a, x_hat, x_s)})
    result = {"adapter": cfg.adapter, "heads": cfg.heads, "carry": cfg.carry, "n_rows": int(len(src_rows)),
              "rows": rows}
    out = as_path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "readout.json").write_text(json.dumps(result, indent=2))
    (out / "readout.md").write_text(format_readout(result) + "\n")
    plot_readout(result, out / "readout.png")
    return result


def format_readout(result: dict) -> str:
    lines = [f"What the LoRA reads through the bridge: held-out R² of A·x per layer ({result['n_rows']} held-out "
             f"aligned tokens, carry {result['carry']})", "",
             "| T | S (mapped) | module | kind | R²(A·x) | cos(A·x) | norm ratio | R²(x) |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['target_layer']} | {r['source_layer']} ({r['mapped_source_layer']}) | {r['module']} | "
                     f"{r['kind']} | {r['r2_ax']:.3f} | {r['cos_ax']:.3f} | {r['norm_ratio']:.2f} | {r['r2_x']:.3f} |")
    return "\n".join(lines)


def plot_readout(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    series: dict[tuple[str, str], list] = {}
    for r in result["rows"]:
        series.setdefault((r["module"], r["kind"]), []).append((r["source_layer"], r["r2_ax"], r["r2_x"]))
    for (module, kind), pts in sorted(series.items()):
        pts.sort()
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{module} {kind}: R²(A·x)")
        ax.plot([p[0] for p in pts], [p[2] for p in pts], linestyle=":", color=line.get_color(),
                label=f"{module} {kind}: R²(x)")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_ylim(max(ax.get_ylim()[0], -2.0), 1.05)  # R² of a bad map runs to -inf; below -2 it reads the same
    ax.set_xlabel("source LoRA layer")
    ax.set_ylabel("held-out R²")
    ax.set_title("what the LoRA reads, through the encoder heads")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with writing(png) as where:
        fig.savefig(where, dpi=110)
    plt.close(fig)
