"""Committing files and directories atomically, and hashing them.

Every artifact CAST writes (a store unit and its manifest row, an alignment, a layer map,
a head, a head index, a LoRA adapter, a bridged artifact, a converted checkpoint, the
normalised corpus) is first written under a temporary name beside its final path and
then renamed onto it. A rename within one directory is atomic, so a reader sees the old
artifact or the new one, never half of one, and a run killed mid-write leaves only a
`.tmp-*` entry that the next run ignores or removes. On object storage, where there is no
rename, the artifact is staged on local disk and uploaded with its marker object last
(storage.fs.upload). See docs/design.md#commit-protocol.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from storage.fs import as_path, is_url, staged

TMP_PREFIX = ".tmp-"


def temp_path(final: str | Path) -> Path:
    """A fresh hidden name in `final`'s directory (same filesystem, so the rename is atomic)."""
    final = Path(final)
    return final.parent / f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def commit(staged: str | Path, final: str | Path, keep: str | None = None) -> bool:
    """Rename a fully written file or directory onto `final`, replacing what is there.

    keep: a marker file name. If `final/keep` exists, `final` is a finished copy that
    another process committed first (two runs fetching the same model): it is kept and
    `staged` discarded. A directory at `final` without the marker is a leftover of a
    killed run and is replaced. Returns whether `staged` was the one committed.
    """
    staged, final = Path(staged), Path(final)
    if keep and (final / keep).exists():
        _remove(staged)
        return False
    if final.is_dir() and not final.is_symlink():
        shutil.rmtree(final)
    try:
        os.replace(staged, final)
    except OSError:
        if keep and (final / keep).exists():  # the other process won the race
            _remove(staged)
            return False
        raise
    return True


@contextmanager
def atomic_path(final: str | Path, keep: str | None = None):
    """Yield a temporary path beside `final`; create a file or a directory there.
    On normal exit it is committed onto `final` (see `commit`); on an exception it is
    removed and `final` is left as it was. `final` may be an object-store URL: the path
    yielded is then a local one, uploaded onto `final` on exit (storage.fs.upload)."""
    if is_url(final):
        with staged(as_path(final), keep) as tmp:
            yield tmp
        return
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    try:
        yield tmp
        commit(tmp, final, keep)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_text(final: str | Path, text: str) -> None:
    """Write a text file whole or not at all."""
    with atomic_path(final) as tmp:
        tmp.write_text(text)


def sha256_file(path: str | Path, bufsize: int = 1 << 20) -> str:
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
