"""`cast align` and `cast layermap`: the alignment stage."""
from __future__ import annotations

import json

from jobs.args import Command, to_dataclass


def cmd_align(ns) -> int:
    """Pair the tokens of two stores extracted over the same corpus segmentation: a source
    and a target token are aligned when they end at the same character of the same segment
    (both models have read the same prefix). BOS and other zero-width tokens are never
    aligned. Writes OUT/pairs.parquet (global row indices into each store) and
    OUT/align.json (both stores' identities, counts, coverage per side). Streams the token
    metadata unit by unit. Stores from different corpora or --max-chars are refused."""
    from pipeline.align.pairs import AlignConfig, format_alignment, run_align

    meta = run_align(to_dataclass(AlignConfig, ns))
    print(json.dumps(meta, indent=2) if ns.json else format_alignment(meta))
    return 0


def cmd_layermap(ns) -> int:
    """Measure linear CKA between every source layer and every target layer on a seeded
    sample of aligned pairs (read chunk by chunk from the stores, never the whole store),
    choose a monotone assignment target layer -> source layer by dynamic programming
    (maximum total CKA), and compare it with the relative-depth assignment. Writes
    OUT/layermap.json (read by head training via storage.artifacts.load_layermap) and
    OUT/heatmap.png with both paths drawn."""
    from pipeline.align.layermap import LayermapConfig, format_layermap, run_layermap

    cfg = to_dataclass(LayermapConfig, ns)
    meta = run_layermap(cfg, progress=not ns.quiet)
    print(json.dumps(meta, indent=2) if ns.json else format_layermap(meta))
    print(f"wrote {cfg.out}/layermap.json and {cfg.out}/{meta['heatmap']}")
    return 0


def _json_flag(what: str):
    return lambda p: p.add_argument("--json", action="store_true", help=f"print {what}")


STORES = ("src_store", "tgt_store")
ALIGN = Command("pair source and target tokens that end at the same character", cmd_align,
                config="pipeline.align.pairs:AlignConfig", positional=STORES,
                add_args=_json_flag("align.json instead of a summary"))
LAYERMAP = Command("CKA between every source and target layer; monotone layer map + heatmap", cmd_layermap,
                   config="pipeline.align.layermap:LayermapConfig", positional=STORES,
                   add_args=_json_flag("layermap.json instead of a table"), quiet="no per-layer progress lines")
