"""Synthetic stores whose target activations are a known function of the source's, with
identical tokenizations (every token aligned), plus their alignment and layer map made
by the real `align` / `layermap` code."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.align.pairs import AlignConfig, run_align
from pipeline.align.layermap import LayermapConfig, run_layermap
from storage.layout import FORMAT_VERSION, encode
from storage.writer import create_store, write_unit

SITES = ["resid", "attn_in"]


def _meta(name: str, dim: int, plan) -> dict:
    return {
        "format_version": FORMAT_VERSION, "code_version": "test",
        "model": {"name": name, "weights_hash": f"w-{name}", "tokenizer_hash": "shared-tok"},
        "corpus": {"name": "synthetic", "hash": "c0", "source": {}, "max_chars": 100, "segmentation_hash": "s0"},
        "sites": SITES, "layers": [0], "dims": {s: dim for s in SITES}, "dtype": "float32",
        "max_tokens": 0, "unit_tokens": 0, "plan": plan,
    }


def build(root: Path, fn, n_tokens: int = 6000, d_src: int = 16, d_tgt: int = 12, seed: int = 0,
          sink: float = 1.0) -> dict:
    """Source X ~ N(0, 1) (with per-dim scales); target Y = fn(X). Returns artifact paths.
    sink > 1 makes every segment's position-0 row an outlier, sink·(x + 1), as attention sinks are."""
    rng = np.random.default_rng(seed)
    seg_len, per_unit = 50, 1000
    x = (rng.standard_normal((n_tokens, d_src)) * rng.uniform(0.5, 3, d_src)).astype(np.float32)
    if sink != 1.0:
        x[::seg_len] = sink * (x[::seg_len] + 1)
    y = np.asarray(fn(x), dtype=np.float32)
    assert y.shape == (n_tokens, d_tgt)
    plan = [[u * per_unit // seg_len, (u + 1) * per_unit // seg_len - 1, per_unit]
            for u in range(n_tokens // per_unit)]
    paths = {}
    for name, data in (("src", x), ("tgt", y)):
        out = root / f"{name}.zarr"
        create_store(out, _meta(name, data.shape[1], plan))
        for u, (first, last, n) in enumerate(plan):
            rows = slice(u * per_unit, (u + 1) * per_unit)
            pos = np.tile(np.arange(seg_len), per_unit // seg_len)
            tokens = {"token_id": pos % 7, "segment_id": np.repeat(np.arange(first, last + 1), seg_len),
                      "char_start": pos * 5, "char_end": pos * 5 + 4, "position": pos}
            block = torch.from_numpy(data[rows])
            acts = {(0, s): encode(block, "float32", "synthetic") for s in SITES}
            b64 = block.double()
            stats = {(0, s): torch.stack([b64.sum(0), (b64 * b64).sum(0)]).numpy() for s in SITES}
            write_unit(out, u, tokens, acts, stats, "float32", (first, last), 0.0)
        paths[name] = out
    run_align(AlignConfig(src_store=str(paths["src"]), tgt_store=str(paths["tgt"]), out=str(root / "align")))
    run_layermap(LayermapConfig(src_store=str(paths["src"]), tgt_store=str(paths["tgt"]),
                                align=str(root / "align"), out=str(root / "map")))
    return {"src_store": str(paths["src"]), "tgt_store": str(paths["tgt"]),
            "align": str(root / "align"), "layermap": str(root / "map")}
