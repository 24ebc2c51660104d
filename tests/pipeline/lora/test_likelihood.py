"""The decoding-free measures against a plain, one-example-at-a-time computation."""
from __future__ import annotations

import math

import numpy as np

import pytest
import torch

from pipeline.cache.models import load_model
from pipeline.lora.likelihood import answer_logprobs, offtask
from pipeline.lora.tasks import builtin_task


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny-llama")


def test_answer_logprobs_match_unbatched_teacher_forcing(lm):
    task = builtin_task("reverse", n_train=1, n_test=7)  # answers of different lengths: padding matters
    got = answer_logprobs(lm.model, lm.tokenizer, task, task.test, batch_size=3)
    for ex, value in zip(task.test, got):
        p = lm.tokenizer(ex.prompt).input_ids
        c = lm.tokenizer(task.continuation(ex), add_special_tokens=False).input_ids + [lm.tokenizer.eos_token_id]
        with torch.no_grad():
            logp = lm.model(input_ids=torch.tensor([p + c])).logits[0].log_softmax(-1)
        want = sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(c))
        assert value == pytest.approx(want, abs=1e-3)


def test_offtask_perplexity_and_kl(lm):
    ids = torch.randint(5, lm.tokenizer.vocab_size, (5, 9), generator=torch.Generator().manual_seed(0))
    same = offtask(lm.model, lm.model, ids, batch_size=2)
    with torch.no_grad():
        logp = lm.model(input_ids=ids).logits.log_softmax(-1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).mean().item()
    assert same["tokens"] == 5 * 8 and same["kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    assert same["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)
    every_other = offtask(lm.model, lm.model, ids, batch_size=2, stride=2)
    assert every_other["tokens"] == 5 * 4 and every_other["kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    other = load_model("tiny-llama").model
    with torch.no_grad():
        other.lm_head.weight.mul_(2.0)  # sharper distributions: a positive KL from the base
    assert offtask(other, lm.model, ids, batch_size=4)["kl_to_base"] > 1e-3


def test_offtask_reads_the_base_from_its_cache(lm):
    """The base runs once per batch for every system measured against it: a second system
    given the filled cache gets the same KL without the base being run (a different
    base_model passed beside the cache is never read)."""
    ids = torch.randint(5, lm.tokenizer.vocab_size, (5, 9), generator=torch.Generator().manual_seed(1))
    other = load_model("tiny-llama").model
    with torch.no_grad():
        other.lm_head.weight.mul_(2.0)
    fresh = offtask(other, lm.model, ids, batch_size=2, stride=2)
    cache = {}
    assert offtask(other, lm.model, ids, batch_size=2, stride=2, base_cache=cache) == fresh
    assert sorted(cache) == [0, 2, 4]
    wrong = load_model("tiny-llama").model
    with torch.no_grad():
        wrong.lm_head.weight.mul_(3.0)
    assert offtask(other, wrong, ids, batch_size=2, stride=2, base_cache=cache) == fresh  # the cached base
    # The base scored as a system (the logit proxy's target) reads the cache too, not its own pass.
    as_base = offtask(wrong, wrong, ids, batch_size=2, stride=2, base_cache=cache)
    assert as_base == offtask(lm.model, lm.model, ids, batch_size=2, stride=2) and as_base["kl_to_base"] == 0.0


def test_answer_logprobs_reuse_the_model_logits_under_a_shift(lm):
    """The proxy's answer LL is the base's logits plus its shift: with the base's logits
    cached, the second model passed is never run, and the shift is still added."""
    task = builtin_task("reverse", n_train=1, n_test=5)
    cache = {}
    plain = answer_logprobs(lm.model, lm.tokenizer, task, task.test, batch_size=2, logits_cache=cache)
    assert sorted(cache) == [0, 2, 4]
    assert np.array_equal(plain, answer_logprobs(lm.model, lm.tokenizer, task, task.test, batch_size=2))
    other = load_model("tiny-llama").model
    with torch.no_grad():
        other.lm_head.weight.mul_(3.0)

    def shift(texts, vocab):
        return torch.arange(vocab, dtype=torch.float32).repeat(len(texts), 1) * 0.01

    want = answer_logprobs(lm.model, lm.tokenizer, task, task.test, batch_size=2, shift=shift)
    got = answer_logprobs(other, lm.tokenizer, task, task.test, batch_size=2, shift=shift, logits_cache=cache)
    assert np.array_equal(got, want) and not np.array_equal(got, plain)

