"""Continuous measures that need no decoding (docs/design.md#tasks-and-validation):

    answer LL     log p(reference continuation + eos | prompt) under teacher forcing, per example:
                  a partial transfer moves it long before exact match flips
    off-task      perplexity on held-out generic text, and KL(target base || system) there:
                  the damage a system does outside the task

One batched forward pass per example batch (the LM head only on the answer's positions),
so scoring a variant costs seconds where greedy decoding costs minutes.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.lora.tasks import Example, Task
from pipeline.lora.batching import continuation_rows
from pipeline.lora.train import causal_lm_logits, collate, encode_pairs


@torch.no_grad()
def answer_logprobs(model, tokenizer, task: Task, examples: list[Example], batch_size: int = 16,
                    shift=None, logits_cache: dict | None = None) -> np.ndarray:
    """(n,) summed log-probability of each example's continuation and eos, as training sees it.
    shift(texts, vocab), if given, is added to the logits predicting each continuation token,
    from the text before it (the logit proxy, pipeline/assemble/proxy.py). logits_cache, batch
    start -> `model`'s own logits there, is read where filled and filled where not: the logit
    proxy's model is the target base, scored on the same examples just before it."""
    pairs = encode_pairs(tokenizer, task, examples)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = np.zeros(len(pairs))
    try:
        for s in range(0, len(pairs), batch_size):
            batch = collate(pairs[s:s + batch_size], pad)
            select = continuation_rows(batch["target"], batch["prompt_width"])
            logits = None if logits_cache is None else logits_cache.get(s)
            if logits is None:
                logits = causal_lm_logits(model, select.to(device), input_ids=batch["input_ids"].to(device),
                                          attention_mask=batch["attention_mask"].to(device),
                                          position_ids=batch["position_ids"].to(device))
                if logits_cache is not None:
                    logits_cache[s] = logits
            if shift is not None:  # the text before each scored token, in the rows' order
                texts = [examples[s + i].prompt + tokenizer.decode(c[:j]) for i, (_, c) in
                         enumerate(pairs[s:s + batch_size]) for j in range(len(c))]
                logits = logits + shift(texts, logits.shape[-1]).to(logits.device)
            target = batch["target"]
            tok = logits.log_softmax(-1).gather(-1, batch["input_ids"][target].to(device)[:, None])[:, 0]
            row = torch.arange(len(target))[:, None].expand_as(target)[target]  # which example each token belongs to
            out[s:s + len(target)] = torch.zeros(len(target), dtype=torch.float64).index_add_(
                0, row, tok.double().cpu()).numpy()
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def offtask(model, base_model, ids: torch.Tensor, batch_size: int = 8, shift=None, tokenizer=None,
            stride: int = 1, base_cache: dict | None = None) -> dict:
    """Perplexity of `model` on held-out token sequences (n, len) and mean KL(base || model)
    per predicted token. shift(texts, vocab) as in answer_logprobs (then `tokenizer` decodes
    each prefix); it costs a source pass per position, so `stride` scores only every
    stride-th position. `base_cache`, batch start -> the base's logits there: every system
    of a report is measured against the same base on the same text, so the caller keeps it
    (for these ids, batch_size and stride) and the base runs once, not once per system; a
    `model` that is the base itself (the logit proxy's) reads it too."""
    device = next(model.parameters()).device
    nll, kl, n = 0.0, 0.0, 0
    width = ids.shape[1]
    col = torch.arange(width)
    cols = ((col < width - 1) & ((col + 1) % stride == 0)).nonzero()[:, 0]  # the last column predicts nothing here
    for s in range(0, len(ids), batch_size):
        batch = ids[s:s + batch_size].to(device)
        select = torch.zeros_like(batch, dtype=torch.bool)
        select[:, cols] = True
        base = None if base_cache is None else base_cache.get(s)
        if base is None:
            base = causal_lm_logits(base_model, select, input_ids=batch)
            if base_cache is not None:
                base_cache[s] = base
        lp = base if model is base_model else causal_lm_logits(model, select, input_ids=batch)
        if shift is not None:
            texts = [tokenizer.decode(row[:j + 1], skip_special_tokens=True) for row in batch.tolist()
                     for j in cols.tolist()]
            lp = lp + shift(texts, lp.shape[-1]).to(lp.device)
        lp = lp.log_softmax(-1)
        lb = base.log_softmax(-1)
        nxt = batch[:, cols + 1].flatten()
        nll -= lp.gather(-1, nxt[:, None]).sum().item()
        kl += (lb.exp() * (lb - lp)).sum().item()
        n += len(nxt)
    return {"perplexity": math.exp(nll / n), "kl_to_base": kl / n, "tokens": n}
