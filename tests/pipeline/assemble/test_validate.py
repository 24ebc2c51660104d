"""Weight-space baseline and the validation report, end to end on tiny models."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from pipeline.lora.adapters import load_adapter
from pipeline.cache.models import load_model
from pipeline.assemble.report import paired_ratio_ci
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


def test_singular_bases_are_taken_once_per_module_and_match_a_fresh_svd():
    from pipeline.assemble import weightspace

    g = torch.Generator().manual_seed(1)
    w_s, w_t, d = torch.randn(6, 5, generator=g), torch.randn(8, 7, generator=g), torch.randn(6, 5, generator=g)
    u_s, _, vh_s = torch.linalg.svd(w_s.double(), full_matrices=True)
    u_t, _, vh_t = torch.linalg.svd(w_t.double(), full_matrices=True)
    want = (u_t[:, :6] @ (u_s[:, :6].T @ d.double() @ vh_s[:5].T) @ vh_t[:5]).float()
    weightspace.BASES.clear()
    assert torch.equal(project_update(d, w_s, w_t), want)  # bit for bit what it computed before the memo
    assert len(weightspace.BASES) == 2
    first = weightspace.singular_bases(w_t)
    assert weightspace.singular_bases(w_t.clone()) is first  # same values, another tensor: the memo
    assert torch.equal(project_update(d, w_s.clone(), w_t.clone()), want) and len(weightspace.BASES) == 2
    assert weightspace.singular_bases(w_t + 1) is not first


def test_offtask_base_logits_are_kept_per_base_and_text():
    from pipeline.assemble import scoring

    scoring.BASE_LOGITS.clear()
    held = torch.arange(12).reshape(3, 4)
    cache = scoring.base_cache("w1", held, 4)
    assert scoring.base_cache("w1", held.clone(), 4) is cache  # another task, the same base and text
    assert scoring.base_cache("w1", held + 1, 4) is not cache and scoring.base_cache("w2", held, 4) is not cache
    assert len(scoring.BASE_LOGITS) == 2  # one per side


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


def test_recovery_intervals_resample_items_paired_across_systems():
    # 20 items under 3 prompts each, every system answering an item's prompts alike (as on capital).
    items = [f"country{i}" for i in range(20) for _ in range(3)]
    knows = {"base": range(0, 20, 5), "ref": range(0, 20, 1), "x": range(0, 20, 2)}
    base, ref, x = ([float(int(it[7:]) in knows[k]) for it in items] for k in ("base", "ref", "x"))
    plain_rec, plain_rat = paired_ratio_ci(x, base, ref, n_boot=2000)
    rec, rat = paired_ratio_ci(x, base, ref, n_boot=2000, groups=items)
    assert rec["value"] == plain_rec["value"] == pytest.approx((0.5 - 0.2) / (1.0 - 0.2))

    def width(d):
        return d["ci_high"] - d["ci_low"]
    assert width(rec) > 1.4 * width(plain_rec) and width(rat) > 1.4 * width(plain_rat)
    # Every example its own group (named in any order) is the plain bootstrap, draw for draw.
    singles = [f"p{i}" for i in np.random.default_rng(0).permutation(len(items))]
    assert paired_ratio_ci(x, base, ref, n_boot=2000, groups=singles) == (plain_rec, plain_rat)


def test_the_proxy_is_scored_right_after_the_target_base():
    from pipeline.assemble.validate import SYSTEMS, _scoring_order

    order = [s.key for s in _scoring_order(list(SYSTEMS))]
    assert order[order.index("target-base") + 1] == "proxy" and sorted(order) == sorted(s.key for s in SYSTEMS)
    no_proxy = [s for s in SYSTEMS if s.key != "proxy"]
    assert _scoring_order(no_proxy) == no_proxy
