"""The on-disk layout of an activation store and the storage-dtype codec.

    STORE/
      zarr.json                 root group; attrs["cast"] = store metadata (immutable)
      units/zarr.json
      units/u000042/            one zarr group per committed unit, written whole:
        meta/{token_id,segment_id,char_start,char_end,position}   (tokens,)
        act/L07/resid           (tokens, dim), chunked on tokens, one shard
        stats/resid             (layers, 2, dim) float64: per-unit sum and sum of squares,
                                one row per stored layer, ascending
      units/.tmp-u000042-*/     a unit being written (never read)
      manifest/u000042.parquet  one row per committed unit: the commit point

A unit counts as committed only when both its directory and its manifest row exist:
the directory is renamed into place first, the row written (temp -> rename) second,
so a run killed between the two redoes that unit instead of trusting it
(docs/design.md#commit-protocol).
"""
from __future__ import annotations

import numpy as np
import torch

# 2: one stats array per site (format 1 had one per layer and site, and ~4 ms of zarr
# overhead each per unit). 3: a crc32c on every chunk and one file per array, so a read
# finds damage (storage/integrity.py). 4: chunks split evenly (no padded third of a unit),
# uncompressed unless --compress zstd, and the manifest records each chunk's crc32c instead
# of a sha256 (docs/design.md#store-format). Format 3 stores still read and verify.
FORMAT_VERSION = 4
READABLE_FORMATS = (3, 4)
COMPRESSIONS = ("none", "zstd")
META_KEY = "cast"
UNITS = "units"
MANIFEST = "manifest"
TOKEN_FIELDS = ("token_id", "segment_id", "char_start", "char_end", "position")

# Logical dtypes a store may hold, and how each is laid out on disk. zarr has no
# bfloat16, so bf16 is stored as its uint16 bit pattern and widened on read.
STORAGE_DTYPES = {"bfloat16": "uint16", "float16": "float16", "float32": "float32"}
FLOAT16_MAX = 65504.0


class StoreError(ValueError):
    """A store that is missing, damaged or not what the caller expected."""

    no_retry = True  # runtime.work: retrying a read of a damaged store cannot help


def unit_name(unit: int) -> str:
    return f"u{unit:06d}"


def layer_key(layer: int) -> str:
    return f"L{layer:02d}"


def act_path(layer: int, site: str) -> str:
    return f"act/{layer_key(layer)}/{site}"


def stats_path(site: str) -> str:
    return f"stats/{site}"


TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def check_encodable(x: torch.Tensor, dtype: str, where: str, finite: bool = False) -> torch.dtype:
    """The torch dtype float32 activations `x` are stored in, once they are known to fit.

    Never lets a value that does not fit become inf/nan: non-finite input or a float16
    overflow is an error naming the site, not a silently corrupted store. `finite=True`:
    the caller has already proven every value finite (extraction's sums do).
    """
    if dtype not in TORCH_DTYPES:
        raise StoreError(f"unknown storage dtype {dtype!r}; choose one of {', '.join(STORAGE_DTYPES)}")
    # A float64 sum is finite exactly when every value is (inf and nan propagate; float32
    # values cannot overflow it): one reduction instead of a per-value mask.
    if not finite and not torch.isfinite(x.sum(dtype=torch.float64)) and not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise StoreError(f"{where}: the model produced {bad} non-finite values (inf/nan); refusing to store them")
    if dtype == "float16":
        peak = x.abs().max().item() if x.numel() else 0.0
        if peak > FLOAT16_MAX:
            raise StoreError(
                f"{where}: values reach {peak:.3g}, beyond float16's {FLOAT16_MAX:.0f}; "
                f"use --dtype bfloat16 (same size, wider range) or --dtype float32"
            )
    return TORCH_DTYPES[dtype]


def as_stored(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A CPU tensor in the storage dtype -> the numpy array written to disk, sharing its
    memory (bf16 as its uint16 bit pattern)."""
    if dtype == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def encode(x: torch.Tensor, dtype: str, where: str, finite: bool = False) -> np.ndarray:
    """float32 activations -> the numpy array written to disk (see check_encodable)."""
    return as_stored(x.to(check_encodable(x, dtype, where, finite)).cpu(), dtype)


def decode(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Stored array -> float32 (bf16 bit patterns widened exactly)."""
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32, copy=False)
