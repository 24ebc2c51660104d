"""Units are written behind the forward pass (pipeline/cache/writeback.py): the store is
the same byte for byte as when each unit is written before the next is forwarded, the
queue stays bounded, and a write that fails fails the extraction, naming its unit."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import storage
from pipeline.cache.extract import ExtractConfig, Extractor, run_extract
from pipeline.cache.writeback import UnitWriteError, WriteBehind
from storage.check import verify
from storage.layout import UNITS
from storage.writer import committed_units, read_manifest

KW = dict(model="tiny-llama", sites="resid,attn_in,q_proj.out", dtype="bfloat16", max_tokens=900,
          max_chars=160, unit_tokens=150, workers=0)
TIMING = ("seconds", "worker", "committed_at")  # the only manifest fields that may differ between runs


def unit_files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted((store / UNITS).rglob("*")) if p.is_file()}


def rows(store: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_manifest(store)]


def test_overlapped_writes_make_the_store_byte_identical_to_serial_ones(tmp_path, corpus_dir):
    stores = {}
    for depth in (0, 1, 2):
        stores[depth] = tmp_path / f"d{depth}.zarr"
        run_extract(ExtractConfig(out=str(stores[depth]), corpus=str(corpus_dir), write_depth=depth, **KW),
                    progress=False)
    serial = unit_files(stores[0])
    assert len(storage.open_store(stores[0]).units) >= 4
    for depth in (1, 2):
        assert verify(stores[depth]).ok
        assert unit_files(stores[depth]) == serial, f"write_depth={depth}"
        assert rows(stores[depth]) == rows(stores[0])


def test_a_failed_write_fails_the_extraction_and_a_rerun_completes_it(tmp_path, corpus_dir, monkeypatch):
    out, ref = tmp_path / "s.zarr", tmp_path / "ref.zarr"
    real = Extractor.write

    def disk_full_at_unit_1(path, unit, *args):
        if unit == 1:
            time.sleep(0.2)  # fail after unit 2's forward pass has begun: the error must still surface
            raise OSError(28, "No space left on device")
        return real(path, unit, *args)

    monkeypatch.setattr(Extractor, "write", staticmethod(disk_full_at_unit_1))
    with pytest.raises(UnitWriteError, match=r"unit 1: writing it to the store failed \(OSError"):
        run_extract(ExtractConfig(out=str(out), corpus=str(corpus_dir), **KW), progress=False)
    assert committed_units(out) == {0}  # unit 0 committed; unit 1 failed; nothing after it was taken
    assert not verify(out).ok

    monkeypatch.setattr(Extractor, "write", staticmethod(real))
    res = run_extract(ExtractConfig(out=str(out), corpus=str(corpus_dir), **KW), progress=False)
    assert res["skipped"] == 1
    run_extract(ExtractConfig(out=str(ref), corpus=str(corpus_dir), write_depth=0, **KW), progress=False)
    assert verify(out).ok and unit_files(out) == unit_files(ref)


def test_an_extraction_is_not_reported_done_while_a_unit_is_uncommitted(tmp_path, corpus_dir, monkeypatch):
    real = Extractor.write
    # A write that returns without committing (a lost write): the run must not succeed.
    monkeypatch.setattr(Extractor, "write", staticmethod(
        lambda path, unit, *args: None if unit == 2 else real(path, unit, *args)))
    with pytest.raises(storage.StoreError, match=r"1 unit\(s\) were extracted but are not committed \(first: \[2\]\)"):
        run_extract(ExtractConfig(out=str(tmp_path / "s.zarr"), corpus=str(corpus_dir), **KW), progress=False)


def test_the_last_units_failure_is_raised_by_flush():
    wb = WriteBehind(depth=2)
    wb.submit(7, lambda: None)
    wb.submit(8, lambda: (_ for _ in ()).throw(ValueError("bad shard")))
    with pytest.raises(UnitWriteError, match=r"unit 8: .*ValueError: bad shard"):
        wb.flush()
    wb.flush()  # reported once; nothing left pending
    wb.close()


def test_submit_blocks_while_depth_writes_are_pending():
    release = threading.Event()
    started: list[int] = []

    def write(unit):
        started.append(unit)
        release.wait(10)

    wb = WriteBehind(depth=2)
    wb.submit(0, write, 0)
    wb.submit(1, write, 1)
    third = threading.Thread(target=wb.submit, args=(2, write, 2))
    third.start()
    third.join(0.3)
    assert third.is_alive(), "a third unit must wait while two are pending (memory stays bounded)"
    assert wb.pending == [0, 1]
    release.set()
    third.join(10)
    wb.close()
    assert started == [0, 1, 2]  # written in order, on one thread


def test_inline_depth_writes_before_returning():
    done = []
    wb = WriteBehind(depth=0)
    wb.submit(3, done.append, 3)
    assert done == [3] and wb.pending == []
    with pytest.raises(UnitWriteError, match="unit 4"):
        wb.submit(4, lambda: 1 / 0)
