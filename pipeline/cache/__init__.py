"""Cache stage: text corpora, models by name, activation hooks, and extraction into
activation stores. Also where fetched models, corpora and converted checkpoints live
between runs (`cache_dir`), and the bucket they are shared through when the nodes of a
cluster have no shared disk (`from_shared`, `to_shared`)."""
from __future__ import annotations

import os
from pathlib import Path

from storage.files import atomic_path
from storage.fs import RemotePath, as_path, check_location, copy_to_local, is_url


def cache_dir() -> Path:
    """The local cache root: $CAST_CACHE, else ~/.cache/cast. Created on first use. When
    $CAST_CACHE is an object-store URL (a cache shared through a bucket), the local root is
    $CAST_LOCAL_CACHE, else ~/.cache/cast: libraries load checkpoints from local disk only."""
    value = os.environ.get("CAST_CACHE")
    if value and is_url(value):
        value = os.environ.get("CAST_LOCAL_CACHE")
    root = Path(value or Path.home() / ".cache" / "cast")
    root.mkdir(parents=True, exist_ok=True)
    return root


def shared_cache() -> RemotePath | None:
    """$CAST_CACHE when it is an object-store URL (checked: backend installed, bucket there)."""
    value = os.environ.get("CAST_CACHE")
    if not value or not is_url(value):
        return None
    check_location(value)
    return as_path(value)


def _mirror(local: Path) -> RemotePath | None:
    shared = shared_cache()
    return shared / local.relative_to(cache_dir()).as_posix() if shared else None


def from_shared(local: Path, marker: str | None = None) -> bool:
    """Fill `local` (a file, or a directory whose `marker` file says it is complete) from
    the shared cache if another node put it there; whether it is here now."""
    remote = _mirror(local)
    if remote is None or not (remote / marker if marker else remote).exists():
        return False
    with atomic_path(local, keep=marker) as tmp:  # another process may fill it first: kept
        copy_to_local(remote, tmp)
    return True


def to_shared(local: Path, marker: str | None = None) -> None:
    """Offer a finished file or directory of the local cache to the other nodes (once)."""
    remote = _mirror(local)
    if remote is not None and not (remote / marker if marker else remote).exists():
        with atomic_path(remote, keep=marker) as tmp:  # uploaded with the marker last
            copy_to_local(local, tmp)
