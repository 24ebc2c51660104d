"""Reading a store: one dask array per (layer, site), token metadata, merged statistics.

    store = open_store("runs/smollm2.zarr", expect={"model": "smollm2-135m"})
    x = store.array(12, "resid")          # dask (tokens, 576) float32, lazily decoded
    meta = store.tokens()                 # dict of dask (tokens,) int64 arrays
    mean, var = store.stats(12, "resid")  # from per-unit sums, no pass over the data

A store may also be an object-store URL (`open_store("s3://bucket/runs/target.zarr")`,
storage.fs): the dask arrays then read chunks through zarr's fsspec store.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import dask.array as da
import numpy as np
import zarr

from storage.layout import (
    META_KEY, READABLE_FORMATS, TOKEN_FIELDS, UNITS, StoreError, act_path, decode, stats_path, unit_name,
)
from storage.fs import RemotePath, as_path, check_location
from storage.integrity import checked, missing_files, open_unit
from storage.writer import read_manifest

# What a caller may pin when opening a store, and where each lives in the metadata.
EXPECTABLE = {
    "model": ("model", "name"),
    "weights_hash": ("model", "weights_hash"),
    "tokenizer_hash": ("model", "tokenizer_hash"),
    "corpus_hash": ("corpus", "hash"),
    "segmentation_hash": ("corpus", "segmentation_hash"),
    "dtype": ("dtype",),
}


def _dig(meta: dict, keys: tuple[str, ...]):
    for k in keys:
        meta = meta.get(k) if isinstance(meta, dict) else None
    return meta


@dataclass
class ActivationStore:
    path: Path | RemotePath
    meta: dict

    @cached_property
    def manifest(self) -> list[dict]:
        """Committed units' rows. A row whose unit directory is gone is damage, not a
        smaller store: reading on would shift every row index after it."""
        rows = read_manifest(self.path)
        for r in rows:
            where = self.path / UNITS / unit_name(r["unit"])
            if not where.is_dir():
                raise StoreError(f"{self.path}: unit {r['unit']} is committed (manifest/{unit_name(r['unit'])}"
                                 f".parquet) but its directory {where} is missing; the store is damaged. Delete "
                                 f"that manifest row and rerun the same `cast extract` to redo the unit")
        return rows

    @property
    def units(self) -> list[int]:
        return [r["unit"] for r in self.manifest]

    @property
    def n_tokens(self) -> int:
        return sum(r["n_tokens"] for r in self.manifest)

    @property
    def complete(self) -> bool:
        return len(self.manifest) == len(self.meta["plan"])

    @property
    def sites(self) -> list[str]:
        return list(self.meta["sites"])

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    def _group(self, unit: int) -> zarr.Group:
        return open_unit(self.path, unit)

    def check_files(self) -> None:
        """Fail, naming the first, if a chunk file of any committed unit is missing (one
        listing per unit, no data read; `cast verify` lists them all). Done once before this
        store's first read, so a stage that reads only part of a store still refuses a
        damaged one."""
        if getattr(self, "_files_checked", False):
            return
        missing = missing_files(self, self.units)
        if missing:
            raise missing[0]
        self._files_checked = True

    def _part(self, unit: int, name: str) -> da.Array:
        arr = checked(self._group(unit), self.path, unit, name)
        return da.from_array(arr, chunks=arr._a.chunks, asarray=False, lock=False, fancy=False,
                             name=f"cast-{self.path}-{unit}-{name}", meta=np.empty((0,) * arr.ndim, arr.dtype))

    def _check(self, layer: int, site: str) -> None:
        if site not in self.meta["sites"]:
            raise StoreError(f"{self.path}: site {site!r} not stored; it has {', '.join(self.sites)}")
        if layer not in self.meta["layers"]:
            raise StoreError(f"{self.path}: layer {layer} not stored; it has layers {self.layers}")
        if not self.manifest:
            raise StoreError(f"{self.path}: no committed units yet; run `cast extract` to fill it")

    def raw_array(self, layer: int, site: str) -> da.Array:
        """The stored values as written (uint16 bit patterns for bfloat16)."""
        self._check(layer, site)
        self.check_files()
        return da.concatenate([self._part(u, act_path(layer, site)) for u in self.units], axis=0)

    def array(self, layer: int, site: str) -> da.Array:
        """(tokens, dim) float32 dask array of one (layer, site) across committed units."""
        raw = self.raw_array(layer, site)
        return raw.map_blocks(decode, self.meta["dtype"], dtype=np.float32)

    def tokens(self) -> dict[str, da.Array]:
        """Per-token metadata, row-aligned with every `array(...)`."""
        out = {}
        self.check_files()
        for field in TOKEN_FIELDS:
            parts = [self._part(u, f"meta/{field}") for u in self.units]
            out[field] = da.concatenate(parts, axis=0) if parts else da.zeros((0,), dtype=np.int64)
        return out

    def stats(self, layer: int, site: str) -> tuple[np.ndarray, np.ndarray]:
        """Mean and variance per dimension, merged from per-unit float64 sums."""
        self._check(layer, site)
        self.check_files()
        row = sorted(self.layers).index(layer)  # the writer's row order
        total = sum(checked(self._group(u), self.path, u, stats_path(site))[row] for u in self.units)
        n = self.n_tokens
        mean = total[0] / n
        var = np.maximum(total[1] / n - mean**2, 0.0)
        return mean, var

    def unit_attrs(self, unit: int) -> dict:
        return dict(self._group(unit).attrs)


def open_store(path: str | Path, expect: dict | None = None) -> ActivationStore:
    """Open a store; `expect` pins model/tokenizer/corpus/dtype/sites/layers and any
    mismatch is a StoreError listing every differing field (never silent garbage)."""
    path = as_path(path)
    if not (path / "zarr.json").exists():
        check_location(path)  # a missing bucket says so rather than "not a store"
        raise StoreError(f"{path} is not an activation store (no zarr.json); create one with `cast extract`")
    root = json.loads((path / "zarr.json").read_text())
    meta = root.get("attributes", {}).get(META_KEY)
    if not meta:
        raise StoreError(f"{path} is a zarr group but not a CAST store (no '{META_KEY}' attributes)")
    if meta.get("format_version") not in READABLE_FORMATS:
        raise StoreError(f"{path} was written in store format {meta.get('format_version')}; this CAST reads "
                         f"formats {', '.join(map(str, READABLE_FORMATS))} (checksummed chunks). Re-extract it with `cast extract` into a "
                         f"new --out (same flags), then delete the old one")
    store = ActivationStore(path=path, meta=meta)
    if expect:
        check_expectations(store, expect)
    return store


def check_expectations(store: ActivationStore, expect: dict) -> None:
    problems = []
    for key, want in expect.items():
        if want is None:
            continue
        if key in EXPECTABLE:
            have = _dig(store.meta, EXPECTABLE[key])
            if have != want:
                problems.append(f"{key}: expected {want!r}, store has {have!r}")
        elif key in ("sites", "layers"):
            missing = [x for x in want if x not in store.meta[key]]
            if missing:
                problems.append(f"{key}: {missing} not in store (has {store.meta[key]})")
        else:
            raise StoreError(f"unknown expectation {key!r}; known: {', '.join([*EXPECTABLE, 'sites', 'layers'])}")
    if problems:
        raise StoreError(f"{store.path} does not match what was expected:\n  " + "\n  ".join(problems))
