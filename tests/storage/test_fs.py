"""Stores and artifacts on object storage (moto's S3 on 127.0.0.1): the same bytes as on local
disk, the commit protocol without rename (manifest row last, uncommitted units ignored and
overwritten), and clear errors for a missing backend or bucket."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import storage
from jobs.cli import main
from storage import fs
from storage.check import verify
from storage.files import atomic_path, atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
EXTRACT = ["--model", "tiny-llama", "--max-tokens", "300", "--max-chars", "160", "--unit-tokens", "96",
           "--sites", "resid,attn_in", "--workers", "0", "--quiet"]


def objects(url: str) -> dict[str, bytes]:
    """Every object under url, by key relative to it."""
    p = fs.as_path(url)
    return {str(f.relative_to(p)): f.read_bytes() for f in p.rglob("*")}


def files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in root.rglob("*") if f.is_file()}


def test_local_paths_stay_pathlib_and_urls_get_the_same_api(bucket):
    assert fs.as_path("runs/x") == Path("runs/x") and type(fs.as_path("/tmp/x")) is type(Path("/tmp/x"))
    assert fs.as_path("file:///tmp/x") == Path("/tmp/x") and not fs.is_url(Path("s3:/x"))
    assert fs.urls_in(["http://head:8265", "ray://head:10001", 3, f"{bucket}/a,runs/b,gs://g/c"]) == \
        [f"{bucket}/a", "gs://g/c"]  # cluster addresses are not storage
    p = fs.as_path(f"{bucket}/a/b.json")
    assert (p.name, p.suffix, p.stem, str(p.parent)) == ("b.json", ".json", "b", f"{bucket}/a")
    assert not p.exists() and list(p.parent.iterdir()) == []
    p.write_text('{"x": 1}')
    (p.parent / "c.txt").write_bytes(b"c")
    assert p.exists() and p.is_file() and p.parent.is_dir() and p.read_text() == '{"x": 1}'
    assert [q.name for q in p.parent.iterdir()] == ["b.json", "c.txt"]
    assert [q.name for q in p.parent.glob("*.json")] == ["b.json"]
    assert fs.disk_usage(p.parent) == 9 and fs.as_path(str(p)) == p and len({p, fs.as_path(str(p))}) == 1


def test_a_directory_commit_puts_its_marker_json_last_and_replaces_debris(bucket, monkeypatch):
    final = f"{bucket}/align"
    fs.as_path(f"{final}/stale-debris.bin").write_bytes(b"left by a killed upload")
    s3 = fs.filesystem("s3")
    calls = []
    put = s3.put
    monkeypatch.setattr(s3, "put", lambda lpaths, rpaths, **kw: (calls.append(list(rpaths)), put(lpaths, rpaths, **kw)))
    with atomic_path(final) as tmp:
        (tmp / "sub").mkdir(parents=True)
        (tmp / "pairs.parquet").write_bytes(b"pairs")
        (tmp / "sub" / "inner.json").write_text("{}")
        (tmp / "align.json").write_text("{}")
        assert not fs.is_url(tmp) and set(objects(final)) == {"stale-debris.bin"}  # staged locally: nothing put yet
    key = fs.as_path(final).key
    assert calls == [[f"{key}/pairs.parquet", f"{key}/sub/inner.json"], [f"{key}/align.json"]]
    assert set(objects(final)) == {"pairs.parquet", "sub/inner.json", "align.json"}  # the debris is gone

    with pytest.raises(RuntimeError), atomic_path(final) as tmp:  # a failed write uploads nothing
        tmp.mkdir()
        (tmp / "align.json").write_text("half")
        raise RuntimeError("killed")
    assert objects(final)["align.json"] == b"{}"
    atomic_write_text(f"{bucket}/one.json", "whole")
    assert fs.as_path(f"{bucket}/one.json").read_text() == "whole"


def test_store_on_s3_has_the_bytes_of_a_local_store_and_ignores_uncommitted_units(bucket, tmp_path, corpus_dir,
                                                                                   capsys):
    local, remote = tmp_path / "s.zarr", f"{bucket}/runs/s.zarr"
    for out in (str(local), remote):
        assert main(["extract", "--out", out, "--corpus", str(corpus_dir), *EXTRACT]) == 0
    got, want = objects(remote), files(local)
    assert set(got) == set(want) and len(want) > 20
    rows = [k for k in want if k.startswith("manifest/")]
    assert all(got[k] == want[k] for k in want if k not in rows)  # rows differ only in time and worker
    store = storage.open_store(remote, expect={"model": "tiny-llama"})
    np.testing.assert_array_equal(store.array(1, "resid").compute(),
                                  storage.open_store(local).array(1, "resid").compute())
    n_units = len(store.units)

    # A unit uploaded without its manifest row (a worker killed between the two): readers
    # and verify ignore it, and the next run deletes it and redoes that unit.
    fs.as_path(f"{remote}/manifest/u000001.parquet").unlink()
    fs.as_path(f"{remote}/units/u000001/act/junk").write_bytes(b"debris")
    store = storage.open_store(remote)
    assert len(store.units) == n_units - 1 and 1 not in store.units
    report = verify(remote)
    assert report.units_ok == n_units - 1 and report.problems == ["unit 1: not committed (resume with the same "
                                                                  "`cast extract`)"]
    capsys.readouterr()
    assert main(["extract", "--out", remote, "--corpus", str(corpus_dir), *EXTRACT]) == 0
    assert "removed half-written units from a previous run: u000001" in capsys.readouterr().err
    again = objects(remote)
    assert set(again) == set(want) and all(again[k] == want[k] for k in want if k not in rows)
    assert verify(remote).ok and main(["verify", remote, "--quiet"]) == 0


def test_missing_bucket_fails_at_once_naming_it_and_touches_nothing(bucket, capsys, corpus_dir):
    gone = "s3://no-such-bucket-cast-test"
    t0 = time.perf_counter()
    assert main(["extract", "--out", f"{gone}/s.zarr", "--corpus", str(corpus_dir), *EXTRACT]) == 2
    err = capsys.readouterr().err
    assert f"{gone}/s.zarr: bucket 'no-such-bucket-cast-test' does not exist" in err and "create it first" in err
    assert time.perf_counter() - t0 < 5  # before any model or corpus is loaded
    with pytest.raises(storage.StoreError, match="bucket 'no-such-bucket-cast-test' does not exist"):
        storage.open_store(f"{gone}/s.zarr")
    assert not fs.filesystem("s3").exists("no-such-bucket-cast-test")


def test_s3_without_its_backend_installed_fails_at_once_naming_what_to_install(bucket, tmp_path):
    # s3fs made unimportable in a fresh interpreter, as on a machine without the extra.
    code = ("import sys; sys.modules['s3fs'] = None; from jobs.cli import main; "
            f"sys.exit(main(['verify', '{bucket}/s.zarr']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=os.environ.copy(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"cast verify: error: {bucket}/s.zarr: s3:// needs the s3fs package, which is not installed" in proc.stderr
    assert "pip install 'cast-transfer[s3]'" in proc.stderr and "Traceback" not in proc.stderr


def test_a_model_cache_shared_through_a_bucket_fills_each_node_once(bucket, tmp_path, monkeypatch):
    """CAST_CACHE=s3://...: what one node fetched and converted, another copies instead of
    fetching again; each keeps a local copy (libraries load checkpoints from local disk)."""
    from pipeline.cache import cache_dir, from_shared, to_shared

    monkeypatch.setenv("CAST_CACHE", f"{bucket}/cache")
    monkeypatch.setenv("CAST_LOCAL_CACHE", str(tmp_path / "node-a"))
    local = cache_dir() / "models" / "m-1"
    assert cache_dir() == tmp_path / "node-a" and not from_shared(local, "cast_model.json")
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "model.safetensors").write_bytes(b"weights")
    (local / "cast_model.json").write_text("{}")
    to_shared(local, "cast_model.json")
    assert set(objects(f"{bucket}/cache/models/m-1")) == {"sub/model.safetensors", "cast_model.json"}

    monkeypatch.setenv("CAST_LOCAL_CACHE", str(tmp_path / "node-b"))  # another node
    other = cache_dir() / "models" / "m-1"
    assert from_shared(other, "cast_model.json") and files(other) == files(local)
    monkeypatch.setenv("CAST_CACHE", "s3://no-such-bucket-cast-cache")
    with pytest.raises(storage.StoreError, match="no-such-bucket-cast-cache: bucket .* does not exist"):
        from_shared(other, "cast_model.json")
