"""(c) of `cast bench`: one head's training epoch reading its pairs from the two stores,
against the same epoch with the activations recomputed by forwarding both models. Both
paths run head training's own code (heads/train.py), so only the data source differs."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from bench.config import BenchConfig
from bench.extraction import Methods
from bench.timing import log, padded


def recompute_site(lm, plan, layer: int, site: str, batch_tokens: int) -> np.ndarray:
    """(tokens, dim) float32 of one (layer, site), rows in store order, forwarding only
    down to `layer` (the cheapest recompute the hooks allow)."""
    from pipeline.cache.extract import length_batches
    from pipeline.cache.hooks import capture, run_to_deepest

    pad = lm.tokenizer.pad_token_id or 0
    parts = []
    with capture(lm.model, [layer], [site]) as got:
        for unit in plan.units:
            lengths = [len(x) for x in unit.input_ids]
            starts = np.concatenate([[0], np.cumsum(lengths)])
            buf = None
            for batch in length_batches(lengths, batch_tokens):
                ids, mask, lens = padded(unit, batch, pad)
                got.clear()
                run_to_deepest(lm.model, ids, mask)
                x = got[(layer, site)].float()
                if buf is None:
                    buf = np.empty((int(starts[-1]), x.shape[-1]), dtype=np.float32)
                for row, i in enumerate(batch):
                    buf[starts[i]: starts[i + 1]] = x[row, : lens[row]].numpy()
            parts.append(buf)
    return np.concatenate(parts)


def train_epoch(loader, in_dim: int, out_dim: int, kind: str, opts: dict) -> int:
    """One epoch of what `cast train-heads` does for a head: ridge's normal equations and
    a solve, or one pass of the MLP's minibatch steps. Returns the number of steps."""
    from heads.modules import HeadConfig, ProjectionHead
    from heads.train import mlp_epoch, mlp_optimizer, normal_equations, ridge_solution

    torch.manual_seed(opts["seed"])
    head = ProjectionHead(HeadConfig(kind=kind, in_dim=in_dim, out_dim=out_dim, hidden=opts["hidden"]))
    with torch.enable_grad():
        if kind == "ridge":
            xtx, xty = normal_equations(loader)
            ridge_solution(xtx, xty, 1.0, len(loader))
            return math.ceil(len(loader) / loader.block_rows)
        opt, sched = mlp_optimizer(head, opts, len(loader), epochs=1)
        return mlp_epoch(head, loader, opt, sched, 0, opts["cosine_weight"])


class HeadEpoch:
    """(c): one head's epoch from the stores vs with its activations recomputed."""

    def __init__(self, cfg: BenchConfig, m: Methods, work: Path):
        from heads.run import TrainHeadsConfig
        from pipeline.align.pairs import AlignConfig, run_align
        from storage.artifacts import load_alignment
        from pipeline.cache.extract import ExtractConfig, prepare, run_extract
        from pipeline.cache.hooks import parse_layers
        from pipeline.cache.models import load_model

        self.cfg, self.m = cfg, m
        partner = cfg.partner_name
        self.partner = partner
        n_src = m.lm.info.num_layers
        pcfg = ExtractConfig(model=partner, out=str(work / "partner.zarr"), corpus=cfg.corpus, sites=cfg.head_site,
                             layers="all", dtype=cfg.dtype, max_tokens=cfg.tokens, max_chars=cfg.max_chars,
                             unit_tokens=cfg.unit_tokens, batch_tokens=cfg.batch_tokens, workers=0)
        _, _, pmeta = prepare(pcfg)
        n_tgt = len(pmeta["layers"])
        self.src_layer = round(cfg.head_depth * (n_src - 1))
        self.tgt_layer = round(cfg.head_depth * (n_tgt - 1))
        if self.src_layer not in m.layers:
            raise ValueError(f"(c) needs layer {self.src_layer} of {cfg.model} (depth {cfg.head_depth}); "
                             f"--layers {cfg.layers} lacks it")
        pcfg.layers = str(self.tgt_layer)
        parse_layers(pcfg.layers, n_tgt)
        log(f"(c) extracting {partner} layer {self.tgt_layer} {cfg.head_site} (not timed)")
        run_extract(pcfg, progress=False)
        self.partner_store = Path(pcfg.out)
        _, self.partner_plan, _ = prepare(pcfg)
        self.partner_lm = load_model(partner)
        self.src_store = m.store_path
        run_align(AlignConfig(src_store=str(self.src_store), tgt_store=str(self.partner_store),
                              out=str(work / "align"), force=True))
        pairs = load_alignment(work / "align").pairs()
        self.src_rows, self.tgt_rows = pairs["src_row"], pairs["tgt_row"]
        d = TrainHeadsConfig(src_store="", tgt_store="", align="", layermap="", out="")
        self.opts = {k: getattr(d, k) for k in ("hidden", "batch_size", "lr", "weight_decay", "cosine_weight", "seed",
                                                 "memory_budget_mb", "block_rows")}
        self.steps = 0

    def _loader(self, x, y, stats, budget_mb: float):
        from heads.data import PairLoader

        (xm, xv), (ym, yv) = stats
        return PairLoader(x=x, y=y, x_rows=self.src_rows, y_rows=self.tgt_rows,
                          x_mean=xm, x_std=np.sqrt(xv) + 1e-6, y_mean=ym, y_std=np.sqrt(yv) + 1e-6,
                          batch_size=self.opts["batch_size"], block_rows=self.opts["block_rows"],
                          memory_budget_mb=budget_mb, seed=self.opts["seed"])

    def _store_epoch(self, budget_mb: float) -> float:
        import storage

        site = self.cfg.head_site
        t0 = time.perf_counter()
        src, tgt = storage.open_store(self.src_store), storage.open_store(self.partner_store)
        x, y = src.array(self.src_layer, site), tgt.array(self.tgt_layer, site)
        loader = self._loader(x, y, (src.stats(self.src_layer, site), tgt.stats(self.tgt_layer, site)), budget_mb)
        self.steps = train_epoch(loader, x.shape[1], y.shape[1], self.cfg.head_kind, self.opts)
        return time.perf_counter() - t0

    def store_kept(self, rep: int) -> float:
        """PairLoader's default: the pairs fit the budget, read once and kept."""
        return self._store_epoch(self.opts["memory_budget_mb"] / 2)

    def store_streamed(self, rep: int) -> float:
        """Budget 0: every block read from the stores during the epoch (data > memory)."""
        return self._store_epoch(0)

    def recompute(self, rep: int) -> float:
        import dask.array as da

        site, bt = self.cfg.head_site, self.cfg.batch_tokens
        t0 = time.perf_counter()
        xa = recompute_site(self.m.lm, self.m.plan, self.src_layer, site, bt)
        ya = recompute_site(self.partner_lm, self.partner_plan, self.tgt_layer, site, bt)
        stats = ((xa.mean(0, dtype=np.float64), xa.var(0, dtype=np.float64)),
                 (ya.mean(0, dtype=np.float64), ya.var(0, dtype=np.float64)))
        loader = self._loader(da.from_array(xa, chunks=(8192, xa.shape[1])),
                              da.from_array(ya, chunks=(8192, ya.shape[1])), stats, float("inf"))
        self.steps = train_epoch(loader, xa.shape[1], ya.shape[1], self.cfg.head_kind, self.opts)
        return time.perf_counter() - t0
