"""Store contract: overflow-scale values stored finite, expectations enforced, damage found."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import storage
from pipeline.cache.extract import ExtractConfig, run_extract
from pipeline.cache.models import fetch_model, load_model
from storage.check import format_summary, summary, verify
from storage.layout import UNITS, StoreError, decode, encode


@pytest.fixture(scope="module")
def huge_model_dir(tmp_path_factory):
    """tiny-llama with its embedding scaled so the residual stream reaches ~1e5, as
    Gemma-3's does on ordinary text; saved as a plain local HF directory."""
    lm = load_model("tiny-llama")
    with torch.no_grad():
        lm.model.model.embed_tokens.weight.mul_(5e6)
    d = tmp_path_factory.mktemp("huge")
    lm.model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    return d


def test_overflow_scale_activations_are_stored_finite_and_exact(tmp_path, corpus_dir, huge_model_dir):
    out = tmp_path / "s.zarr"
    run_extract(ExtractConfig(model=str(huge_model_dir), out=str(out), corpus=str(corpus_dir), sites="resid",
                              layers="0", max_tokens=300, workers=0), progress=False)
    store = storage.open_store(out)
    x = store.array(0, "resid").compute()
    assert np.isfinite(x).all()
    assert np.abs(x).max() > 65504  # would be inf in float16
    lm = load_model(str(huge_model_dir))
    ids = store.tokens()["token_id"].compute()
    seg = store.tokens()["segment_id"].compute()
    rows = np.nonzero(seg == seg[0])[0]
    with torch.no_grad():
        want = lm.model(input_ids=torch.from_numpy(ids[rows][None]), output_hidden_states=True).hidden_states[1][0]
    np.testing.assert_allclose(x[rows], want.numpy(), rtol=2**-8, atol=1e-3)
    assert verify(out).ok


def test_float16_overflow_is_refused_naming_the_site(tmp_path, corpus_dir, huge_model_dir):
    out = tmp_path / "s.zarr"
    with pytest.raises(StoreError, match=r"layer 0 site resid .*beyond float16.*--dtype bfloat16"):
        run_extract(ExtractConfig(model=str(huge_model_dir), out=str(out), corpus=str(corpus_dir),
                                  sites="resid", layers="0", dtype="float16", max_tokens=300, workers=0),
                    progress=False)
    assert storage.open_store(out).units == []  # nothing half-written was committed


def test_encode_refuses_nan_and_roundtrips_bf16():
    with pytest.raises(StoreError, match="non-finite"):
        encode(torch.tensor([[1.0, float("nan")]]), "bfloat16", "here")
    x = torch.tensor([[1.0, -3.5, 1e5, 3e38]])
    np.testing.assert_array_equal(decode(encode(x, "bfloat16", "here"), "bfloat16"),
                                  x.to(torch.bfloat16).float().numpy())


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, corpus_dir):
    out = tmp_path_factory.mktemp("store") / "s.zarr"
    run_extract(ExtractConfig(model="tiny-gemma3", out=str(out), corpus=str(corpus_dir),
                              sites="resid,k_proj.out", max_tokens=400, max_chars=160, unit_tokens=100,
                              workers=0),
                progress=False)
    return out


def test_dask_arrays_and_token_metadata_line_up(small_store):
    store = storage.open_store(small_store)
    n = store.n_tokens
    assert store.array(1, "resid").shape == (n, 48)
    assert store.array(1, "k_proj.out").shape == (n, 24)  # 1 kv head x 24: width read off the module
    tok = store.tokens()
    assert all(v.shape == (n,) for v in tok.values())
    assert (tok["char_end"] >= tok["char_start"]).all().compute()
    assert len(store.units) == len(store.meta["plan"]) >= 3


def test_open_store_refuses_mismatched_expectations(small_store, tmp_path):
    info = json.loads((fetch_model("tiny-llama") / "cast_model.json").read_text())
    with pytest.raises(StoreError) as e:
        storage.open_store(small_store, expect={"model": "tiny-llama", "tokenizer_hash": info["tokenizer_hash"],
                                                "sites": ["resid", "v_proj.in"]})
    msg = str(e.value)
    assert "model: expected 'tiny-llama', store has 'tiny-gemma3'" in msg
    assert "tokenizer_hash" in msg and "['v_proj.in'] not in store" in msg
    with pytest.raises(StoreError, match="not an activation store"):
        storage.open_store(tmp_path)
    with pytest.raises(StoreError, match="site 'mlp_in' not stored"):
        storage.open_store(small_store).array(0, "mlp_in")


def test_a_store_of_another_format_is_refused_with_what_to_do(small_store, tmp_path):
    old = tmp_path / "old.zarr"
    shutil.copytree(small_store, old)
    root = json.loads((old / "zarr.json").read_text())
    root["attributes"]["cast"]["format_version"] = 2  # no checksums: refused, not read unchecked
    (old / "zarr.json").write_text(json.dumps(root))
    with pytest.raises(StoreError, match=r"store format 2; this CAST reads formats 3, 4 \(checksummed chunks\)\. "
                                         r"Re-extract .* new --out \(same flags\)"):
        storage.open_store(old)


def test_stats_rows_follow_layers_for_every_site(small_store):
    store = storage.open_store(small_store)
    for site in store.sites:
        for layer in store.layers:
            x = store.array(layer, site).compute().astype(np.float64)
            mean, var = store.stats(layer, site)
            np.testing.assert_allclose(mean, x.mean(0), rtol=1e-2, atol=1e-2)  # stats are of the
            np.testing.assert_allclose(var, x.var(0), rtol=2e-2, atol=1e-2)    # float32 values, x is bf16


def test_verify_finds_corruption_and_missing_units(small_store, tmp_path):
    import shutil

    bad = tmp_path / "bad.zarr"
    shutil.copytree(small_store, bad)
    chunk = next(p for p in (bad / UNITS / "u000001").rglob("c/*") if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:-4] + b"\0\0\0\0")
    shutil.rmtree(bad / UNITS / "u000002")
    report = verify(bad)
    text = "\n".join(report.lines())
    assert not report.ok
    assert "unit 1:" in text and "unit 2: manifest row exists but" in text
    assert verify(small_store).ok


def test_inspect_summarises(small_store):
    info = summary(small_store)
    assert info["tokens"] == storage.open_store(small_store).n_tokens
    assert info["bytes_on_disk"] > 0 and len(info["per_layer"]) == 3 * 2
    text = format_summary(info)
    assert "tiny-gemma3" in text and "k_proj.out" in text
