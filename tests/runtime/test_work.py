"""run_items: the same retries in this process and on Ray, and a dead Ray worker replaced."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from runtime.work import run_items


class Flaky:
    """Fails an item the first time it sees it (by a marker file, so Ray actors share it);
    `how` says whether it raises or kills its own process."""

    def __init__(self, scratch: str, how: str):
        self.scratch, self.how = Path(scratch), how

    def run(self, item):
        marker = self.scratch / f"seen-{item}"
        if item % 2 == 0 and not marker.exists():
            marker.write_text("")
            if self.how == "exit":
                os._exit(1)  # the worker process dies mid-item
            raise OSError(f"item {item} interrupted")
        return item * 10

    def flush(self):
        (self.scratch / f"flushed-{os.getpid()}").write_text("")


def test_in_process_retries_then_succeeds(tmp_path, capsys):
    got = {}
    run_items(range(4), Flaky, (str(tmp_path), "raise"), workers=0, retries=1,
              label=lambda i: f"item {i}", on_result=got.__setitem__)
    assert got == {0: 0, 1: 10, 2: 20, 3: 30}
    assert "item 2 failed (OSError: item 2 interrupted); retry 1/1" in capsys.readouterr().err
    assert list(tmp_path.glob("flushed-*"))


def test_no_retries_raises_the_error_itself_and_retries_run_out(tmp_path):
    with pytest.raises(OSError, match="item 0 interrupted"):
        run_items(range(2), Flaky, (str(tmp_path), "raise"), workers=0)
    with pytest.raises(ValueError, match="never"):
        run_items([1], Failing, (), workers=0)
    with pytest.raises(RuntimeError, match="item 1 failed 3 times; last error: never"):
        run_items([1], Failing, (), workers=0, retries=2, label=lambda i: f"item {i}")


class Failing:
    def run(self, item):
        raise ValueError("never")

    def flush(self):
        pass


def test_a_killed_ray_worker_is_replaced_and_its_item_retried(tmp_path, ray_local):
    (tmp_path / "s").mkdir()
    got = {}
    run_items(range(4), Flaky, (str(tmp_path / "s"), "exit"), workers=2, cpus_per_worker=1, retries=1,
              label=lambda i: f"item {i}", on_result=got.__setitem__)
    assert got == {0: 0, 1: 10, 2: 20, 3: 30}
    assert len(list((tmp_path / "s").glob("flushed-*"))) == 2  # every live worker flushed at the end
