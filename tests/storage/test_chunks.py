"""The unit writer's own chunk files (storage/chunks.py): the bytes zarr writes, digests
that find any changed byte, --compress zstd, and format 3 stores still read and verified."""
from __future__ import annotations

import hashlib
import json
import shutil

import google_crc32c
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

import storage
from pipeline.cache.extract import ExtractConfig, run_extract
from storage.check import verify
from storage.chunks import chunk_digests, chunk_grid, codecs, write_array, write_groups
from storage.layout import MANIFEST, UNITS
from storage.writer import MANIFEST_SCHEMA, read_manifest


def files_of(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("n", [1, 255, 4081])
def test_files_are_the_bytes_zarr_writes(tmp_path, n):
    rng = np.random.default_rng(n)
    arrays = {
        "act/L07/resid": (rng.integers(0, 2**16, (n, 576), dtype=np.uint16), True),
        "act/L07/q_proj.out": (rng.standard_normal((n, 40)).astype(np.float32), True),
        "meta/token_id": (rng.integers(0, 50_000, n).astype(np.int64), False),
        "stats/resid": (rng.standard_normal((3, 2, 576)), False),
    }
    ours, theirs = tmp_path / "ours", tmp_path / "zarr"
    zarr.open_group(str(ours), mode="w", zarr_format=3)
    write_groups(ours, list(arrays))
    digests = {name: write_array(ours, name, a, sharded) for name, (a, sharded) in arrays.items()}
    group = zarr.open_group(str(theirs), mode="w", zarr_format=3)
    for name, (a, sharded) in arrays.items():
        rows, k = chunk_grid(n, a.itemsize * int(np.prod(a.shape[1:]))) if sharded else (a.shape[0], 1)
        group.create_array(name, data=a, chunks=(rows, *a.shape[1:]),
                           shards=(rows * k, *a.shape[1:]) if sharded else None, compressors=codecs("none"),
                           fill_value=0, config={"write_empty_chunks": True})
    assert files_of(ours) == files_of(theirs)
    back = zarr.open_group(str(ours), mode="r")
    for name, (a, sharded) in arrays.items():
        np.testing.assert_array_equal(back[name][...], a)
        # the digest is the crc32c every chunk file of the array ends in
        assert digests[name] == chunk_digests(a, back[name].chunks[0])
    whole = (ours / "meta/token_id/c/0").read_bytes()
    assert digests["meta/token_id"] == f"crc32c:{google_crc32c.value(whole[:-4]):08x}"


def test_chunks_split_evenly_without_a_padded_tail():
    for n, row in [(4081, 1152), (4096, 1280), (100, 96), (1, 8), (50_000, 4096)]:
        rows, k = chunk_grid(n, row)
        assert rows * k >= n > rows * (k - 1) and rows * k - n < k
        assert rows * row <= 2 << 20 or rows == 1


@pytest.fixture(scope="module")
def stores(tmp_path_factory, corpus_dir):
    """The same extraction uncompressed (the default) and with --compress zstd."""
    out = {}
    for compress in ("none", "zstd"):
        path = tmp_path_factory.mktemp(compress) / "s.zarr"
        run_extract(ExtractConfig(model="tiny-gemma3", out=str(path), corpus=str(corpus_dir), sites="resid,mlp_in",
                                  max_tokens=300, max_chars=160, unit_tokens=100, workers=0, compress=compress),
                    progress=False)
        out[compress] = path
    return out


def test_compressed_and_plain_stores_hold_the_same_values_and_digests(stores):
    plain, packed = storage.open_store(stores["none"]), storage.open_store(stores["zstd"])
    assert plain.meta["compress"] == "none" and packed.meta["compress"] == "zstd"
    assert plain.meta["format_version"] == packed.meta["format_version"] == 4
    np.testing.assert_array_equal(plain.raw_array(1, "resid").compute(), packed.raw_array(1, "resid").compute())
    strip = [{k: r[k] for k in ("unit", "n_tokens", "nbytes", "hashes")} for r in read_manifest(stores["none"])]
    assert strip == [{k: r[k] for k in ("unit", "n_tokens", "nbytes", "hashes")} for r in read_manifest(stores["zstd"])]
    shard = "units/u000000/act/L01/resid/c/0/0"
    assert (stores["zstd"] / shard).stat().st_size < (stores["none"] / shard).stat().st_size
    assert verify(stores["none"]).ok and verify(stores["zstd"]).ok


def test_verify_finds_a_changed_byte_whose_chunk_checksum_was_rewritten(stores, tmp_path):
    """The manifest's digest is checked on its own: a chunk whose bytes and crc32c were both
    rewritten (a unit made by another run copied in, a tool that re-encodes) passes zarr's
    check and is still found."""
    bad = tmp_path / "bad.zarr"
    shutil.copytree(stores["none"], bad)
    f = bad / "units/u000001/act/L01/resid/c/0/0"
    data = bytearray(f.read_bytes())
    group = zarr.open_group(str(bad / "units/u000001"), mode="r")
    rows, dim = group["act/L01/resid"].chunks
    size = rows * dim * 2
    data[size // 2] ^= 0x01  # one bit in the first chunk's values
    data[size:size + 4] = np.uint32(google_crc32c.value(bytes(data[:size]))).tobytes()
    f.write_bytes(bytes(data))
    storage.open_store(bad).array(1, "resid").compute()  # reads: the file is self-consistent
    text = "\n".join(verify(bad).lines())
    assert "unit 1: act/L01/resid does not match its recorded crc32c" in text


def test_a_format_3_store_still_reads_and_verifies_by_sha256(stores, tmp_path):
    """Format 3 (zstd chunks, a sha256 per array in the manifest) is read as it is."""
    old = tmp_path / "old.zarr"
    shutil.copytree(stores["zstd"], old)
    root = json.loads((old / "zarr.json").read_text())
    meta = root["attributes"]["cast"]
    meta["format_version"] = 3
    del meta["compress"]
    (old / "zarr.json").write_text(json.dumps(root))
    store = storage.open_store(old)
    for row in read_manifest(old):
        group = zarr.open_group(str(old / UNITS / f"u{row['unit']:06d}"), mode="r")
        hashes = {name: hashlib.sha256(np.ascontiguousarray(group[name][...]).view(np.uint8)).hexdigest()
                  for name in json.loads(row["hashes"])}
        row["hashes"] = json.dumps(hashes, sort_keys=True)
        pq.write_table(pa.Table.from_pylist([row], schema=MANIFEST_SCHEMA),
                       old / MANIFEST / f"u{row['unit']:06d}.parquet")
    np.testing.assert_array_equal(store.array(0, "mlp_in").compute(),
                                  storage.open_store(stores["none"]).array(0, "mlp_in").compute())
    assert verify(old).ok
    row = read_manifest(old)[0]
    hashes = json.loads(row["hashes"])
    hashes["act/L00/resid"] = hashlib.sha256(b"other bytes").hexdigest()
    row["hashes"] = json.dumps(hashes, sort_keys=True)
    pq.write_table(pa.Table.from_pylist([row], schema=MANIFEST_SCHEMA), old / MANIFEST / "u000000.parquet")
    assert "unit 0: act/L00/resid does not match its recorded sha256" in "\n".join(verify(old).lines())


def test_compress_flag_is_checked():
    with pytest.raises(ValueError, match="--compress 'lz4': choose one of none, zstd"):
        ExtractConfig(model="tiny-llama", out="x", compress="lz4")
