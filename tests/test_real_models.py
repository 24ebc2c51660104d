"""The real path: fetch both real models through the project's own fetch code (cached
in the user cache across runs), extract a handful of segments of the built-in corpus,
and check the stores against the models computed directly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import storage
from jobs.cli import main
from pipeline.cache.models import load_model
from storage.check import summary, verify

pytestmark = pytest.mark.real


@pytest.fixture
def user_cache(monkeypatch):
    # The real checkpoints are large: share the user's cache rather than the test cache.
    monkeypatch.setenv("CAST_CACHE", str(Path.home() / ".cache" / "cast"))


@pytest.mark.parametrize("name,workers,width", [("smollm2-135m", "0", 576), ("gemma3-270m", "1", 640)])
def test_fetch_and_extract_real_model(tmp_path, user_cache, capsys, name, workers, width):
    out = tmp_path / f"{name}.zarr"
    assert main(["extract", "--model", name, "--out", str(out), "--max-tokens", "300",
                 "--max-chars", "256", "--sites", "resid,attn_in,v_proj.out", "--layers", "0,5,-1",
                 "--workers", workers, "--quiet"]) == 0
    report = verify(out)
    assert report.ok, report.lines()
    store = storage.open_store(out, expect={"model": name, "corpus_hash": storage.open_store(out).meta["corpus"]["hash"]})
    info = summary(out)
    assert 100 < info["tokens"] <= 300 and info["bytes_on_disk"] > 0
    assert store.array(5, "resid").shape == (info["tokens"], width)

    lm = load_model(name)
    tok = store.tokens()
    seg = tok["segment_id"].compute()
    rows = np.nonzero(seg == seg[0])[0]
    ids = torch.from_numpy(tok["token_id"].compute()[rows][None])
    with torch.no_grad():
        hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in (0, 5):
        want = hs[layer + 1][0].numpy()
        got = store.array(layer, "resid")[rows].compute()
        np.testing.assert_allclose(got, want, rtol=2**-8, atol=1e-4 * np.abs(want).max())
