"""Reads that never turn damage into data (docs/design.md#store-format).

Every array of a unit is written with a crc32c codec (after zstd with --compress zstd),
and each array is one file (`<array>/c/0...`). So a damaged store shows up in two ways, and both are errors
naming the unit, the array and the file:

- a chunk file that is missing: zarr would read it as the fill value (zeros), so unit
  groups are opened through `StrictStore`, which refuses a chunk key that is not there;
- a chunk file whose bytes changed (overwritten, truncated): its crc32c no longer
  matches when it is decoded, and `CheckedArray` reports which file failed.

`expected_files` lists every chunk file a committed unit must hold, which lets a stage
check a whole store's presence with one listing per unit before it reads anything.
"""
from __future__ import annotations

import numpy as np
from zarr.storage import WrapperStore

from storage.layout import TOKEN_FIELDS, UNITS, StoreError, act_path, stats_path, unit_name


class ChunkError(StoreError):
    """A chunk file of a committed unit that is missing or fails its checksum."""

    def __init__(self, store, unit: int, array: str, file: str, problem: str):
        self.unit, self.array, self.file, self.problem = unit, array, file, problem
        super().__init__(
            f"{store}: unit {unit} ({unit_name(unit)}) array {array}: {problem} ({file}); the store is damaged. "
            f"`cast verify {store}` lists all damage; to redo the unit delete {UNITS}/{unit_name(unit)} "
            f"and manifest/{unit_name(unit)}.parquet and rerun the same `cast extract`")

    def __reduce__(self):  # Ray ships it back from a worker as itself
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls, args, state):
    err = StoreError.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


def chunk_key(array: str, ndim: int) -> str:
    """The one file that holds `array` of a unit: one chunk (meta, stats) or one shard (act)."""
    return f"{array}/c/" + "/".join("0" * ndim)


def expected_files(meta: dict) -> dict[str, str]:
    """Chunk file (relative to the unit) -> array name, for every array of a unit."""
    files = {chunk_key(f"meta/{f}", 1): f"meta/{f}" for f in TOKEN_FIELDS}
    for site in meta["sites"]:
        files[chunk_key(stats_path(site), 3)] = stats_path(site)
        for layer in meta["layers"]:
            files[chunk_key(act_path(layer, site), 2)] = act_path(layer, site)
    return files


def _array_of(key: str) -> str:
    return key.split("/c/")[0] if "/c/" in key else key


class StrictStore(WrapperStore):
    """A unit's zarr store on which a missing chunk is an error, never the fill value."""

    def __init__(self, store, root, unit: int):
        super().__init__(store)
        self._root, self._unit = root, unit

    def _with_store(self, store):
        return type(self)(store, self._root, self._unit)

    def _missing(self, key: str):
        where = self._root / UNITS / unit_name(self._unit)
        return ChunkError(self._root, self._unit, _array_of(key), f"{where}/{key}", "chunk file is missing")

    async def get(self, key, prototype, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        if buf is None and "/c/" in f"/{key}":
            raise self._missing(key)
        return buf

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        out = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), buf in zip(key_ranges, out):
            if buf is None and "/c/" in f"/{key}":
                raise self._missing(key)
        return out


def open_unit(root, unit: int):
    """A committed unit's zarr group, read through StrictStore."""
    import zarr
    from zarr.storage import LocalStore

    from storage.fs import zarr_store

    base = zarr_store(root / UNITS / unit_name(unit))
    if isinstance(base, str):
        base = LocalStore(base, read_only=True)
    try:
        return zarr.open_group(StrictStore(base, root, unit), mode="r", zarr_format=3)
    except Exception as e:  # noqa: BLE001 - a missing or garbled zarr.json: damage, named
        raise StoreError(f"{root}: unit {unit} ({unit_name(unit)}) cannot be opened ({type(e).__name__}: "
                         f"{str(e)[:120]}); the store is damaged, run `cast verify {root}`") from None


def checked(group, root, unit: int, name: str) -> "CheckedArray":
    """Array `name` of a unit's group, whose reads report damage (see CheckedArray)."""
    try:
        arr = group[name]
    except Exception as e:  # noqa: BLE001 - its zarr.json is gone or garbled
        raise ChunkError(root, unit, name, f"{root}/{UNITS}/{unit_name(unit)}/{name}/zarr.json",
                         f"array metadata unreadable ({type(e).__name__})") from None
    return CheckedArray(arr, root, unit, name, root / UNITS / unit_name(unit))


class CheckedArray:
    """A zarr array of one unit whose reads name the unit, array and file on any damage
    (a crc32c mismatch, a truncated shard, an undecodable chunk). Dask reads it block by
    block through __getitem__."""

    def __init__(self, array, store, unit: int, name: str, where):
        self._a, self.store, self.unit, self.name, self.where = array, store, unit, name, where
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        self.chunk_rows = array.chunks[0]  # the inner chunk's rows, sharded or not

    def __getitem__(self, sel):
        try:
            return np.asarray(self._a[sel])
        except ChunkError:
            raise
        except Exception as e:  # noqa: BLE001 - zarr's and the codecs' errors differ; all mean damage
            reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            raise ChunkError(self.store, self.unit, self.name, f"{self.where}/{chunk_key(self.name, self.ndim)}",
                             f"chunk file fails its check ({type(e).__name__}: {reason})") from None


def missing_files(store, units: list[int]) -> list[ChunkError]:
    """Every chunk file absent from the committed `units` (one listing per unit)."""
    from storage.fs import RemotePath

    expected = expected_files(store.meta)
    problems = []
    for unit in units:
        where = store.path / UNITS / unit_name(unit)
        if isinstance(where, RemotePath):
            prefix = where.key + "/"
            present = {f[len(prefix):] for f in where.fs.find(where.key)}
        else:
            present = {p.relative_to(where).as_posix() for p in where.rglob("*") if p.is_file()}
        for key in sorted(set(expected) - present):
            problems.append(ChunkError(store.path, unit, expected[key], f"{where}/{key}", "chunk file is missing"))
    return problems
