"""Cache stage: text corpora, models by name, activation hooks, and extraction into
activation stores. Also where fetched models, corpora and converted checkpoints live
between runs (`cache_dir`)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: $CAST_CACHE, else ~/.cache/cast. Created on first use."""
    root = Path(os.environ.get("CAST_CACHE") or Path.home() / ".cache" / "cast")
    root.mkdir(parents=True, exist_ok=True)
    return root
