"""The columns-first LM head (pipeline/cache/head.py): load_model gives it to a float32 CPU
head, and it must compute what HF's own head computes, forward and backward, and stay the
same module to everything else (parameters, state dict, the tie to the input embedding)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.cache.head import MAX_ROWS, ColumnsFirstLinear, head_matmul, use_columns_first_head
from pipeline.cache.models import load_model


def test_load_model_gives_the_head_the_columns_first_kernel_and_keeps_the_tie():
    lm = load_model("tiny-gemma3")
    head = lm.model.get_output_embeddings()
    assert isinstance(head, ColumnsFirstLinear)
    assert head.weight is lm.model.get_input_embeddings().weight  # still tied
    assert set(lm.model.state_dict()) == set(type(lm.model)(lm.model.config).state_dict())


def test_logits_and_gradients_equal_hf_s_linear_head():
    for name in ("tiny-llama", "tiny-gemma3"):
        lm = load_model(name)
        ids = torch.randint(0, lm.model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
        head = lm.model.get_output_embeddings()
        runs = {}
        for cls in (torch.nn.Linear, ColumnsFirstLinear):
            head.__class__ = cls
            lm.model.zero_grad(set_to_none=True)
            logits = lm.model(input_ids=ids).logits  # 3-D: the decoder's every position
            (logits.square().mean()).backward()  # reaches the head's input and, tied, its weight
            runs[cls] = logits.detach(), head.weight.grad.clone()
        (a, ga), (b, gb) = runs.values()
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (name, (a - b).abs().max())
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6), (name, (ga - gb).abs().max())


def test_greedy_decoding_is_unchanged():
    lm = load_model("tiny-gemma3")
    head = lm.model.get_output_embeddings()
    ids = torch.randint(3, lm.model.config.vocab_size, (4, 6), generator=torch.Generator().manual_seed(1))
    outs = []
    for cls in (torch.nn.Linear, ColumnsFirstLinear):
        head.__class__ = cls
        outs.append(lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                      min_new_tokens=12, do_sample=False))
    assert torch.equal(*outs)


def test_other_formats_and_heads_keep_f_linear():
    w = torch.randn(50, 8)
    x = torch.randn(3, 8)
    assert torch.allclose(head_matmul(x, w), F.linear(x, w), atol=1e-6)
    def kernel(x, w):  # which product ran, read off the autograd graph
        return type(head_matmul(x.requires_grad_(True), w).grad_fn).__name__

    assert "ColumnsFirst" in kernel(torch.randn(MAX_ROWS, 8), w)
    assert "ColumnsFirst" not in kernel(torch.randn(MAX_ROWS + 1, 8), w)  # whole sequences: F.linear
    assert "ColumnsFirst" not in kernel(x.bfloat16(), w.bfloat16())  # bfloat16: F.linear
    biased = ColumnsFirstLinear(8, 50)  # a head with a bias is left to nn.Linear
    assert torch.equal(biased(x), F.linear(x, biased.weight, biased.bias))
    assert use_columns_first_head(torch.nn.Sequential(torch.nn.Linear(2, 2))) is False  # no output embeddings
