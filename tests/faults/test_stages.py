"""Stages facing a store that vanishes under them, a store too small for them, or a
failure: they stop with one line, and leave nothing a rerun would trip over."""
from __future__ import annotations

import shutil

import pytest

import pipeline.cache.extract as extract_mod
from storage.writer import write_unit
from tests.faults.conftest import EXTRACT, cast


@pytest.mark.parametrize("removed", ["everything", "the root only"])
def test_store_removed_during_extraction_fails_and_rerun_says_how_to_recover(tmp_path, corpus_dir, capsys,
                                                                             monkeypatch, removed):
    out = tmp_path / "s.zarr"

    def write_then_vanish(path, unit, *args):
        if unit == 1:  # someone removes the store (or an `rm -r` of it is half done) while units are written
            shutil.rmtree(out) if removed == "everything" else (out / "zarr.json").unlink()
        return write_unit(path, unit, *args)

    monkeypatch.setattr(extract_mod.Extractor, "write", staticmethod(write_then_vanish))
    argv = ["extract", "--model", "tiny-llama", "--out", out, "--corpus", corpus_dir, *EXTRACT]
    code, stdout, err = cast(capsys, *argv)
    assert code == 2 and f"{out}: the store vanished while unit 1 was written (no zarr.json)" in err
    assert "Traceback" not in err and '"units"' not in stdout  # no report of success
    monkeypatch.undo()
    if removed == "the root only":
        code, _, err = cast(capsys, *argv)
        assert code == 2 and "holds the remains of a store whose root (zarr.json) is gone" in err
        assert f"delete {out} and rerun" in err
        shutil.rmtree(out)
    assert cast(capsys, *argv)[0] == 0  # what the message says works


@pytest.fixture(scope="module")
def one_segment(tmp_path_factory, corpus_dir):
    """Two stores of a single text segment each, aligned and layer-mapped."""
    from tests.faults.conftest import make_pair

    return make_pair(tmp_path_factory.mktemp("small"), corpus_dir,
                     ["--max-tokens", "400", "--sites", "resid", "--workers", "0", "--quiet"])


def test_train_heads_refuses_a_one_segment_store_before_any_ray_work(one_segment, capsys, monkeypatch):
    import runtime.work

    def no_ray(*a, **k):
        raise AssertionError("Ray work started")

    monkeypatch.setattr(runtime.work, "_run_on_ray", no_ray)
    out = one_segment / "heads"
    code, _, err = cast(capsys, "train-heads", "--src-store", one_segment / "src.zarr", "--tgt-store",
                        one_segment / "tgt.zarr", "--align", one_segment / "align", "--layermap", one_segment / "map",
                        "--sites", "resid", "--out", out, "--quiet")
    assert code == 2 and "from 1 text segment(s)" in err
    assert "train-heads needs at least 2 segments (one is held out) and 16 training pairs" in err
    assert "--max-tokens" in err and "Traceback" not in err and err.count("\n") == 1
    assert not out.exists()


def test_failed_validate_leaves_no_empty_out(tmp_path, capsys):
    out = tmp_path / "report"
    code, _, err = cast(capsys, "validate", "--adapter", tmp_path / "no-adapter", "--heads", tmp_path / "no-heads",
                        "--out", out)
    assert code == 2 and "Traceback" not in err
    assert not out.exists()


def test_failed_stage_keeps_an_out_that_was_there(tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    code, _, _ = cast(capsys, "validate", "--adapter", tmp_path / "no-adapter", "--heads", tmp_path / "no-heads",
                      "--out", out)
    assert code == 2 and out.is_dir()  # the user's own directory is never removed


def test_quiet_silences_the_libraries_progress_bars(tmp_path, corpus_dir, capsys):
    import transformers.utils.logging as tlog

    tlog.enable_progress_bar()  # as in a fresh process: transformers draws its weight-loading bar
    try:
        code, _, err = cast(capsys, "extract", "--model", "tiny-gemma3", "--out", tmp_path / "s.zarr", "--corpus",
                            corpus_dir, *EXTRACT)
    finally:
        tlog.enable_progress_bar()
    assert code == 0
    assert "%|" not in err and "it/s" not in err and "Loading weights" not in err, err
