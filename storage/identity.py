"""What identifies an activation store to the artifacts derived from it.

An alignment, a layer map and a head set each record the identity of the two stores they
were made from (models, weights, tokenizers, corpus, segmentation, token count; not the
path, which may move). Reading such an artifact against other stores is an error that
names every differing field, never a silent mix-up. See docs/design.md#artifacts.
"""
from __future__ import annotations

from pathlib import Path

from storage.layout import StoreError
from storage.reader import ActivationStore

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
