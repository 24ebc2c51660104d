"""The frozen base in bfloat16 while a LoRA trains: the LoRA stays float32, its gradient
is the float32 one up to bfloat16 rounding, and the base's float32 weights come back bit
for bit."""
from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from pipeline.cache.models import load_model
from pipeline.lora.precision import frozen_base_in, resolve_precision
from pipeline.lora.train import causal_lm_logits


def _student():
    torch.manual_seed(0)
    model = get_peft_model(load_model("tiny-llama").model, LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():  # B starts at zero: make the LoRA act, so every grad is non-zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _grads(model) -> torch.Tensor:
    ids = torch.randint(3, 200, (4, 12), generator=torch.Generator().manual_seed(1))
    model.zero_grad(set_to_none=True)
    causal_lm_logits(model, None, input_ids=ids).log_softmax(-1)[:, 7].mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def test_bfloat16_base_trains_the_float32_lora_and_gives_the_weights_back():
    model = _student()
    frozen = {n: (p.data_ptr(), p.data.clone()) for n, p in model.named_parameters() if not p.requires_grad}
    want = _grads(model)
    with frozen_base_in(model, "bfloat16"):
        dtypes = {p.dtype for p in model.parameters() if not p.requires_grad}
        lora_dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
        got = _grads(model)
    assert dtypes == {torch.bfloat16} and lora_dtypes == {torch.float32}
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert not torch.equal(got, want)  # it did compute in bfloat16
    cos = torch.nn.functional.cosine_similarity(got, want, dim=0).item()
    assert cos > 0.99, cos
    for n, p in model.named_parameters():
        if n in frozen:
            ptr, copy = frozen[n]
            assert p.dtype == torch.float32 and p.data_ptr() == ptr and torch.equal(p.data, copy), n


def test_weights_come_back_when_training_fails():
    model = _student()
    before = {n: p.data_ptr() for n, p in model.named_parameters() if not p.requires_grad}
    with pytest.raises(RuntimeError, match="stop"):
        with frozen_base_in(model, "bfloat16"):
            raise RuntimeError("stop")
    assert all(p.dtype == torch.float32 and p.data_ptr() == before[n]
               for n, p in model.named_parameters() if n in before)


def test_auto_is_bfloat16_only_where_it_is_fast(monkeypatch):
    assert resolve_precision("float32", "cuda") == "float32"
    assert resolve_precision("bfloat16", "cpu") == "bfloat16"
    assert resolve_precision("auto", "cuda") == "bfloat16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert resolve_precision("auto", "cpu") == "float32"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_precision("auto", "cpu") == "bfloat16"
    with pytest.raises(ValueError, match="--precision half"):
        resolve_precision("half", "cpu")


def test_lora_trained_on_a_bfloat16_base_learns_and_records_it(tmp_path):
    from pipeline.lora.train import LoraTrainConfig, train_lora
    from tests.pipeline.lora.test_lora import const_task

    lm = load_model("tiny-llama")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    cfg = LoraTrainConfig(model="tiny-llama", out=str(tmp_path / "a"), targets="all", rank=4, steps=25,
                          batch_size=8, lr=1e-2, seed=1, precision="bfloat16")
    res = train_lora(cfg, task=const_task(), loaded=lm, progress=False)
    first, last = sum(res.losses[:3]) / 3, sum(res.losses[-3:]) / 3
    assert last < first - 0.8, (first, last)  # as the float32 run in test_lora.py
    meta = json.loads((tmp_path / "a" / "cast_lora.json").read_text())
    assert meta["recipe"]["precision"] == "bfloat16"
    for n, p in lm.model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n
