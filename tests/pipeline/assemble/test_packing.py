"""Packed teacher samples (one row per prompt) give every selected position the logits it has
in the sample's own row, on tiny Llama and Gemma-3 models (Gemma-3's sliding window of 16
positions is shorter than the packed rows, so the per-layer-type masks are exercised)."""
from __future__ import annotations

import pytest
import torch

from pipeline.assemble.packing import for_model, packed_batch, prompt_groups
from pipeline.assemble.teacher import Sample, batch_of, sparse_kl
from pipeline.cache.models import load_model
from pipeline.lora.train import causal_lm_logits


def samples(vocab: int, seed: int = 0) -> list[Sample]:
    """Three prompts (11-14 tokens) with 1-3 continuations each (1-8 tokens), interleaved."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for p, (plen, conts) in enumerate([(12, [5, 1, 8]), (14, [3, 6]), (11, [7])]):
        prompt = torch.randint(3, vocab, (plen,), generator=g).tolist()
        for n in conts:
            cont = torch.randint(3, vocab, (n,), generator=g).tolist()
            top_ids = torch.randint(0, vocab, (n, 4), generator=g).to(torch.int32)
            top_lp = torch.randn(n, 4, generator=g).log_softmax(-1) - 0.1
            out.append((p, Sample(prompt + cont, plen, top_ids, top_lp)))
    return [x for _, x in sorted(out, key=lambda t: (t[1].ids[-1], t[0]))]  # prompts' samples interleaved


@pytest.mark.parametrize("name,impl", [("tiny-llama", "sdpa"), ("tiny-gemma3", "sdpa"), ("tiny-gemma3", "eager")])
def test_packed_rows_give_each_position_its_own_rows_logits(name, impl):
    lm = load_model(name)
    model = lm.model.eval()
    model.config._attn_implementation = impl
    xs = samples(model.config.vocab_size)
    groups = prompt_groups(xs)
    assert sorted(len(g) for g in groups) == [1, 2, 3]
    ordered = [xs[i] for g in groups for i in g]
    ids, select, target = batch_of(ordered, pad_id=0)
    inputs, picks, packed_target = packed_batch([[xs[i] for i in g] for g in groups], pad_id=0)
    assert inputs["input_ids"].shape[1] > 16  # longer than tiny-gemma3's sliding window
    assert inputs["input_ids"].numel() < ids.numel()  # the point: fewer tokens
    with torch.no_grad():
        alone = causal_lm_logits(model, select, input_ids=ids)
        packed = causal_lm_logits(model, picks, **for_model(inputs, model))
    assert packed.shape == alone.shape
    assert (packed - alone).abs().max().item() < 1e-4
    for a, b in zip(target, packed_target):
        assert torch.equal(a, b)
    assert torch.allclose(sparse_kl(packed, *packed_target), sparse_kl(alone, *target), atol=1e-5)


def test_prompt_groups_keep_first_appearance_order():
    xs = [Sample([1, 2, 3, 9], 3, None, None), Sample([4, 5, 8], 2, None, None), Sample([1, 2, 3, 7, 1], 3, None, None),
          Sample([1, 2, 9], 2, None, None)]  # the last shares tokens with the first but not its prompt
    assert prompt_groups(xs) == [[0, 2], [1], [3]]
