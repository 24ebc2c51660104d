"""The one atomic-commit helper every stage writes through."""
from __future__ import annotations

import pytest

from storage.files import TMP_PREFIX, atomic_path, atomic_write_text, commit


def leftovers(d):
    return [p.name for p in d.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_a_file_appears_whole_and_replaces_the_old_one(tmp_path):
    f = tmp_path / "a.json"
    atomic_write_text(f, "old")
    atomic_write_text(f, "new")
    assert f.read_text() == "new" and not leftovers(tmp_path)


def test_a_failed_write_leaves_the_old_artifact_and_no_temp(tmp_path):
    d = tmp_path / "artifact"
    with atomic_path(d) as tmp:
        tmp.mkdir()
        (tmp / "x").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_path(d) as tmp:
            tmp.mkdir()
            (tmp / "x").write_text("2")
            raise RuntimeError("killed mid-write")
    assert (d / "x").read_text() == "1" and not leftovers(tmp_path)


def test_a_directory_replaces_a_leftover_but_keeps_a_finished_copy(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "half-written").write_text("")
    with atomic_path(final, keep="done") as tmp:  # no marker: the leftover is replaced
        tmp.mkdir()
        (tmp / "done").write_text("ours")
    assert sorted(p.name for p in final.iterdir()) == ["done"]
    other = tmp_path / "theirs"
    other.mkdir()
    (other / "done").write_text("theirs")
    assert commit(other, final, keep="done") is False  # a finished copy is already there
    assert (final / "done").read_text() == "ours" and not other.exists()
