"""Fitting one head from the stores: closed-form ridge or Adam-trained MLP with early
stopping, evaluated on held-out segments. Loads no model and needs no GPU."""
from __future__ import annotations

import copy
import math
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch

import storage
from heads.data import PairLoader, heldout_mask, row_stats
from heads.modules import HeadConfig, ProjectionHead
from storage.artifacts import load_alignment

RIDGE_LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
STATS = ("store", "pairs")
"""Where the standardisation statistics come from (`cast train-heads --stats`)."""


@dataclass(frozen=True)
class HeadSpec:
    """One head: which way it maps, between which layers, at which site, of which kind."""

    direction: str
    """'encoder' (target -> source space) or 'decoder' (source -> target space)."""
    source_layer: int
    target_layer: int
    site: str
    kind: str

    @property
    def name(self) -> str:
        return f"{self.direction}/{self.site}/T{self.target_layer:02d}-S{self.source_layer:02d}.{self.kind}"


def _r2_cos(pred: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Variance-weighted R^2 over all dims (in standardised units) and mean cosine."""
    sse = ((pred - y) ** 2).sum().item()
    sst = ((y - y.mean(0)) ** 2).sum().item()
    cos = torch.nn.functional.cosine_similarity(pred, y, dim=1).mean().item()
    return 1.0 - sse / max(sst, 1e-12), cos


def evaluate(head: ProjectionHead, loader: PairLoader) -> dict:
    preds, ys = [], []
    with torch.no_grad():
        for xb, yb in loader.blocks():
            preds.append(head.standardised(xb))
            ys.append(yb)
    pred, y = torch.cat(preds), torch.cat(ys)
    r2, cos = _r2_cos(pred, y)
    # Cosine in raw units too: what the bridge will actually hand to the LoRA.
    raw_cos = torch.nn.functional.cosine_similarity(
        pred * head.out_std + head.out_mean, y * head.out_std + head.out_mean, dim=1).mean().item()
    return {"r2": r2, "cos": cos, "cos_raw": raw_cos, "mse": ((pred - y) ** 2).mean().item(), "n": len(y)}


def normal_equations(loader: PairLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """X^T X and X^T Y in float64, X with a column of ones (the intercept), accumulated
    block by block so memory does not grow with the number of pairs."""
    d_in = loader.x.shape[1]
    xtx = torch.zeros(d_in + 1, d_in + 1, dtype=torch.float64)
    xty = torch.zeros(d_in + 1, loader.y.shape[1], dtype=torch.float64)
    for xb, yb in loader.blocks():
        xa = torch.cat([xb.double(), torch.ones(len(xb), 1, dtype=torch.float64)], 1)
        xtx += xa.T @ xa
        xty += xa.T @ yb.double()
    return xtx, xty


def ridge_solution(xtx: torch.Tensor, xty: torch.Tensor, lam: float, n: int) -> torch.Tensor:
    """(d_in + 1, d_out) weights, the intercept last; lambda is scaled by n / d_in."""
    d_in = xtx.shape[0] - 1
    reg = torch.eye(d_in + 1, dtype=torch.float64) * lam * n / d_in
    reg[-1, -1] = 0  # never shrink the intercept
    return torch.linalg.solve(xtx + reg, xty)


def fit_ridge(head: ProjectionHead, train: PairLoader, held: PairLoader) -> dict:
    """Normal equations accumulated block by block (bounded memory); lambda chosen on held-out."""
    xtx, xty = normal_equations(train)
    n = len(train)
    best = None
    for lam in RIDGE_LAMBDAS:
        w = ridge_solution(xtx, xty, lam, n)
        head.linear.weight.data.copy_(w[:-1].T.float())
        head.linear.bias.data.copy_(w[-1].float())
        score = evaluate(head, held)
        if best is None or score["mse"] < best[1]["mse"]:
            best = (w.clone(), score, lam)
    w, score, lam = best
    head.linear.weight.data.copy_(w[:-1].T.float())
    head.linear.bias.data.copy_(w[-1].float())
    return {"lambda": lam, "epochs": 0}


def mlp_optimizer(head: ProjectionHead, opts: dict, n_rows: int, epochs: int):
    """AdamW with a one-cycle schedule spanning `epochs` passes over n_rows."""
    opt = torch.optim.AdamW(head.parameters(), lr=opts["lr"], weight_decay=opts["weight_decay"])
    steps = epochs * math.ceil(n_rows / opts["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opts["lr"], total_steps=max(1, steps), pct_start=0.1)
    return opt, sched


def mlp_epoch(head: ProjectionHead, loader: PairLoader, opt, sched, epoch: int, cosine_weight: float) -> int:
    """One pass of MSE (+ cosine) training over the loader's shuffled minibatches; returns the steps."""
    head.train()
    steps = 0
    for xb, yb in loader.batches(epoch):
        pred = head.standardised(xb)
        loss = ((pred - yb) ** 2).mean()
        if cosine_weight:
            loss = loss + cosine_weight * (1 - torch.nn.functional.cosine_similarity(pred, yb, dim=1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        steps += 1
    return steps


def fit_mlp(head: ProjectionHead, train: PairLoader, held: PairLoader, opts: dict, progress=None) -> dict:
    """Adam on MSE + cosine loss, starting from the ridge solution, early stopping on held-out MSE."""
    fit_ridge(head, train, held)
    opt, sched = mlp_optimizer(head, opts, len(train), opts["epochs"])
    best_state, best_mse, bad, curve = copy.deepcopy(head.state_dict()), evaluate(head, held)["mse"], 0, []
    epoch = 0
    for epoch in range(opts["epochs"]):
        mlp_epoch(head, train, opt, sched, epoch, opts["cosine_weight"])
        head.eval()
        mse = evaluate(head, held)["mse"]
        curve.append(mse)
        if progress:
            progress(epoch, mse)
        if mse < best_mse - 1e-6:
            best_mse, best_state, bad = mse, copy.deepcopy(head.state_dict()), 0
        else:
            bad += 1
            if bad >= opts["patience"]:
                break
    head.load_state_dict(best_state)
    return {"epochs": epoch + 1, "heldout_mse_curve": curve}


def _usable(pairs: dict, opts: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Position-0 tokens are attention sinks (norms up to ~190x the median in SmolLM2):
    # a different regime from the text tokens a LoRA acts on, so they are left out.
    keep = (pairs["src_pos"] >= opts["min_position"]) & (pairs["tgt_pos"] >= opts["min_position"])
    return pairs["src_row"][keep], pairs["tgt_row"][keep], pairs["segment_id"][keep]


def _split(pairs: dict, opts: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    src_rows, tgt_rows, segs = _usable(pairs, opts)
    if opts["max_pairs"] and len(src_rows) > opts["max_pairs"]:
        keep = np.sort(np.random.default_rng(opts["seed"]).choice(len(src_rows), opts["max_pairs"], replace=False))
        src_rows, tgt_rows, segs = src_rows[keep], tgt_rows[keep], segs[keep]
    return src_rows, tgt_rows, segs, heldout_mask(segs, opts["holdout"], opts["seed"])


def split_pairs(pairs: dict, opts: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source rows, target rows, held-out mask) of the aligned pairs a head with these
    options sees: the training rows are those not held out."""
    src_rows, tgt_rows, _, held = _split(pairs, opts)
    return src_rows, tgt_rows, held


def unseen_pairs(pairs: dict, opts: dict) -> tuple[np.ndarray, np.ndarray]:
    """(source rows, target rows) of every usable pair from a segment no training row came
    from: the held-out rows, plus, under --max-pairs, the segments the sample left out."""
    _, _, segs, held = _split(pairs, opts)
    src_rows, tgt_rows, all_segs = _usable(pairs, opts)
    free = ~np.isin(all_segs, np.unique(segs[~held]))
    return src_rows[free], tgt_rows[free]


def perturb(head: ProjectionHead, noise: float, seed: int) -> None:
    """Add noise · RMS(W) · N(0, 1) to every entry of the linear map W (standardised units):
    a head made worse in a known way, for the head-quality control."""
    w = head.linear.weight.data
    g = torch.Generator().manual_seed(seed)
    w.add_(noise * w.pow(2).mean().sqrt() * torch.randn(w.shape, generator=g))


def fit_head(spec: HeadSpec, paths: dict, opts: dict) -> tuple[ProjectionHead, dict]:
    """Read the aligned rows for `spec` from the stores and fit it; returns head + metrics."""
    t0 = time.perf_counter()
    torch.manual_seed(opts["seed"])
    src = storage.open_store(paths["src_store"])
    tgt = storage.open_store(paths["tgt_store"])
    src_rows, tgt_rows, held = split_pairs(load_alignment(paths["align"]).pairs(), opts)
    if spec.direction == "encoder":
        (xs, xl, xr), (ys, yl, yr) = (tgt, spec.target_layer, tgt_rows), (src, spec.source_layer, src_rows)
    else:
        (xs, xl, xr), (ys, yl, yr) = (src, spec.source_layer, src_rows), (tgt, spec.target_layer, tgt_rows)
    x, y = xs.array(xl, spec.site), ys.array(yl, spec.site)
    if opts.get("stats", "store") == "pairs":  # the rows trained on: no sinks, nothing held out
        x_mean, x_var = row_stats(x, xr[~held], opts["block_rows"])
        y_mean, y_var = row_stats(y, yr[~held], opts["block_rows"])
    else:
        x_mean, x_var = xs.stats(xl, spec.site)
        y_mean, y_var = ys.stats(yl, spec.site)
    x_std, y_std = np.sqrt(x_var) + 1e-6, np.sqrt(y_var) + 1e-6
    common = dict(x=x, y=y, x_mean=x_mean, x_std=x_std, y_mean=y_mean, y_std=y_std,
                  batch_size=opts["batch_size"], memory_budget_mb=opts["memory_budget_mb"] / 2,
                  block_rows=opts["block_rows"], seed=opts["seed"])
    train = PairLoader(x_rows=xr[~held], y_rows=yr[~held], **common)
    heldl = PairLoader(x_rows=xr[held], y_rows=yr[held], **common)
    head = ProjectionHead(HeadConfig(kind=spec.kind, in_dim=x.shape[1], out_dim=y.shape[1], hidden=opts["hidden"]))
    head.set_standardisation(x_mean, x_std, y_mean, y_std)
    fit = fit_ridge(head, train, heldl) if spec.kind == "ridge" else fit_mlp(head, train, heldl, opts)
    if opts.get("noise"):
        perturb(head, opts["noise"], zlib.crc32(spec.name.encode()) + opts["seed"])
    metrics = {"heldout": evaluate(head, heldl), "train": evaluate(head, train), **fit,
               "n_train": len(train), "n_heldout": len(heldl), "streamed": not train.in_memory,
               "seconds": time.perf_counter() - t0}
    return head, metrics
