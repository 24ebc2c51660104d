"""Creating a store and committing whole units into it, atomically.

Each unit is written by exactly one worker into a private temp directory, renamed into
place (uploaded, on object storage), and only then recorded by a manifest row; no two
workers ever touch one shard. A store may live at a local path or an object-store URL
(storage.fs); the bytes written are the same.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from storage.chunks import write_array, write_groups
from storage.files import TMP_PREFIX, atomic_path
from storage.fs import arrow_source, as_path, rmtree
from storage.layout import (
    COMPRESSIONS, MANIFEST, META_KEY, STORAGE_DTYPES, TOKEN_FIELDS, UNITS, StoreError, act_path, stats_path,
    unit_name,
)

MANIFEST_SCHEMA = pa.schema([
    ("unit", pa.int64()),
    ("first_segment", pa.int64()),
    ("last_segment", pa.int64()),
    ("n_tokens", pa.int64()),
    ("nbytes", pa.int64()),
    ("hashes", pa.string()),     # JSON {array path: crc32c of each chunk (format 3: sha256 of its bytes)}
    ("seconds", pa.float64()),
    ("worker", pa.string()),
    ("committed_at", pa.float64()),
])


def create_store(path: Path, meta: dict) -> None:
    """Create an empty store whose root attrs hold `meta`; refuses to touch anything else."""
    path = as_path(path)
    if path.exists() and any(path.iterdir()):
        if (path / UNITS).exists() or (path / MANIFEST).exists():
            raise StoreError(f"{path} holds the remains of a store whose root (zarr.json) is gone, so it cannot "
                             f"be resumed; delete {path} and rerun the same `cast extract` to start over")
        raise StoreError(f"{path} exists and is not empty; refusing to overwrite it")
    with atomic_path(path) as tmp:  # the root zarr.json lands last: a store is whole once it is there
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3, attributes={META_KEY: meta})
        root.create_group(UNITS)
        (tmp / MANIFEST).mkdir()


def clean_leftovers(path: Path, committed: set[int]) -> list[str]:
    """Remove temp dirs and unit dirs without a manifest row (a run died mid-commit)."""
    removed = []
    units = as_path(path) / UNITS
    for d in units.iterdir():
        if not d.is_dir():
            continue
        if d.name.startswith(TMP_PREFIX) or (d.name.startswith("u") and int(d.name[1:]) not in committed):
            rmtree(d)
            removed.append(d.name)
    for f in (as_path(path) / MANIFEST).glob(f"{TMP_PREFIX}*"):
        f.unlink(missing_ok=True)
    return removed


def _vanished(path, unit: int) -> StoreError:
    """A store removed while it is written must fail the run, not end in "done" with
    units committed into a directory that is no store."""
    return StoreError(f"{path}: the store vanished while unit {unit} was written (no zarr.json); delete what "
                      f"is left at {path} and rerun the same `cast extract`")


def _compression(path, unit: int) -> str:
    """The store's --compress, read from its root (which must still be there)."""
    try:
        meta = json.loads((path / "zarr.json").read_text()).get("attributes", {}).get(META_KEY, {})
    except FileNotFoundError:
        raise _vanished(path, unit) from None
    compress = meta.get("compress", "none")
    if compress not in COMPRESSIONS:
        raise StoreError(f"{path}: the store's metadata asks for compression {compress!r}; this CAST writes "
                         f"{', '.join(COMPRESSIONS)}. Extract into a new --out")
    return compress


def write_unit(
    path: Path,
    unit: int,
    tokens: dict[str, np.ndarray],
    acts: dict[tuple[int, str], np.ndarray],
    stats: dict[tuple[int, str], np.ndarray],
    dtype: str,
    segments: tuple[int, int],
    seconds: float,
) -> dict:
    """Write one unit whole into a temp group, rename it into place, then commit its row.

    tokens: field -> (n,) int arrays; acts: (layer, site) -> (n, dim) stored-dtype arrays;
    stats: (layer, site) -> (2, dim) float64 [sum, sum of squares] over the unit's tokens,
    written as one (layers, 2, dim) array per site, layers ascending.
    """
    path = as_path(path)
    name = unit_name(unit)
    n = len(tokens["token_id"])
    compress = _compression(path, unit)
    on_disk = STORAGE_DTYPES[dtype]
    for (layer, site), arr in acts.items():
        if arr.shape[0] != n or arr.dtype != np.dtype(on_disk):
            raise StoreError(f"unit {unit} {act_path(layer, site)}: got {arr.shape} {arr.dtype}, "
                             f"expected ({n}, dim) {on_disk}")
    all_layers = sorted({layer for layer, _ in acts})
    site_rows = {}
    for site in dict.fromkeys(site for _, site in acts):
        layers = sorted(layer for layer, s in acts if s == site)
        if layers != all_layers:
            raise StoreError(f"unit {unit}: site {site} has layers {layers}, other sites have "
                             f"{all_layers}; every site needs every layer")
        site_rows[site] = np.stack([stats[(layer, site)] for layer in layers]).astype(np.float64)
    # Each array is exactly one file (activations: one shard), so a single writer owns it and
    # an absent file is always damage, never "all fill value" (docs/design.md#store-format).
    arrays = [(f"meta/{field}", np.ascontiguousarray(tokens[field], dtype=np.int64), False)
              for field in TOKEN_FIELDS]
    arrays += [(act_path(layer, site), arr, True) for (layer, site), arr in acts.items()]
    arrays += [(stats_path(site), rows, False) for site, rows in site_rows.items()]
    # The unit directory is renamed into place first (replacing an uncommitted leftover of a
    # killed attempt at this unit), its manifest row second: the row is the commit point.
    with atomic_path(path / UNITS / name) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3,
                                attributes={"unit": unit, "n_tokens": n, "segments": list(segments)})
        write_groups(tmp, [a for a, _, _ in arrays])
        hashes = {where: write_array(tmp, where, arr, sharded, compress, group) for where, arr, sharded in arrays}
    nbytes = sum(arr.nbytes for arr in acts.values())
    if not (path / "zarr.json").exists():  # the rename above would have made the directories again
        raise _vanished(path, unit)
    row = {
        "unit": unit, "first_segment": segments[0], "last_segment": segments[1], "n_tokens": n,
        "nbytes": nbytes, "hashes": json.dumps(hashes, sort_keys=True), "seconds": seconds,
        "worker": f"{socket.gethostname()}:{os.getpid()}", "committed_at": time.time(),
    }
    with atomic_path(path / MANIFEST / f"{name}.parquet") as tmp_row:
        pq.write_table(pa.Table.from_pylist([row], schema=MANIFEST_SCHEMA), tmp_row)
    return row


def read_manifest(path: Path) -> list[dict]:
    """Committed units' rows, sorted by unit; a damaged row file is an error naming it."""
    rows = []
    for f in sorted((as_path(path) / MANIFEST).glob("u*.parquet")):
        try:
            where, filesystem = arrow_source(f)
            rows.extend(pq.read_table(where, filesystem=filesystem).to_pylist())
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            raise StoreError(f"manifest row {f} is unreadable ({e}); delete it to redo that unit") from e
    return sorted(rows, key=lambda r: r["unit"])


def committed_units(path: Path) -> set[int]:
    """Units with both a manifest row and a unit directory."""
    path = as_path(path)
    return {r["unit"] for r in read_manifest(path) if (path / UNITS / unit_name(r["unit"])).is_dir()}
