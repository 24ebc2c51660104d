"""Weight-space baseline and the validation report, end to end on tiny models."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from pipeline.lora.adapters import load_adapter
from pipeline.cache.models import load_model
from pipeline.assemble.validate import paired_ratio_ci
from pipeline.assemble.weightspace import project_update, weightspace_adapter
from tests.pipeline.assemble.bridge_fixtures import random_adapter

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])


def test_weight_space_transfer_onto_the_same_model_is_exact(tmp_path):
    targets = ["q_proj", "v_proj", "down_proj"]
    adapter = random_adapter(tmp_path / "lora", "tiny-llama", targets)
    weightspace_adapter(adapter, load_model("tiny-llama").model, load_model("tiny-llama").model,
                        {i: i for i in range(4)}, tmp_path / "ws", carry="mapped")
    with torch.no_grad():
        want = load_adapter(load_model("tiny-llama").model, adapter)(input_ids=IDS).logits
        got = load_adapter(load_model("tiny-llama").model, tmp_path / "ws")(input_ids=IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_projection_moves_between_different_widths():
    g = torch.Generator().manual_seed(0)
    w_s, w_t = torch.randn(6, 5, generator=g), torch.randn(8, 7, generator=g)
    d = torch.randn(6, 5, generator=g)
    out = project_update(d, w_s, w_t)
    assert out.shape == (8, 7)
    # Widening both sides re-embeds the whole update orthonormally: its norm is kept.
    torch.testing.assert_close(out.norm(), d.norm(), rtol=1e-4, atol=1e-4)
    assert project_update(torch.randn(8, 7, generator=g), w_t, w_s).shape == (6, 5)


def test_paired_ratio_ci():
    base = [0] * 50 + [1] * 10
    ref = [1] * 50 + [1] * 10
    half = [1] * 25 + [0] * 25 + [1] * 10
    rec, rat = paired_ratio_ci(half, base, ref, n_boot=500)
    assert rec["value"] == pytest.approx(0.5)
    assert rat["value"] == pytest.approx(35 / 60)
    assert rec["ci_low"] < 0.5 < rec["ci_high"]
    rec, _ = paired_ratio_ci(half, ref, ref, n_boot=200)  # retrained no better than base
    assert np.isnan(rec["value"])
