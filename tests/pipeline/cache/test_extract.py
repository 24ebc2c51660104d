"""Stored activations equal what the HF model computes directly at the same sites."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import storage
from pipeline.cache.corpus import load_corpus, segment
from pipeline.cache.extract import ExtractConfig, run_extract
from pipeline.cache.hooks import capture, get_layer_list, run_to_deepest
from pipeline.cache.models import load_model

SITES = "resid,attn_in,mlp_in,q_proj.out,v_proj.out,o_proj.in,down_proj.in,up_proj.out"
MLP_NORM = {"llama": "post_attention_layernorm", "gemma3_text": "pre_feedforward_layernorm"}


@torch.no_grad()
def direct(model, ids: list[int]) -> dict:
    """Expected values computed through HF's own outputs and named submodules, not
    through the extraction hooks under test."""
    x = torch.tensor([ids])
    _, blocks = get_layer_list(model)
    mlp_in, down_in = {}, {}
    handles = []
    for i, b in enumerate(blocks):
        handles.append(getattr(b, MLP_NORM[model.config.model_type]).register_forward_hook(
            lambda m, a, o, i=i: mlp_in.__setitem__(i, o[0])))
        handles.append(b.mlp.act_fn.register_forward_hook(
            lambda m, a, o, i=i: down_in.__setitem__(i, o[0])))
    hs = model(input_ids=x, output_hidden_states=True).hidden_states
    for h in handles:
        h.remove()
    out = {}
    for i, b in enumerate(blocks):
        attn_in = b.input_layernorm(hs[i])[0]
        out[(i, "attn_in")] = attn_in
        out[(i, "q_proj.out")] = b.self_attn.q_proj(attn_in)
        out[(i, "v_proj.out")] = b.self_attn.v_proj(attn_in)
        out[(i, "mlp_in")] = mlp_in[i]
        out[(i, "up_proj.out")] = b.mlp.up_proj(mlp_in[i])
        out[(i, "down_proj.in")] = down_in[i] * b.mlp.up_proj(mlp_in[i])
        if i < len(blocks) - 1:  # HF's last hidden state has the final norm applied
            out[(i, "resid")] = hs[i + 1][0]
    return out


def rows_for(store, segment_id: int) -> np.ndarray:
    seg = store.tokens()["segment_id"].compute()
    return np.nonzero(seg == segment_id)[0]


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("dtype,rtol,atol", [("float32", 1e-5, 1e-5), ("bfloat16", 2**-8, 1e-6)])
def test_stored_values_equal_direct_activations(tmp_path, corpus_dir, model_name, dtype, rtol, atol):
    out = tmp_path / "s.zarr"
    cfg = ExtractConfig(model=model_name, out=str(out), corpus=str(corpus_dir), sites=SITES,
                        dtype=dtype, max_tokens=900, max_chars=160, unit_tokens=200,
                        batch_tokens=256, workers=0)
    res = run_extract(cfg, progress=False)
    assert res["units"] > 2  # several units, several padded batches per unit
    store = storage.open_store(out)
    lm = load_model(model_name)
    segs = segment(load_corpus(str(corpus_dir)), 160)
    tok = store.tokens()
    seg_ids = tok["segment_id"].compute()
    checked = 0
    for sid in sorted(set(seg_ids.tolist()))[:6]:
        rows = rows_for(store, sid)
        enc = lm.tokenizer(segs[sid].text, return_offsets_mapping=True)
        np.testing.assert_array_equal(tok["token_id"][rows].compute(), enc["input_ids"])
        np.testing.assert_array_equal(tok["position"][rows].compute(), np.arange(len(rows)))
        np.testing.assert_array_equal(tok["char_end"][rows].compute(), [o[1] for o in enc["offset_mapping"]])
        want = direct(lm.model, enc["input_ids"])
        for (layer, site), value in want.items():
            got = store.array(layer, site)[rows].compute()
            np.testing.assert_allclose(got, value.numpy(), rtol=rtol, atol=atol * value.abs().max().item() + atol,
                                       err_msg=f"{model_name} {dtype} layer {layer} {site} segment {sid}")
            checked += 1
    assert checked > 50


def test_forward_stops_after_deepest_hooked_layer():
    lm = load_model("tiny-llama")
    _, blocks = get_layer_list(lm.model)
    ran = []
    hs = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    head = lm.model.lm_head.register_forward_hook(lambda *a: ran.append("lm_head"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with capture(lm.model, [0, 1], ["resid", "attn_in"]) as got:
        run_to_deepest(lm.model, ids, torch.ones_like(ids))
    for h in [*hs, head]:
        h.remove()
    assert set(got) == {(0, "resid"), (1, "resid"), (0, "attn_in"), (1, "attn_in")}
    assert 2 not in ran and 3 not in ran and "lm_head" not in ran


def test_ray_workers_write_the_same_store_as_in_process(tmp_path, corpus_dir, ray_local):
    kw = dict(model="tiny-gemma3", corpus=str(corpus_dir), sites="resid,attn_in", dtype="float32",
              max_tokens=600, max_chars=160, unit_tokens=150)
    run_extract(ExtractConfig(out=str(tmp_path / "a"), workers=0, **kw), progress=False)
    run_extract(ExtractConfig(out=str(tmp_path / "b"), workers=2, **kw), progress=False)
    a, b = storage.open_store(tmp_path / "a"), storage.open_store(tmp_path / "b")
    assert a.units == b.units and len(a.units) >= 3
    for layer in a.layers:
        np.testing.assert_allclose(a.array(layer, "resid").compute(), b.array(layer, "resid").compute(),
                                   rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(a.tokens()["char_start"].compute(), b.tokens()["char_start"].compute())


def test_running_stats_match_the_stored_values(tmp_path, corpus_dir):
    out = tmp_path / "s"
    run_extract(ExtractConfig(model="tiny-llama", out=str(out), corpus=str(corpus_dir), sites="resid",
                              dtype="float32", max_tokens=500, unit_tokens=120, workers=0), progress=False)
    store = storage.open_store(out)
    x = store.array(2, "resid").compute().astype(np.float64)
    mean, var = store.stats(2, "resid")
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(var, x.var(0), rtol=1e-5, atol=1e-7)
