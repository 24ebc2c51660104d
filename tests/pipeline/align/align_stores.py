"""Small stores shared by test_align.py and test_layermap.py, built once per session.

Two tiny models with different tokenizers over the same hand-written corpus, plus a
store whose segmentation differs, so every alignment and refusal path has real input.
"""
from __future__ import annotations

from pathlib import Path

SENTENCES = [
    "The morning market opened early, and the baker sold forty loaves before seven.",
    "A small green boat drifted slowly under the old stone bridge near the city.",
    "She wrote a letter to her brother, who lived in a house between two rivers.",
    "Eleven children jumped into the cold water, laughing at the quick grey fish.",
    "People in the garden talked about the weather, the harvest and the new road.",
    "When evening came, the light in the window glowed like a lantern on the hill.",
    "Our neighbour's café sells crème brûlée on Sundays; it costs 4.50 and is worth it.",
    "Numbers like 1234 and 98765 split differently in different tokenizers, which is fine.",
]

_built: dict[str, Path] = {}


def build(root: Path) -> dict[str, Path]:
    """{name: store path}: llama (source), gemma (target, fewer segments via --max-tokens),
    gemma_seg (other --max-chars). Memoised: both test modules share one set."""
    if _built:
        return _built
    from pipeline.cache.extract import ExtractConfig, run_extract

    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "a.txt").write_text("\n".join(SENTENCES[:4]) + "\n", encoding="utf-8")
    (corpus / "b.txt").write_text(" ".join(SENTENCES[4:]) + "\n", encoding="utf-8")

    def extract(name, model, **kw):
        cfg = dict(model=model, out=str(root / f"{name}.zarr"), corpus=str(corpus), workers=0,
                   sites="resid", dtype="float32", max_chars=120, unit_tokens=64)
        cfg.update(kw)
        run_extract(ExtractConfig(**cfg), progress=False)
        _built[name] = root / f"{name}.zarr"

    # Tiny models are built locally (never fetched) into the test cache that
    # tests/conftest.py points CAST_CACHE at.
    extract("llama", "tiny-llama")
    extract("gemma", "tiny-gemma3", max_tokens=200, unit_tokens=48)  # fewer segments, other unit cuts
    extract("gemma_seg", "tiny-gemma3", max_chars=90)
    return _built
