"""Writing a unit's arrays as zarr files without zarr's encode pipeline, and the per-chunk
crc32c digests the manifest records (docs/design.md#store-format).

An uncompressed array's chunk is its raw bytes followed by their crc32c (zarr v3's
`crc32c` codec); an activation array is one shard of such chunks with zarr's shard index
at its end. zarr's own writer copies every chunk several times (padding, the crc codec's
append, the shard's assembly) and costs about 3 ms of metadata work per array; here each
chunk is written from the array's own buffer and its crc32c computed once, serving both
the file and the manifest. The files are byte for byte those zarr writes for the same
metadata (tests/storage/test_chunks.py), and zarr reads them as usual.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

CRC_PREFIX = "crc32c:"
TARGET_CHUNK_BYTES = 2 << 20
_NO_CHUNK = np.iinfo(np.uint64).max  # zarr's marker for an absent chunk in a shard index


def chunk_grid(n: int, row_bytes: int, target_bytes: int = TARGET_CHUNK_BYTES) -> tuple[int, int]:
    """(rows per chunk, chunks) for n rows: about `target_bytes` a chunk, split evenly, so
    the last chunk carries fewer than `chunks` rows of padding (a grid of fixed 2 MB chunks
    padded the last one with up to a third of a unit's bytes)."""
    n = max(1, n)
    k = max(1, -(-n * row_bytes // target_bytes))
    return -(-n // k), k


def codecs(compress: str) -> list:
    """What follows the bytes codec: a crc32c always (every read checks it,
    storage/integrity.py), after zstd where the store was made with --compress zstd."""
    return [ZstdCodec(level=1), Crc32cCodec()] if compress == "zstd" else [Crc32cCodec()]


@lru_cache(maxsize=64)
def _metadata(shape: tuple, dtype: str, chunks: tuple, shards: tuple | None, compress: str) -> bytes:
    """The zarr.json zarr itself writes for such an array (computed once per signature)."""
    files: dict = {}
    zarr.create_array(zarr.storage.MemoryStore(files), name="a", shape=shape, dtype=dtype, chunks=chunks,
                      shards=shards, compressors=codecs(compress), fill_value=0, zarr_format=3)
    return files["a/zarr.json"].to_bytes()


@lru_cache(maxsize=1)
def group_metadata() -> bytes:
    files: dict = {}
    zarr.open_group(zarr.storage.MemoryStore(files), mode="w", zarr_format=3)
    return files["zarr.json"].to_bytes()


def _crc(parts) -> int:
    crc = 0
    for p in parts:
        crc = google_crc32c.extend(crc, p)
    return crc


def _chunk_parts(flat: np.ndarray, i: int, rows: int, row_bytes: int, n: int) -> list:
    """The bytes of chunk i: its rows from the array's buffer, then zeros (the fill value)
    up to a whole chunk, as zarr pads an edge chunk."""
    part = flat[i * rows * row_bytes: min(n, (i + 1) * rows) * row_bytes]
    pad = rows * row_bytes - len(part)
    return [part, bytes(pad)] if pad else [part]


def chunk_digests(a: np.ndarray, rows: int) -> str:
    """The digest the manifest records for an array chunked by `rows` rows: each chunk's
    crc32c, in order (the same values its chunk files end in)."""
    a = np.ascontiguousarray(a)
    n = a.shape[0]
    row_bytes = a.itemsize * int(np.prod(a.shape[1:], dtype=np.int64))
    flat = a.reshape(-1).view(np.uint8)
    k = max(1, -(-n // rows))
    return CRC_PREFIX + ",".join(f"{_crc(_chunk_parts(flat, i, rows, row_bytes, n)):08x}" for i in range(k))


def write_array(root: Path, name: str, a: np.ndarray, sharded: bool, compress: str = "none",
                group=None) -> str:
    """Write array `name` of a unit group at `root` (its zarr.json and its one file) and
    return its digest. Uncompressed: chunked on the first axis, in one shard when
    `sharded`, else one chunk; --compress zstd goes through zarr's own writer (into
    `group`, the unit's zarr group, when given)."""
    a = np.ascontiguousarray(a)
    n = a.shape[0]
    row_bytes = a.itemsize * int(np.prod(a.shape[1:], dtype=np.int64))
    rows, k = chunk_grid(n, row_bytes) if sharded else (max(1, n), 1)
    chunks = (rows, *a.shape[1:])
    shards = (rows * k, *a.shape[1:]) if sharded else None
    where = Path(root) / name
    if compress != "none":
        group = group if group is not None else zarr.open_group(str(root), mode="a", zarr_format=3)
        # every array is exactly one file: skip zarr's per-chunk "all fill value?" scan,
        # which would leave an all-zero chunk unwritten (docs/design.md#store-format)
        group.create_array(name, data=a, chunks=chunks, shards=shards, compressors=codecs(compress),
                           fill_value=0, config={"write_empty_chunks": True})
        return chunk_digests(a, rows)
    file = where.joinpath("c", *["0"] * a.ndim)
    file.parent.mkdir(parents=True, exist_ok=True)  # makes `where` too: one call, not three
    (where / "zarr.json").write_bytes(_metadata(a.shape, a.dtype.str, chunks, shards, compress))
    flat = a.reshape(-1).view(np.uint8)
    crcs, index, offset = [], np.empty((k, 2), dtype="<u8"), 0
    with open(file, "wb") as f:
        for i in range(k):
            parts = _chunk_parts(flat, i, rows, row_bytes, n)
            crc = _crc(parts)
            for p in parts:
                f.write(p)
            f.write(np.uint32(crc).astype("<u4").tobytes())
            crcs.append(crc)
            size = rows * row_bytes + 4
            index[i] = (offset, size)
            offset += size
        if sharded:  # zarr's shard index at the end: (offset, nbytes) per chunk, then its crc32c
            raw = index.tobytes()
            f.write(raw)
            f.write(np.uint32(google_crc32c.value(raw)).astype("<u4").tobytes())
    return CRC_PREFIX + ",".join(f"{c:08x}" for c in crcs)


def write_groups(root: Path, names: list[str]) -> None:
    """zarr.json of every intermediate group above the arrays `names` (act, act/L07, ...)."""
    groups = {str(Path(n).parent) for n in names}
    for g in list(groups):
        while g not in ("", "."):
            groups.add(g)
            g = str(Path(g).parent)
    for g in sorted(groups - {"", "."}):
        d = Path(root) / g
        d.mkdir(parents=True, exist_ok=True)
        target = d / "zarr.json"
        if not target.exists():
            target.write_bytes(group_metadata())


def digest_matches(recorded: str, data: np.ndarray, rows: int) -> bool:
    """Whether `data` (an array read back, chunked by `rows`) matches its manifest digest:
    per-chunk crc32c (format 4), or the sha256 of its bytes (format 3 stores)."""
    if recorded.startswith(CRC_PREFIX):
        return recorded == chunk_digests(data, rows)
    import hashlib

    return recorded == hashlib.sha256(np.ascontiguousarray(data).reshape(-1).view(np.uint8)).hexdigest()
