"""The LM head computed as W·xᵀ on CPU float32, the faster of two equal products.

A causal LM's output layer is one matmul of a few rows (the positions being decoded or
trained) by a vocabulary-sized weight: Gemma-3's is 262,144 x 640. On CPU, torch's
F.linear (x·Wᵀ) picks a slow kernel for that shape; the same product taken as W·xᵀ runs
in 0.3-0.8 of its time at 8-64 rows in float32, and equal time at one row (`cast bench
--parts h` measures both side by side). Decoding (`cast validate`, the teacher's
sampling) and every distillation step apply the head to such a handful of rows, so it is
the largest fixed cost of each. The two products agree to float32 rounding (bitwise at
most row counts; a few 1e-6 apart at others), not bit for bit at every shape.

Past a hundred rows the gap closes (0.93 at 128, 0.98 at 256) and then turns (1.2-1.55x
slower at 512-2048, plus a transposed copy of the logits), so a forward over whole
sequences (extraction's bare-forward baseline, off-task perplexity) keeps F.linear.

bfloat16 is left to F.linear: there the swap is slower (1.3-1.5x), and so is CUDA,
whose kernels have no such gap.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _ColumnsFirst(torch.autograd.Function):
    """y = x·Wᵀ computed as (W·xᵀ)ᵀ, with the gradients of the same product."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (rows, hidden)
        ctx.save_for_backward(flat, weight)
        out = torch.mm(weight, flat.T).T.contiguous()  # (rows, vocab); callers may .view it
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        flat, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (rows, vocab)
        gx = (g @ weight).reshape(*grad.shape[:-1], weight.shape[1]) if ctx.needs_input_grad[0] else None
        gw = g.T @ flat if ctx.needs_input_grad[1] else None  # only for a head that trains
        return gx, gw


MAX_ROWS = 128
"""Most rows (positions) the columns-first product takes; larger inputs go to F.linear."""


def head_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x·Wᵀ (no bias), by the faster kernel for where and how it runs."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.numel() <= MAX_ROWS * x.shape[-1]):
        return _ColumnsFirst.apply(x, weight)
    return F.linear(x, weight)


class ColumnsFirstLinear(torch.nn.Linear):
    """An nn.Linear whose forward is `head_matmul`; same parameters, state dict and ties."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            return super().forward(x)
        return head_matmul(x, self.weight)


def use_columns_first_head(model: torch.nn.Module) -> bool:
    """Give `model`'s output layer the columns-first forward, in place; False (untouched)
    when it has none or it is not a plain nn.Linear. The weight object is kept, so a head
    tied to the input embedding stays tied, and moving the model to CUDA or bfloat16 later
    falls back to F.linear by itself."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if type(head) is not torch.nn.Linear:
        return False
    head.__class__ = ColumnsFirstLinear
    return True
