"""Where fetched models, corpora and converted checkpoints live between runs."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: $CAST_CACHE, else ~/.cache/cast. Created on first use."""
    root = Path(os.environ.get("CAST_CACHE") or Path.home() / ".cache" / "cast")
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")  # separator so ("ab","c") and ("a","bc") differ
    return h.hexdigest()


def commit_dir(staged: Path, final: Path, marker: str) -> None:
    """Move a fully written directory into place. If another process committed the same
    thing first (it holds `marker`), keep theirs; a leftover without the marker is a
    half-finished write from a killed run and is replaced."""
    import shutil

    if final.exists():
        if (final / marker).exists():
            return
        shutil.rmtree(final, ignore_errors=True)
    try:
        staged.rename(final)
    except OSError:
        if not (final / marker).exists():
            raise
