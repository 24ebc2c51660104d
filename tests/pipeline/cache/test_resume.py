"""A killed extraction, re-run, yields the same store: nothing duplicated or lost."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

import storage
from jobs.cli import main
from storage.check import verify
from storage.layout import MANIFEST, UNITS
from storage.writer import read_manifest

ARGS = ["--model", "tiny-llama", "--sites", "resid,mlp_in", "--dtype", "float32",
        "--max-tokens", "1500", "--max-chars", "160", "--unit-tokens", "100", "--workers", "0"]


def slow_extract(out: Path, corpus: Path) -> subprocess.Popen:
    """`cast extract` in a child process, slowed after each commit so it can be killed
    mid-run (the slowdown is injected here, not a switch in the product)."""
    code = textwrap.dedent(f"""
        import sys, time
        import pipeline.cache.extract as E
        run = E.Extractor.run
        def slow(self, unit):
            res = run(self, unit)
            time.sleep(0.4)
            return res
        E.Extractor.run = slow
        from jobs.cli import main
        sys.exit(main(["extract", "--out", {str(out)!r}, "--corpus", {str(corpus)!r}, "--quiet",
                       *{ARGS!r}]))
    """)
    return subprocess.Popen([sys.executable, "-c", code], env=os.environ.copy(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_killed_run_resumes_to_the_identical_store(tmp_path, corpus_dir):
    ref, out = tmp_path / "ref.zarr", tmp_path / "killed.zarr"
    assert main(["extract", "--out", str(ref), "--corpus", str(corpus_dir), "--quiet", *ARGS]) == 0
    planned = len(storage.open_store(ref).meta["plan"])
    assert planned >= 10

    proc = slow_extract(out, corpus_dir)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / MANIFEST).glob("u*.parquet"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = read_manifest(out)
    assert 3 <= len(committed) < planned, "the kill must land mid-run"

    # Damage a killed run can leave: a half-written temp unit, and a unit renamed into
    # place whose manifest row was never written.
    (out / UNITS / ".tmp-u000099-deadbeef").mkdir()
    last = committed[-1]["unit"]
    (out / MANIFEST / f"u{last:06d}.parquet").unlink()
    assert not verify(out).ok

    assert main(["extract", "--out", str(out), "--corpus", str(corpus_dir), "--quiet", *ARGS]) == 0
    report = verify(out)
    assert report.ok, report.lines()
    assert report.units_ok == planned
    assert not list((out / UNITS).glob(".tmp-*"))

    a, b = storage.open_store(ref), storage.open_store(out)
    assert a.units == b.units == list(range(planned))
    seg = b.tokens()["segment_id"].compute()
    assert np.all(np.diff(seg) >= 0)  # each segment once, in order: nothing duplicated
    for field, values in a.tokens().items():
        np.testing.assert_array_equal(values.compute(), b.tokens()[field].compute(), err_msg=field)
    for layer in a.layers:
        for site in a.sites:
            np.testing.assert_array_equal(a.array(layer, site).compute(), b.array(layer, site).compute())


def test_rerun_of_a_complete_store_does_no_work(tmp_path, corpus_dir, capsys):
    out = tmp_path / "s.zarr"
    assert main(["extract", "--out", str(out), "--corpus", str(corpus_dir), "--quiet", *ARGS]) == 0
    before = {p: p.stat().st_mtime_ns for p in (out / MANIFEST).glob("*.parquet")}
    assert main(["extract", "--out", str(out), "--corpus", str(corpus_dir), "--quiet", *ARGS]) == 0
    assert '"extracted_tokens": 0' in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in (out / MANIFEST).glob("*.parquet")}
