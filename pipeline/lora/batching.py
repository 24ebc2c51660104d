"""Batches of token sequences as every scorer, decoder and trainer here builds them.

    left_pad          sequences aligned on their last token, with the position ids generate() uses
    continuation_rows which logits predict a continuation, when prompts are left-padded and
                      continuations start in one column

One helper each, so the LoRA trainer, the answer log-likelihood, greedy decoding and the
logit proxy (pipeline/assemble/proxy.py) cannot drift apart in how they pad or count positions.
"""
from __future__ import annotations

import torch


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, position ids), each (len(seqs), longest), every sequence ending in
    the last column. Positions count real tokens only (0 at a sequence's first token, 0 on its
    padding), as generate() numbers them under left padding: a padded prompt then reads exactly
    as it does alone."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def continuation_rows(target: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """(batch, width) bool: the columns whose logits predict a continuation token, given
    `target` marking the continuation tokens, which start at column `prompt_width`. Column
    P-1+j predicts token P+j, so the mask is `target` shifted left by one; the logits at these
    columns, in row-major order, line up with input_ids[target]."""
    select = torch.zeros_like(target, dtype=torch.bool)
    select[:, prompt_width - 1:-1] = target[:, prompt_width:]
    return select
