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


def test_worker_resources_fit_one_node_and_a_larger_request_is_refused(monkeypatch, capsys):
    from runtime.cluster import check_fits, worker_cpus

    two = [{"ip": "a", "CPU": 1.0}, {"ip": "b", "CPU": 1.0, "castnode2": 1.0}]
    assert worker_cpus(two, workers=1, gpus=0) == 1  # a share of both nodes would fit on neither
    mixed = [{"ip": "cpu", "CPU": 8.0}, {"ip": "gpu", "CPU": 4.0, "GPU": 1.0}]
    assert worker_cpus(mixed, workers=1, gpus=1) == 4 and worker_cpus(mixed, workers=4, gpus=0) == 3
    check_fits(mixed, 4, 1, ("--cpus-per-worker", "--gpus-per-worker"))
    monkeypatch.delenv("CAST_AUTOSCALING", raising=False)
    with pytest.raises(ValueError, match=r"--cpus-per-worker 5 --gpus-per-worker 1: each worker would need 5 "
                                         r"CPU\(s\) and 1 GPU\(s\) on one node, but no node .* \(cpu 8 CPU 0 GPU, "
                                         r"gpu 4 CPU 1 GPU\)"):
        check_fits(mixed, 5, 1, ("--cpus-per-worker", "--gpus-per-worker"))
    with pytest.raises(ValueError, match=r"^--cpus-per-head 2: "):
        check_fits(two, 2, 0, ("--cpus-per-head", ""))
    monkeypatch.setenv("CAST_AUTOSCALING", "1")  # a cluster that can add the node waits for it instead
    check_fits(two, 2, 0, ("--cpus-per-head", ""))
    assert "waiting for the autoscaler" in capsys.readouterr().err
