"""`cast align` and `cast layermap`: the alignment stage."""
from __future__ import annotations

import json

from jobs.args import Command, add_dataclass_args, to_dataclass


def cmd_align(ns) -> int:
    from pipeline.align.pairs import AlignConfig, format_alignment, run_align

    meta = run_align(to_dataclass(AlignConfig, ns))
    print(json.dumps(meta, indent=2) if ns.json else format_alignment(meta))
    return 0


def cmd_layermap(ns) -> int:
    from pipeline.align.layermap import LayermapConfig, format_layermap, run_layermap

    cfg = to_dataclass(LayermapConfig, ns)
    meta = run_layermap(cfg, progress=not ns.quiet)
    print(json.dumps(meta, indent=2) if ns.json else format_layermap(meta))
    print(f"wrote {cfg.out}/layermap.json and {cfg.out}/{meta['heatmap']}")
    return 0


def _align_args(p) -> None:
    from pipeline.align.pairs import AlignConfig

    add_dataclass_args(p, AlignConfig, positional=("src_store", "tgt_store"))
    p.add_argument("--json", action="store_true", help="print align.json instead of a summary")


def _layermap_args(p) -> None:
    from pipeline.align.layermap import LayermapConfig

    add_dataclass_args(p, LayermapConfig, positional=("src_store", "tgt_store"))
    p.add_argument("--json", action="store_true", help="print layermap.json instead of a table")
    p.add_argument("--quiet", action="store_true", help="no per-layer progress lines")


ALIGN = Command(
    help="pair source and target tokens that end at the same character",
    description="Pair the tokens of two stores extracted over the same corpus segmentation: a source and a "
    "target token are aligned when they end at the same character of the same segment (both models have read "
    "the same prefix). BOS and other zero-width tokens are never aligned. Writes OUT/pairs.parquet (global row "
    "indices into each store) and OUT/align.json (both stores' identities, counts, coverage per side). Streams "
    "the token metadata unit by unit. Stores from different corpora or --max-chars are refused.",
    add_args=_align_args, run=cmd_align)

LAYERMAP = Command(
    help="CKA between every source and target layer; monotone layer map + heatmap",
    description="Measure linear CKA between every source layer and every target layer on a seeded sample of "
    "aligned pairs (read chunk by chunk from the stores, never the whole store), choose a monotone assignment "
    "target layer -> source layer by dynamic programming (maximum total CKA), and compare it with the "
    "relative-depth assignment. Writes OUT/layermap.json (read by head training via "
    "storage.artifacts.load_layermap) and OUT/heatmap.png with both paths drawn.",
    add_args=_layermap_args, run=cmd_layermap)
