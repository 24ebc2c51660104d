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


def test_the_prompts_own_positions_join_the_loss_at_their_weight():
    """With the teacher along each prompt (teacher_along), a packed row also selects the
    prompt's own columns: their logits are those of the prompt read alone, and the loss is
    the continuations' mean KL plus `weight` times the prompts' mean KL."""
    from pipeline.assemble.teacher import Along

    model = load_model("tiny-llama").model.eval()
    vocab = model.config.vocab_size
    xs = samples(vocab)
    groups = [[xs[i] for i in g] for g in prompt_groups(xs)]
    g = torch.Generator().manual_seed(1)
    along = [Along(cols, torch.randint(0, vocab, (len(cols), 4), generator=g).to(torch.int32),
                   torch.randn(len(cols), 4, generator=g).log_softmax(-1) - 0.1)
             for cols in ([1, 2, 5, 9], [3, 8], [])]  # the last prompt has none
    inputs, picks, target = packed_batch(groups, 0, along, weight=0.5)
    plain_inputs, plain_picks, plain_target = packed_batch(groups, 0)
    with torch.no_grad():
        logits = causal_lm_logits(model, picks, **for_model(inputs, model))
        cont = causal_lm_logits(model, plain_picks, **for_model(plain_inputs, model))
        own = torch.cat([causal_lm_logits(model, torch.tensor([[c in a.cols for c in range(x[0].start)]]),
                                          input_ids=torch.tensor([x[0].ids[:x[0].start]])) for x, a in zip(groups, along)])
    n = len(cont)
    assert len(logits) == n + 6 and (logits[:n] - cont).abs().max() < 1e-5
    assert (logits[n:] - own).abs().max() < 1e-4
    prompts_kl = sparse_kl(own, torch.cat([a.top_ids for a in along]), torch.cat([a.top_lp for a in along]))
    want = sparse_kl(cont, *plain_target) + 0.5 * prompts_kl
    assert torch.allclose(sparse_kl(logits, *target), want, atol=1e-5)
    assert prompts_kl > 0.1  # so the weight is seen
