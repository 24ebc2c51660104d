"""Teacher samples that share a prompt, trained as one row: the prompt once, then each
continuation attending to the prompt and to itself only.

A zero-data distillation's rows are about 45 prompt tokens and a continuation of one or two: four
samples drawn from one prompt, each in its own row, ran the prompt's forward and backward
pass four times for the same activations. Packed, a row is

    [prompt p_0 .. p_{P-1}] [c1_0 .. c1_{n1-2}] [c2_0 .. c2_{n2-2}] ...    (each continuation's
                                                                              last token predicts nothing)

with a 4-D attention mask (continuation j sees the prompt and its own earlier tokens) and
position ids that restart at P for every continuation, so every selected position computes
what it computes in the sample's own row (tests/pipeline/assemble/test_packing.py compares
them). The prompt's last position predicts every continuation's first token; it is selected
once per sample, so the loss is the mean over the same positions as unpacked rows.
"""
from __future__ import annotations

import torch

from pipeline.assemble.teacher import Along, Sample


def prompt_groups(samples: list[Sample]) -> list[list[int]]:
    """Indices of the samples that share a prompt (the same ids before their start), in
    order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(samples):
        groups.setdefault(tuple(x.ids[:x.start]), []).append(i)
    return list(groups.values())


def packed_batch(groups: list[list[Sample]], pad_id: int, along: list[Along] | None = None,
                 weight: float = 0.0) -> tuple[dict, tuple, tuple]:
    """Model inputs for one row per group (input_ids, position_ids and a boolean
    (rows, 1, width, width) mask, True where a query may attend a key), the selected
    (row, column) positions in sample order, and the teacher's top-k there (for sparse_kl).
    With `along` (one per group: the teacher at the prompt's own tokens, teacher_along), those
    positions follow the continuations' and the targets gain a weight per position: the
    continuations' mean plus `weight` times the prompts' mean."""
    rows, picks, more = [], [], []
    for r, group in enumerate(groups):
        start = group[0].start
        ids, pos, seg = list(group[0].ids[:start]), list(range(start)), [0] * start
        for j, x in enumerate(group, 1):
            picks.append((r, start - 1))  # the prompt's last token predicts this continuation's first
            cont = x.ids[start:-1]  # the last token is only predicted
            picks += [(r, len(ids) + t) for t in range(len(cont))]
            ids += cont
            pos += range(start, start + len(cont))
            seg += [j] * len(cont)
        more += [(r, c) for c in (along[r].cols if along else [])]  # the prompt's columns: same in every row layout
        rows.append((ids, pos, seg))
    width = max(len(ids) for ids, _, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: padding
    for r, (ids, pos, seg) in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        position_ids[r, :len(ids)] = torch.tensor(pos)
        position_ids[r, len(ids):] = torch.arange(len(ids), width)
        segment[r, :len(ids)] = torch.tensor(seg)
    q, k = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    # A key is visible from a query at or after it in the same continuation, or in the prompt;
    # padding (after every real token) sees what precedes it, so no softmax row is empty.
    mask = causal & ((k == 0) | (k == q) | (q == -1))
    rows_idx, cols_idx = (torch.tensor(v) for v in zip(*picks + more))
    samples = [x for group in groups for x in group]
    targets = (torch.cat([x.top_ids for x in samples]), torch.cat([x.top_lp for x in samples]))
    if along:
        w = torch.cat([torch.full((len(picks),), 1 / len(picks)), torch.full((len(more),), weight / max(1, len(more)))])
        targets = (torch.cat([targets[0], *(a.top_ids for a in along)]),
                   torch.cat([targets[1], *(a.top_lp for a in along)]), w)
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask[:, None]}, \
        (rows_idx, cols_idx), targets


def for_model(inputs: dict, model) -> dict:
    """The mask in the form the model's attention takes: boolean for sdpa, additive for the
    others (eager adds it to the scores); for models with sliding-window layers (Gemma-3), one
    mask per layer type, the window counted in positions as the model counts it."""
    config = getattr(model, "config", None)
    allowed = inputs["attention_mask"]
    impl = getattr(config, "_attn_implementation", "sdpa")

    def form(m: torch.Tensor) -> torch.Tensor:
        if impl == "sdpa":
            return m
        dtype = model.get_input_embeddings().weight.dtype
        return torch.zeros(m.shape, dtype=dtype).masked_fill_(~m, torch.finfo(dtype).min)

    window = getattr(config, "sliding_window", None)
    if window and "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        pos = inputs["position_ids"]
        near = (pos[:, None, :, None] - pos[:, None, None, :]) < window
        return inputs | {"attention_mask": {"full_attention": form(allowed), "sliding_attention": form(allowed & near)}}
    return inputs | {"attention_mask": form(allowed)}
