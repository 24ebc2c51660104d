"""Cross-tokenizer alignment of two activation stores (docs/design.md#alignment-and-layer-map).

Two stores built over the same corpus and segmentation hold the same text, cut into
tokens differently. A source token and a target token are *aligned* when they sit in the
same segment and end at the same character: at that point both models have read exactly
the same prefix, so their activations describe the same context and can be regressed on
each other.

    cast align runs/source.zarr runs/target.zarr --out runs/align
    al = storage.artifacts.load_alignment("runs/align")   # how later stages read it
    src_rows, tgt_rows = al.sample(4096, seed=0)

The artifact is a directory: `pairs.parquet` (int64 src_row, tgt_row, segment_id,
char_end, src_pos, tgt_pos; rows are global row indices into `store.array(...)`, sorted
by src_row; positions are each token's index in its model's input sequence) and
`align.json` (both stores' identities, counts, coverage per side).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import storage
from storage.artifacts import (ALIGN_JSON, ALIGN_KIND, ALIGN_VERSION, IDENTITY_FIELDS, PAIRS_FILE, PAIRS_SCHEMA,
                               check_same_text, store_identity)
from storage.files import atomic_path
from storage.fs import as_path
from storage.layout import StoreError
from storage.reader import ActivationStore

META_FIELDS = ("segment_id", "char_start", "char_end", "position")


@dataclass
class AlignConfig:
    """What `cast align` does; every field is a flag of the same name."""

    src_store: str
    """Source activation store (the LoRA's base model), made by `cast extract`."""
    tgt_store: str
    """Target activation store, made by `cast extract` over the same corpus and --max-chars."""
    out: str
    """Alignment directory or object-store URL to write (pairs.parquet + align.json)."""
    force: bool = False
    """Replace an existing alignment at --out even if it was made from other stores."""
    row_group: int = 262_144
    """Pairs buffered before a Parquet row group is written (bounds memory)."""

    def __post_init__(self):
        if self.row_group < 1:
            raise ValueError(f"--row-group must be at least 1, got {self.row_group}")


# ----------------------------------------------------------------------------- pure core


def text_end_keys(segment_id: np.ndarray, start: np.ndarray, end: np.ndarray):
    """(keys, index) of the tokens that may be aligned, one per (segment, end offset).

    Zero-width tokens (BOS/EOS and other specials, offsets like (0, 0)) carry no text and
    are never aligned. Where several tokens end at the same character (a byte-level BPE
    splitting one character into bytes), only the last has read the whole prefix, so the
    last one represents that end.
    """
    ok = (end > start) & (end > 0)
    idx = np.flatnonzero(ok)
    keys = (segment_id[idx].astype(np.int64) << 32) | end[idx].astype(np.int64)
    # np.unique keeps the first occurrence: run it on the reversed order to keep the last.
    rev_keys, rev_first = np.unique(keys[::-1], return_index=True)
    return rev_keys, idx[::-1][rev_first]


def match_ends(src: dict[str, np.ndarray], tgt: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Indices (i into src, j into tgt) of aligned tokens, sorted by i.

    src/tgt: dicts of equal-length arrays segment_id, char_start, char_end.
    """
    ks, i = text_end_keys(src["segment_id"], src["char_start"], src["char_end"])
    kt, j = text_end_keys(tgt["segment_id"], tgt["char_start"], tgt["char_end"])
    _, a, b = np.intersect1d(ks, kt, assume_unique=True, return_indices=True)
    i, j = i[a], j[b]
    order = np.argsort(i, kind="stable")
    return i[order], j[order]


def align_offsets(src_offsets, tgt_offsets) -> list[tuple[int, int]]:
    """Aligned (src position, tgt position) pairs of one segment, from (start, end) lists."""
    def arrays(offs):
        o = np.asarray(list(offs), dtype=np.int64).reshape(-1, 2)
        return {"segment_id": np.zeros(len(o), np.int64), "char_start": o[:, 0], "char_end": o[:, 1]}

    i, j = match_ends(arrays(src_offsets), arrays(tgt_offsets))
    return list(zip(i.tolist(), j.tolist()))


# ----------------------------------------------------------------------------- stores


def _unit_blocks(store: ActivationStore):
    """Token metadata one committed unit at a time, with the unit's first global row."""
    tokens = store.tokens()
    row = 0
    for rec in store.manifest:
        n = rec["n_tokens"]
        block = {k: np.asarray(tokens[k][row:row + n].compute())
                 for k in META_FIELDS}
        block["row"] = np.arange(row, row + n, dtype=np.int64)
        yield block
        row += n


class _Side:
    """A read-ahead buffer over one store's units. Segments are complete up to the
    buffer's last segment minus one until the store is exhausted (a unit never splits a
    segment today, but nothing here relies on that)."""

    def __init__(self, store: ActivationStore):
        self.blocks, self.buf, self.done, self.last_seg = _unit_blocks(store), None, False, -1
        self.where = str(store.path)

    def complete_upto(self) -> float:
        if self.done:
            return float("inf")
        return -1 if self.buf is None or not len(self.buf["row"]) else int(self.buf["segment_id"][-1]) - 1

    def pull(self) -> None:
        try:
            blk = next(self.blocks)
        except StopIteration:
            self.done = True
            return
        seg = blk["segment_id"]
        if len(seg) and (np.any(np.diff(seg) < 0) or seg[0] < self.last_seg):
            raise StoreError(f"{self.where}: segment ids are not in corpus order across units; "
                             f"the store is damaged (run `cast verify {self.where}`)")
        if len(seg):
            self.last_seg = int(seg[-1])
        self.buf = blk if self.buf is None else {k: np.concatenate([self.buf[k], blk[k]]) for k in blk}

    def take(self, upto: float) -> dict[str, np.ndarray]:
        if self.buf is None:
            return {k: np.zeros(0, np.int64) for k in (*META_FIELDS, "row")}
        cut = int(np.searchsorted(self.buf["segment_id"], upto, side="right")) if upto != float("inf") \
            else len(self.buf["row"])
        out = {k: v[:cut] for k, v in self.buf.items()}
        self.buf = {k: v[cut:] for k, v in self.buf.items()}
        return out


def _stream_pairs(src: ActivationStore, tgt: ActivationStore, counts: dict):
    """Yield (src_row, tgt_row, segment_id, char_end, src_pos, tgt_pos) batches over segments present in
    both stores, holding at most about two units per store in memory."""
    s, t = _Side(src), _Side(tgt)
    while True:
        upto = min(s.complete_upto(), t.complete_upto())
        if upto >= 0:
            a, b = s.take(upto), t.take(upto)
            shared = np.intersect1d(a["segment_id"], b["segment_id"])
            counts["segments_src"] += len(np.unique(a["segment_id"]))
            counts["segments_tgt"] += len(np.unique(b["segment_id"]))
            counts["segments_shared"] += len(shared)
            a = {k: v[np.isin(a["segment_id"], shared)] for k, v in a.items()}
            b = {k: v[np.isin(b["segment_id"], shared)] for k, v in b.items()}
            for side, blk in (("src", a), ("tgt", b)):
                counts[f"tokens_{side}"] += len(blk["row"])
                counts[f"text_tokens_{side}"] += int(((blk["char_end"] > blk["char_start"])
                                                      & (blk["char_end"] > 0)).sum())
            i, j = match_ends(a, b)
            if len(i):
                yield (a["row"][i], b["row"][j], a["segment_id"][i], a["char_end"][i],
                       a["position"][i], b["position"][j])
        if s.done and t.done:
            return
        # Read ahead on whichever side holds back the frontier.
        (s if (s.complete_upto() <= t.complete_upto() and not s.done) or t.done else t).pull()


# ----------------------------------------------------------------------------- artifact


def run_align(cfg: AlignConfig) -> dict:
    """Pair the two stores' tokens and write the alignment artifact; returns align.json."""
    t0 = time.perf_counter()
    src, tgt = storage.open_store(cfg.src_store), storage.open_store(cfg.tgt_store)
    check_same_text(src, tgt)
    out = as_path(cfg.out)
    ident = {"source": store_identity(src), "target": store_identity(tgt)}
    if (out / ALIGN_JSON).exists() and not cfg.force:
        old = json.loads((out / ALIGN_JSON).read_text())
        same = all(old.get(r, {}).get(k) == ident[r][k] for r in ident for k in IDENTITY_FIELDS)
        if same:
            print(f"[cast] {out} is already the alignment of these stores; nothing to do", file=sys.stderr)
            return old
        raise StoreError(f"--out {out} holds an alignment of other stores; pass --force to replace "
                         f"it or choose another --out")
    if out.exists() and not (out / ALIGN_JSON).exists() and any(out.iterdir()):
        raise StoreError(f"--out {out} exists, is not empty and is not an alignment; choose another --out")

    counts = {k: 0 for k in ("segments_src", "segments_tgt", "segments_shared", "tokens_src",
                             "tokens_tgt", "text_tokens_src", "text_tokens_tgt")}
    n_pairs, pending = 0, []
    # --force, or an empty directory: replaced whole when the new alignment is complete.
    with atomic_path(out) as tmp:
        tmp.mkdir()
        with pq.ParquetWriter(tmp / PAIRS_FILE, PAIRS_SCHEMA) as writer:
            def flush():
                cols = [np.concatenate(c) for c in zip(*pending)]
                writer.write_table(pa.Table.from_arrays(cols, schema=PAIRS_SCHEMA))
                pending.clear()

            buffered = 0
            for batch in _stream_pairs(src, tgt, counts):
                pending.append(batch)
                n_pairs += len(batch[0])
                buffered += len(batch[0])
                if buffered >= cfg.row_group:
                    flush()
                    buffered = 0
            if pending:
                flush()
        if n_pairs == 0:
            raise StoreError(f"stores {src.path} and {tgt.path} share no aligned tokens "
                             f"({counts['segments_shared']} shared segments); nothing to write")
        meta = {
            "kind": ALIGN_KIND, "version": ALIGN_VERSION, **ident, "n_pairs": n_pairs, "counts": counts,
            "coverage": {"source": n_pairs / max(1, counts["text_tokens_src"]),
                         "target": n_pairs / max(1, counts["text_tokens_tgt"])},
            "coverage_note": "aligned / text tokens (non-zero-width) in segments present in both stores",
            "seconds": time.perf_counter() - t0,
        }
        (tmp / ALIGN_JSON).write_text(json.dumps(meta, indent=2))
    return meta


def format_alignment(meta: dict) -> str:
    c, cov = meta["counts"], meta["coverage"]
    return "\n".join([
        f"source   {meta['source']['model']}  {meta['source']['path']}  ({meta['source']['n_tokens']:,} tokens)",
        f"target   {meta['target']['model']}  {meta['target']['path']}  ({meta['target']['n_tokens']:,} tokens)",
        f"segments {c['segments_shared']:,} shared ({c['segments_src']:,} in source, {c['segments_tgt']:,} in target)",
        f"pairs    {meta['n_pairs']:,}",
        f"coverage source {cov['source']:.1%} of {c['text_tokens_src']:,} text tokens, "
        f"target {cov['target']:.1%} of {c['text_tokens_tgt']:,}",
    ])
