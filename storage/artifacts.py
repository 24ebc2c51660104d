"""The artifacts derived from activation stores: what identifies a store to them, and
reading the alignment stage's output for every later stage.

    al = load_alignment("runs/align")       # pairs.parquet + align.json (`cast align`)
    src_rows, tgt_rows = al.sample(4096, seed=0)
    lm = load_layermap("runs/layermap")     # layermap.json (`cast layermap`)
    for src_layer, tgt_layer in lm.pairs(): ...

An alignment, a layer map and a head set each record the identity of the two stores they
were made from (models, weights, tokenizers, corpus, segmentation, token count; not the
path, which may move); reading one against other stores is an error naming every field
that differs, never a silent mix-up. This lives below both the pipeline and heads/, so
head training reads these artifacts without depending on the stage that writes them.

Every artifact's JSON names its kind (`cast.<artifact>`) and a version; `is_kind` also
accepts the names older releases wrote. Formats: docs/design.md#artifacts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.fs import arrow_source, as_path, check_location
from storage.layout import StoreError
from storage.reader import ActivationStore

ALIGN_JSON = "align.json"
PAIRS_FILE = "pairs.parquet"
ALIGN_VERSION = 1
PAIRS_SCHEMA = pa.schema([("src_row", pa.int64()), ("tgt_row", pa.int64()),
                          ("segment_id", pa.int64()), ("char_end", pa.int64()),
                          ("src_pos", pa.int64()), ("tgt_pos", pa.int64())])
LAYERMAP_JSON = "layermap.json"
HEATMAP_PNG = "heatmap.png"
LAYERMAP_VERSION = 1

ALIGN_KIND = "cast.alignment"
LAYERMAP_KIND = "cast.layermap"
HEADS_KIND = "cast.heads"
BRIDGED_KIND = "cast.bridged"
PROXY_KIND = "cast.proxy"
# Kind names written before they were made uniform; artifacts carrying them still load.
OLD_KINDS = {HEADS_KIND: ("cast-heads",), BRIDGED_KIND: ("cast-bridged",)}


def is_kind(meta: dict, kind: str) -> bool:
    """Whether an artifact's JSON says it is a `kind` (under its current or an older name)."""
    return meta.get("kind") in (kind, *OLD_KINDS.get(kind, ()))


# Fields that must agree between two stores before their tokens can be paired: the same
# documents (corpus hash) cut into the same segments (segmentation hash, max_chars).
SHARED_FIELDS = (("corpus hash", ("corpus", "hash")),
                 ("segmentation hash", ("corpus", "segmentation_hash")),
                 ("max_chars", ("corpus", "max_chars")))
# What identifies a store for an artifact derived from it (its path may move).
IDENTITY_FIELDS = ("model", "weights_hash", "tokenizer_hash", "corpus_hash", "segmentation_hash",
                   "max_chars", "n_tokens")


def store_identity(store: ActivationStore) -> dict:
    """What an artifact derived from `store` records about it, to refuse a mix-up later."""
    m, c = store.meta["model"], store.meta["corpus"]
    return {"path": str(store.path), "model": m["name"], "weights_hash": m["weights_hash"],
            "tokenizer_hash": m["tokenizer_hash"], "corpus_hash": c["hash"],
            "segmentation_hash": c["segmentation_hash"], "max_chars": c["max_chars"],
            "n_tokens": store.n_tokens, "units": len(store.units)}


def check_same_text(src: ActivationStore, tgt: ActivationStore) -> None:
    """Refuse two stores whose segment ids do not denote the same text."""
    for label, keys in SHARED_FIELDS:
        a, b = src.meta, tgt.meta
        for k in keys:
            a, b = a.get(k), b.get(k)
        if a != b:
            raise StoreError(
                f"stores {src.path} and {tgt.path} differ in {label} ({a!r} vs {b!r}): they were not "
                f"extracted from the same corpus segmentation, so their tokens cannot be aligned. "
                f"Re-extract one with the other's --corpus and --max-chars.")


def check_identity(recorded: dict, store: ActivationStore, role: str, artifact: Path) -> None:
    """Raise if `store` is not the store `artifact` was made from (as its `role`)."""
    have = store_identity(store)
    diffs = [f"{k}: {recorded.get(k)!r} in {artifact.name}, {have[k]!r} in {store.path}"
             for k in IDENTITY_FIELDS if recorded.get(k) != have[k]]
    if diffs:
        raise StoreError(
            f"{artifact} was made for another {role} store (recorded {recorded.get('path')}):\n  "
            + "\n  ".join(diffs)
            + "\nRe-run `cast align` on the stores you mean to use, then pass its output.")


@dataclass
class Alignment:
    """A loaded alignment artifact. Pairs stay on disk until asked for."""

    path: Path
    meta: dict
    """The whole align.json."""

    @property
    def n_pairs(self) -> int:
        return int(self.meta["n_pairs"])

    @property
    def source(self) -> dict:
        """Identity of the source store (model, hashes, n_tokens, path at alignment time)."""
        return self.meta["source"]

    @property
    def target(self) -> dict:
        return self.meta["target"]

    @property
    def coverage(self) -> dict:
        """{"source": fraction, "target": fraction} of text tokens aligned."""
        return self.meta["coverage"]

    def iter_batches(self, batch_rows: int = 262_144):
        """Pairs as dicts of int64 arrays (PAIRS_SCHEMA's columns), in order."""
        where, filesystem = arrow_source(self.path / PAIRS_FILE)
        for rb in pq.ParquetFile(where, filesystem=filesystem).iter_batches(batch_size=batch_rows):
            yield {name: rb.column(name).to_numpy() for name in PAIRS_SCHEMA.names}

    def pairs(self) -> dict[str, np.ndarray]:
        """All pairs at once (16 bytes per pair per column): fine for small corpora."""
        where, filesystem = arrow_source(self.path / PAIRS_FILE)
        table = pq.read_table(where, filesystem=filesystem)
        return {k: v.to_numpy() for k, v in zip(PAIRS_SCHEMA.names, table.columns)}

    def sample(self, n: int, seed: int = 0, min_position: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Up to n pairs drawn without replacement (seeded) among those whose tokens both
        sit at position >= min_position, as (src_rows, tgt_rows) sorted by row. Two
        streaming passes (count, then pick), so memory does not grow with the corpus."""
        def eligible(b):
            return (b["src_pos"] >= min_position) & (b["tgt_pos"] >= min_position)

        total = self.n_pairs if min_position <= 0 else sum(int(eligible(b).sum()) for b in self.iter_batches())
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(total, size=min(n, total), replace=False))
        src, tgt, base = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], 0
        for b in self.iter_batches():
            keep = np.flatnonzero(eligible(b))
            lo, hi = np.searchsorted(pick, [base, base + len(keep)])
            src.append(b["src_row"][keep[pick[lo:hi] - base]])
            tgt.append(b["tgt_row"][keep[pick[lo:hi] - base]])
            base += len(keep)
        return np.concatenate(src), np.concatenate(tgt)

    def check_stores(self, src: ActivationStore, tgt: ActivationStore) -> None:
        """Raise StoreError unless src/tgt are the stores this alignment was made from."""
        if store_identity(src)["model"] == self.target["model"] != self.source["model"]:
            raise StoreError(f"{self.path} aligns {self.source['model']} (source) to "
                             f"{self.target['model']} (target); the stores were given the other way round")
        check_identity(self.source, src, "source", self.path / ALIGN_JSON)
        check_identity(self.target, tgt, "target", self.path / ALIGN_JSON)


def load_alignment(path: str | Path) -> Alignment:
    """Open an alignment directory written by `cast align`."""
    path = as_path(path)
    f = path / ALIGN_JSON
    if not f.exists() or not (path / PAIRS_FILE).exists():
        check_location(path)
        raise StoreError(f"{path} is not an alignment (needs {ALIGN_JSON} and {PAIRS_FILE}); "
                         f"make one with `cast align SRC_STORE TGT_STORE --out {path}`")
    meta = json.loads(f.read_text())
    if not is_kind(meta, ALIGN_KIND):
        raise StoreError(f"{f} is not a CAST alignment (kind {meta.get('kind')!r})")
    return Alignment(path=path, meta=meta)


@dataclass
class LayerMap:
    """A loaded layermap.json: what head training needs to pick (source, target) layers."""

    path: Path
    site: str
    source_layers: list[int]
    target_layers: list[int]
    cka: np.ndarray
    """(len(source_layers), len(target_layers)) linear CKA."""
    mapping: dict[int, int]
    """target layer -> chosen source layer (monotone DP)."""
    relative_depth: dict[int, int]
    """target layer -> source layer at the same relative depth (baseline)."""
    total_cka: dict[str, float]
    """{"chosen": ..., "relative_depth": ...}: summed CKA of each map."""
    n_pairs: int
    source: dict
    """Source store identity (model, hashes, n_tokens, path)."""
    target: dict
    meta: dict = field(repr=False)
    """The whole layermap.json."""

    def pairs(self, which: str = "chosen") -> list[tuple[int, int]]:
        """(source layer, target layer) per target layer, shallow to deep."""
        m = self.mapping if which == "chosen" else self.relative_depth
        return [(m[t], t) for t in self.target_layers]

    def check_stores(self, src: ActivationStore, tgt: ActivationStore) -> None:
        """Raise StoreError unless src/tgt are the stores this map was measured on."""
        check_identity(self.source, src, "source", self.path)
        check_identity(self.target, tgt, "target", self.path)


def load_layermap(path: str | Path) -> LayerMap:
    """Open a layermap directory (or its layermap.json) written by `cast layermap`."""
    path = as_path(path)
    f = path if path.suffix == ".json" else path / LAYERMAP_JSON
    if not f.exists():
        check_location(path)
        raise StoreError(f"{f} not found; make it with `cast layermap SRC TGT --align ALIGN --out {path}`")
    meta = json.loads(f.read_text())
    if not is_kind(meta, LAYERMAP_KIND):
        raise StoreError(f"{f} is not a CAST layer map (kind {meta.get('kind')!r})")
    return LayerMap(
        path=f, site=meta["site"], source_layers=meta["source_layers"], target_layers=meta["target_layers"],
        cka=np.asarray(meta["cka"], dtype=np.float64),
        mapping={m["target_layer"]: m["source_layer"] for m in meta["map"]},
        relative_depth={m["target_layer"]: m["source_layer"] for m in meta["relative_depth_map"]},
        total_cka=meta["total_cka"], n_pairs=meta["n_pairs"], source=meta["source"], target=meta["target"],
        meta=meta)
