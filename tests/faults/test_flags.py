"""Every flag out of its range is refused up front with one line naming the flag and the
range, exit status 2, before anything is read or written."""
from __future__ import annotations

import pytest

from tests.faults.conftest import cast

STORES = ["S", "T"]  # never opened: the flags are refused first
HEADS = ["--src-store", "S", "--tgt-store", "T", "--align", "A", "--layermap", "M", "--out", "H"]
VALIDATE = ["--adapter", "L", "--heads", "H", "--out", "R"]


@pytest.mark.parametrize("argv,message", [
    (["evaluate", "--model", "tiny-llama", "--task", "add2", "--limit", "0"],
     "--limit must be at least 1, got 0 (omit --limit to score every test example)"),
    (["evaluate", "--model", "tiny-llama", "--task", "add2", "--limit", "-1"], "--limit must be at least 1, got -1"),
    (["evaluate", "--model", "tiny-llama", "--task", "add2", "--n-boot", "0"], "--n-boot must be at least 1, got 0"),
    (["evaluate", "--model", "tiny-llama", "--task", "add2", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["validate", *VALIDATE, "--limit", "0"], "--limit must be at least 1, got 0"),
    (["validate", *VALIDATE, "--n-boot", "0"], "--n-boot must be at least 1, got 0"),
    (["validate", *VALIDATE, "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["lora", "train", "--model", "tiny-llama", "--task", "add2", "--out", "L", "--batch-size", "0"],
     "--batch-size must be at least 1, got 0"),
    (["train-heads", *HEADS, "--workers", "-1"], "--workers must be at least 0, got -1"),
    (["train-heads", *HEADS, "--max-pairs", "-3"], "--max-pairs must be at least 0 (0: all pairs), got -3"),
    (["train-heads", *HEADS, "--max-retries", "-1"], "--max-retries must be at least 0, got -1"),
    (["train-heads", *HEADS, "--min-position", "-1"], "--min-position must be at least 0, got -1"),
    (["train-heads", *HEADS, "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["train-heads", *HEADS, "--stats", "sinkless"], "--stats 'sinkless': choose 'store' or 'pairs'"),
    (["validate", *VALIDATE, "--first-token", "skip"], "--first-token 'skip': choose 'bridge' or 'keep'"),
    (["validate", *VALIDATE, "--carry", "some"], "--carry 'some': choose 'all' or 'mapped'"),
    (["transfer", "--adapter", "L", "--out", "B", "--first-token", "skip"],
     "--first-token 'skip': choose 'bridge' or 'keep'"),
    (["run", "--task-workers", "-1"], "--task-workers must be at least 0, got -1"),
    (["distill", "--adapter", "L", "--out", "D", "--precision", "float16"],
     "--precision float16: choose one of auto, float32, bfloat16"),
    (["lora", "train", "--model", "tiny-llama", "--task", "add2", "--out", "L", "--precision", "half"],
     "--precision half: choose one of auto, float32, bfloat16"),
    (["run", "--cpus-per-task", "0"], "--cpus-per-task must be at least 1, got 0"),
    (["inspect", "S", "--sample-tokens", "0"], "--sample-tokens must be at least 1, got 0"),
    (["inspect", "S", "--sample-tokens", "-1"], "--sample-tokens must be at least 1, got -1"),
    (["align", *STORES, "--out", "A", "--row-group", "0"], "--row-group must be at least 1, got 0"),
    (["layermap", *STORES, "--align", "A", "--out", "M", "--outlier-norm", "-1"],
     "--outlier-norm must be >= 0 (0 keeps every pair), got -1.0"),
    (["layermap", *STORES, "--align", "A", "--out", "M", "--min-position", "-1"], "--min-position must be >= 0"),
    (["layermap", *STORES, "--align", "A", "--out", "M", "--n-pairs", "1"], "--n-pairs must be at least 2, got 1"),
])
def test_out_of_range_flag_is_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = cast(capsys, *argv)
    assert code == 2, err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing was written
