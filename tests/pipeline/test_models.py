"""Model registry: tiny presets, local directories, and the errors users will hit."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.cache.hooks import get_layer_list
from pipeline.cache.models import REGISTRY, ModelError, fetch_model, load_model, pick_device, resolve


def test_tiny_presets_are_two_architectures_with_two_tokenizers():
    a, b = load_model("tiny-llama"), load_model("tiny-gemma3")
    assert (a.info.arch, b.info.arch) == ("llama", "gemma3_text")
    assert a.info.tokenizer_hash != b.info.tokenizer_hash
    text = "Seven green windows, 42 boats."
    ea = a.tokenizer(text, return_offsets_mapping=True)
    eb = b.tokenizer(text, return_offsets_mapping=True)
    assert ea["input_ids"][0] != b.tokenizer.bos_token_id and eb["input_ids"][0] == b.tokenizer.bos_token_id
    ends_a = {e for _, e in ea["offset_mapping"]}
    ends_b = {e for _, e in eb["offset_mapping"][1:]}
    assert ends_a != ends_b and len(ends_a & ends_b) >= 3  # partly aligned, as real pairs are
    assert len(get_layer_list(a.model)[1]) == a.info.num_layers


def test_tiny_preset_is_built_deterministically(tmp_path, monkeypatch):
    first = fetch_model("tiny-gemma3")
    monkeypatch.setenv("CAST_CACHE", str(tmp_path))
    second = fetch_model("tiny-gemma3")
    assert first != second
    assert json.loads((first / "cast_model.json").read_text()) == json.loads((second / "cast_model.json").read_text())


def test_local_directory_loads_and_is_hashed(tmp_path):
    lm = load_model("tiny-llama")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    other = load_model(str(tmp_path))
    assert other.info.weights_hash == lm.info.weights_hash  # same bytes, same identity
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(other.model(ids).logits, lm.model(ids).logits)


def test_bad_model_specs(tmp_path):
    with pytest.raises(ModelError, match="unknown model name 'gemma-9000'"):
        fetch_model("gemma-9000")
    with pytest.raises(ModelError, match="has no config.json"):
        resolve(str(tmp_path))
    with pytest.raises(ModelError, match="not a known name"):
        resolve("./missing-dir")


def test_registry_pins_the_real_models():
    assert set(REGISTRY) == {"smollm2-135m", "gemma3-270m"}
    assert all(len(m.sha256) == 64 and m.wheels for m in REGISTRY.values())
    assert pick_device("cpu").type == "cpu"
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
