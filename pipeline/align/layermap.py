"""Which source layer each target layer should be bridged to (docs/design.md#alignment-and-layer-map).

Linear CKA between every source layer and every target layer, measured on a seeded
sample of aligned token pairs; a monotone assignment by dynamic programming (deeper
target layers never map to shallower source layers); relative depth beside it as the
baseline; a heatmap with both paths; `layermap.json` for the head-training stage.

    cast layermap runs/source.zarr runs/target.zarr --align runs/align --site resid --out runs/layermap
    lm = storage.artifacts.load_layermap("runs/layermap")   # how head training reads it
    for src_layer, tgt_layer in lm.pairs(): ...

Memory is bounded by the sample, not the store: the side with fewer (layers x width)
values is held as (n, dim) float32 per layer; the other side is read one layer at a time,
gathering the sampled rows chunk by chunk through dask. Products are taken in float64.

By default features are standardised and pairs holding an attention-sink token are
dropped: on SmolLM2/Gemma-3 raw CKA is otherwise decided by one outlier dimension or by
the ~0.7% of tokens whose residual norm is 40-190x the rest (see the flags' help).
"""
from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import storage
from storage.artifacts import (HEATMAP_PNG, LAYERMAP_JSON, LAYERMAP_KIND, LAYERMAP_VERSION, check_same_text,
                               load_alignment, store_identity)
from storage.files import atomic_write_text
from storage.fs import as_path, writing
from storage.layout import StoreError
from storage.reader import ActivationStore

@dataclass
class LayermapConfig:
    """What `cast layermap` does; every field is a flag of the same name."""

    src_store: str
    """Source activation store (the LoRA's base model)."""
    tgt_store: str
    """Target activation store."""
    align: str
    """Alignment directory made by `cast align SRC_STORE TGT_STORE`."""
    out: str
    """Output directory; its layermap.json and heatmap.png are replaced if present."""
    site: str = "resid"
    """Site compared in both stores (must be stored in both)."""
    n_pairs: int = 4096
    """Aligned pairs sampled for CKA; cost grows linearly, memory too."""
    seed: int = 0
    """Seed of the pair sample."""
    outlier_norm: float = 10.0
    """Drop pairs where either token is an attention sink: its norm, at its median layer,
    exceeds this many times the median token norm. SmolLM2's first token and some later
    ones reach ~40-190x across layers 11-28 and would decide the whole CKA on their own;
    a heavy tail at a single layer (Gemma-3 layer 0, up to 18x) is kept. 0 keeps all."""
    min_position: int = 0
    """Also skip pairs where either token sits before this position of its model's input."""
    standardize: bool = True
    """Scale every feature to unit variance before CKA (heads see standardised inputs too).
    Raw residual streams are ruled by a few outlier dimensions (measured on the real pair:
    one direction holds 94 to 100 percent of ||X^T X||_F^2 at several layers, e.g. Gemma-3 dim 400
    at layer 0, SmolLM2 dim 507 at layer 5), which makes raw CKA a test of one feature.
    --no-standardize gives plain linear CKA."""

    def __post_init__(self):
        if self.n_pairs < 2:
            raise ValueError(f"--n-pairs must be at least 2, got {self.n_pairs}")
        if self.outlier_norm < 0:
            raise ValueError(f"--outlier-norm must be >= 0 (0 keeps every pair), got {self.outlier_norm}")
        if self.min_position < 0:
            raise ValueError(f"--min-position must be >= 0, got {self.min_position}")


# ----------------------------------------------------------------------------- maths


def centre(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x - x.mean(axis=0, keepdims=True)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two (n, d) samples, Gram-free: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""
    xc, yc = centre(x), centre(y)
    denom = np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)
    return float(np.linalg.norm(yc.T @ xc) ** 2 / denom) if denom > 0 else 0.0


def monotone_assignment(cka: np.ndarray) -> list[int]:
    """For a (source, target) score matrix, the source index of each target column,
    non-decreasing in target depth, maximising the total score (O(S*T) DP)."""
    n_src, n_tgt = cka.shape
    best = cka[:, 0].astype(np.float64).copy()
    back = np.zeros((n_tgt, n_src), dtype=np.int64)
    for t in range(1, n_tgt):
        # run_arg[s] = argmax of best[:s+1] (earliest on ties): the best predecessor <= s.
        run_arg = np.zeros(n_src, dtype=np.int64)
        for s in range(1, n_src):
            run_arg[s] = s if best[s] > best[run_arg[s - 1]] else run_arg[s - 1]
        back[t] = run_arg
        best = cka[:, t] + best[run_arg]
    path = [int(np.argmax(best))]
    for t in range(n_tgt - 1, 0, -1):
        path.append(int(back[t][path[-1]]))
    return path[::-1]


def relative_depth(src_layers: list[int], tgt_layers: list[int], n_src: int, n_tgt: int) -> list[int]:
    """Index into src_layers for each target layer at the same fraction of blocks run:
    resid of layer l is the output of block l, i.e. (l + 1) / L of the model's depth."""
    out = []
    for lt in tgt_layers:
        want = (lt + 1) / n_tgt * n_src - 1
        out.append(int(np.argmin([abs(ls - want) + 1e-9 * ls for ls in src_layers])))
    return out


# ----------------------------------------------------------------------------- store side


def gather(store: ActivationStore, layer: int, site: str, rows: np.ndarray) -> np.ndarray:
    """The sampled rows of one (layer, site) as float32. Rows are sorted, so dask reads
    each chunk at most once and keeps only the rows it needs from it."""
    x = store.array(layer, site)[rows].compute()
    if not np.isfinite(x).all():
        raise StoreError(f"{store.path}: layer {layer} site {site} holds inf/nan; run `cast verify {store.path}`")
    return x


def prepare(x: np.ndarray, standardize: bool) -> np.ndarray:
    """Centre (CKA needs it) and optionally scale each feature to unit variance."""
    x = centre(x)
    if standardize:
        sd = x.std(axis=0)
        x = x / np.where(sd > 0, sd, 1.0)  # constant features stay zero
    return x.astype(np.float32)


def norm_ratio(x: np.ndarray) -> np.ndarray:
    """Each row's norm over the median row norm of the sample."""
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    return norms / max(float(np.median(norms)), 1e-30)


def sink_rows(ratios: list[np.ndarray], factor: float) -> np.ndarray:
    """Rows whose norm ratio, taken at the median layer, exceeds `factor`: tokens that stay
    huge through much of the model (attention sinks), not a heavy tail at one layer."""
    if factor <= 0 or not ratios:
        return np.zeros(len(ratios[0]) if ratios else 0, dtype=bool)
    return np.median(np.stack(ratios, axis=1), axis=1) > factor


def cka_matrix(src: ActivationStore, tgt: ActivationStore, site: str, src_rows: np.ndarray,
               tgt_rows: np.ndarray, standardize: bool = False, outlier_norm: float = 0.0,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(n_src_layers, n_tgt_layers) linear CKA and the mask of pairs it used.

    One side's samples are held in memory (the smaller one); the other is read one layer
    at a time. With outlier_norm > 0 a pair is dropped when either token is an attention
    sink (sink_rows); that needs the streamed side's norms first, hence one extra read.
    """
    def volume(s):
        return len(s.layers) * s.meta["dims"][site]

    def say(msg):
        if progress:
            print(f"[cast] layermap: {msg}", file=sys.stderr)

    swap = volume(src) < volume(tgt)  # hold the smaller side, stream the larger one
    held, streamed = (src, tgt) if swap else (tgt, src)
    held_rows, streamed_rows = (src_rows, tgt_rows) if swap else (tgt_rows, src_rows)
    hs = [gather(held, layer, site, held_rows) for layer in held.layers]
    drop = np.zeros(len(held_rows), dtype=bool)
    if outlier_norm > 0:
        drop |= sink_rows([norm_ratio(h) for h in hs], outlier_norm)
        drop |= sink_rows([norm_ratio(gather(streamed, layer, site, streamed_rows))
                           for layer in streamed.layers], outlier_norm)
        say(f"dropped {drop.sum()} of {len(drop)} pairs with an attention-sink token "
            f"(norm > {outlier_norm:g}x the median at the median layer)")
    keep = ~drop
    if keep.sum() < 2:
        raise StoreError(f"only {keep.sum()} pair(s) left after dropping outliers; raise --outlier-norm or use 0")
    for i in range(len(hs)):  # one layer at a time: never two copies of the held side
        hs[i] = prepare(hs[i][keep], standardize)
    h_norm = [np.linalg.norm(h.astype(np.float64).T @ h.astype(np.float64)) for h in hs]
    out = np.zeros((len(streamed.layers), len(hs)))
    for a, layer in enumerate(streamed.layers):
        x = prepare(gather(streamed, layer, site, streamed_rows[keep]), standardize).astype(np.float64)
        x_norm = np.linalg.norm(x.T @ x)
        for b, h in enumerate(hs):
            denom = x_norm * h_norm[b]
            # A constant layer has no direction to compare; score it 0, not nan.
            out[a, b] = np.linalg.norm(h.astype(np.float64).T @ x) ** 2 / denom if denom > 0 else 0.0
        say(f"{streamed.meta['model']['name']} layer {layer} done ({a + 1}/{len(streamed.layers)})")
    return (out.T if swap else out), keep


def _n_layers(store: ActivationStore) -> int:
    # Stores record the captured layers; with the default --layers all, that is the model.
    return int(store.meta["model"].get("n_layers") or max(store.layers) + 1)


def heatmap(path: Path, cka: np.ndarray, src_layers, tgt_layers, chosen, rel, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(7, 0.35 * len(tgt_layers) + 2.5), max(4, 0.25 * len(src_layers) + 2)))
    im = ax.imshow(cka, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-9, cka.max()))
    xs = np.arange(len(tgt_layers))
    ax.plot(xs, rel, "--", color="cyan", marker="s", ms=4, lw=1.5, label="relative depth")
    ax.plot(xs, chosen, "-", color="red", marker="o", ms=4, lw=2, label="chosen (monotone DP)")
    ax.set_xticks(xs, [str(x) for x in tgt_layers], fontsize=7)
    ax.set_yticks(np.arange(len(src_layers)), [str(x) for x in src_layers], fontsize=7)
    ax.set_xlabel("target layer")
    ax.set_ylabel("source layer")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=7)
    fig.colorbar(im, ax=ax, label="linear CKA")
    fig.tight_layout()
    with writing(path) as where:  # path may be on object storage: matplotlib writes locally
        fig.savefig(where, dpi=120)
    plt.close(fig)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_layermap(cfg: LayermapConfig, progress: bool = False) -> dict:
    """Compute the CKA matrix and both layer maps; write layermap.json + heatmap.png."""
    t0 = time.perf_counter()
    src, tgt = storage.open_store(cfg.src_store), storage.open_store(cfg.tgt_store)
    check_same_text(src, tgt)
    for s in (src, tgt):
        _need_site(s, cfg.site)
    al = load_alignment(cfg.align)
    al.check_stores(src, tgt)
    src_rows, tgt_rows = al.sample(cfg.n_pairs, cfg.seed, cfg.min_position)
    if len(src_rows) < 2:
        raise StoreError(f"--align {cfg.align} has {len(src_rows)} pair(s) at --min-position "
                         f"{cfg.min_position} or later; CKA needs at least 2")
    cka, keep = cka_matrix(src, tgt, cfg.site, src_rows, tgt_rows, cfg.standardize, cfg.outlier_norm,
                           progress=progress)
    chosen = monotone_assignment(cka)
    rel = relative_depth(src.layers, tgt.layers, _n_layers(src), _n_layers(tgt))

    def as_map(idx):
        return [{"target_layer": lt, "source_layer": src.layers[i], "cka": float(cka[i, t])}
                for t, (lt, i) in enumerate(zip(tgt.layers, idx))]

    total = {"chosen": float(sum(cka[i, t] for t, i in enumerate(chosen))),
             "relative_depth": float(sum(cka[i, t] for t, i in enumerate(rel)))}
    out = as_path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    sm, tm = src.meta["model"]["name"], tgt.meta["model"]["name"]
    heatmap(out / HEATMAP_PNG, cka, src.layers, tgt.layers, chosen, rel,
            f"linear CKA{' (standardised features)' if cfg.standardize else ''}, site {cfg.site}, "
            f"{int(keep.sum()):,} aligned pairs\n"
            f"source {sm}, target {tm}\n"
            f"total CKA: chosen {total['chosen']:.2f}, relative depth {total['relative_depth']:.2f}")
    meta = {
        "kind": LAYERMAP_KIND, "version": LAYERMAP_VERSION, "metric": "linear_cka", "site": cfg.site,
        "standardize": cfg.standardize, "min_position": cfg.min_position, "outlier_norm": cfg.outlier_norm,
        "n_pairs": int(keep.sum()), "n_sampled": int(len(src_rows)), "n_outliers": int((~keep).sum()),
        "seed": cfg.seed,
        "source": {**store_identity(src), "layers": src.layers},
        "target": {**store_identity(tgt), "layers": tgt.layers},
        "alignment": {"path": str(al.path), "n_pairs": al.n_pairs, "coverage": al.coverage},
        "source_layers": src.layers, "target_layers": tgt.layers,
        "cka": [[float(v) for v in row] for row in cka],
        "cka_axes": "cka[i][j]: source_layers[i] vs target_layers[j]",
        "map": as_map(chosen), "relative_depth_map": as_map(rel), "total_cka": total,
        "mean_cka": {k: v / len(tgt.layers) for k, v in total.items()},
        "heatmap": HEATMAP_PNG, "seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib(),
    }
    atomic_write_text(out / LAYERMAP_JSON, json.dumps(meta, indent=2))  # whole or not at all
    return meta


def _need_site(store: ActivationStore, site: str) -> None:
    if site not in store.sites:
        raise StoreError(f"--site {site}: {store.path} does not store it (it has {', '.join(store.sites)})")


def format_layermap(meta: dict) -> str:
    lines = [f"site {meta['site']}{' (standardised features)' if meta.get('standardize') else ''}, "
             f"{meta['n_pairs']:,} aligned pairs ({meta.get('n_outliers', 0)} outlier pairs dropped), "
             f"{meta['source']['model']} (source) -> {meta['target']['model']} (target)",
             f"{'target':>6}  {'chosen':>6} {'CKA':>6}   {'rel.depth':>9} {'CKA':>6}"]
    for c, r in zip(meta["map"], meta["relative_depth_map"]):
        lines.append(f"{c['target_layer']:>6}  {c['source_layer']:>6} {c['cka']:>6.3f}   "
                     f"{r['source_layer']:>9} {r['cka']:>6.3f}")
    t = meta["total_cka"]
    lines.append(f"total CKA: chosen {t['chosen']:.3f}, relative depth {t['relative_depth']:.3f} "
                 f"(mean {meta['mean_cka']['chosen']:.3f} vs {meta['mean_cka']['relative_depth']:.3f})")
    lines.append(f"peak memory {meta['peak_rss_mib']:,.0f} MiB, {meta['seconds']:.1f} s")
    return "\n".join(lines)
