"""Cross-tokenizer alignment of two activation stores (DESIGN §6).

Two stores built over the same corpus and segmentation hold the same text, cut into
tokens differently. A source token and a target token are *aligned* when they sit in the
same segment and end at the same character: at that point both models have read exactly
the same prefix, so their activations describe the same context and can be regressed on
each other.

    cast align runs/source.zarr runs/target.zarr --out runs/align
    al = load_alignment("runs/align")          # Alignment
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
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import storage
from storage.files import atomic_path
from storage.layout import StoreError
from storage.reader import ActivationStore

ALIGN_JSON = "align.json"
PAIRS_FILE = "pairs.parquet"
ALIGN_KIND = "cast.alignment"
ALIGN_VERSION = 1
PAIRS_SCHEMA = pa.schema([("src_row", pa.int64()), ("tgt_row", pa.int64()),
                          ("segment_id", pa.int64()), ("char_end", pa.int64()),
                          ("src_pos", pa.int64()), ("tgt_pos", pa.int64())])
META_FIELDS = ("segment_id", "char_start", "char_end", "position")
# Fields that must agree between two stores before their tokens can be paired: the same
# documents (corpus hash) cut into the same segments (segmentation hash, max_chars).
SHARED_FIELDS = (("corpus hash", ("corpus", "hash")),
                 ("segmentation hash", ("corpus", "segmentation_hash")),
                 ("max_chars", ("corpus", "max_chars")))
# What identifies a store for an artifact derived from it (its path may move).
IDENTITY_FIELDS = ("model", "weights_hash", "tokenizer_hash", "corpus_hash", "segmentation_hash",
                   "max_chars", "n_tokens")


@dataclass
class AlignConfig:
    """What `cast align` does; every field is a flag of the same name."""

    src_store: str
    """Source activation store (the LoRA's base model), made by `cast extract`."""
    tgt_store: str
    """Target activation store, made by `cast extract` over the same corpus and --max-chars."""
    out: str
    """Alignment directory to write (pairs.parquet + align.json)."""
    force: bool = False
    """Replace an existing alignment at --out even if it was made from other stores."""
    row_group: int = 262_144
    """Pairs buffered before a Parquet row group is written (bounds memory)."""


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
            + f"\nRe-run `cast align` on the stores you mean to use, then pass its output.")


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
    out = Path(cfg.out)
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
        for rb in pq.ParquetFile(self.path / PAIRS_FILE).iter_batches(batch_size=batch_rows):
            yield {name: rb.column(name).to_numpy() for name in PAIRS_SCHEMA.names}

    def pairs(self) -> dict[str, np.ndarray]:
        """All pairs at once (16 bytes per pair per column): fine for small corpora."""
        return {k: v.to_numpy() for k, v in zip(PAIRS_SCHEMA.names, pq.read_table(self.path / PAIRS_FILE).columns)}

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
    path = Path(path)
    f = path / ALIGN_JSON
    if not f.exists() or not (path / PAIRS_FILE).exists():
        raise StoreError(f"{path} is not an alignment (needs {ALIGN_JSON} and {PAIRS_FILE}); "
                         f"make one with `cast align SRC_STORE TGT_STORE --out {path}`")
    meta = json.loads(f.read_text())
    if meta.get("kind") != ALIGN_KIND:
        raise StoreError(f"{f} is not a CAST alignment (kind {meta.get('kind')!r})")
    return Alignment(path=path, meta=meta)


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
