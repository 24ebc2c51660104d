"""The number format a LoRA's frozen base computes in while the LoRA trains.

Training a LoRA reads the base's weights at every step and never changes them, so the base
can run in bfloat16 while the LoRA's own weights, their gradients and the optimiser stay in
float32. On a CPU with bfloat16 matrix units (AMX, AVX512-BF16) a `cast distill` step over
50-token prefixes took 0.53-0.56 of the float32 time; a task LoRA's steps (short prompts)
gained nothing (docs/results.md#distilling-the-proxy). On a CPU without such units bfloat16
falls back to slow paths, so `auto` keeps float32 there. Both commands default to float32:
bfloat16 changes the numbers. The base's float32 weights are put back exactly when training
ends: what is evaluated and saved is the float32 model, as a user serves it.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

PRECISIONS = ("auto", "float32", "bfloat16")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """`auto` -> bfloat16 on CUDA or a CPU with bfloat16 matrix units, else float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "bfloat16"
    # private probes of torch.cpu; a build without them is taken as a CPU without the units
    cpu_bf16 = any(getattr(torch.cpu, probe, lambda: False)() for probe in
                   ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return "bfloat16" if torch.device(device).type == "cpu" and cpu_bf16 else "float32"


@contextmanager
def frozen_base_in(model: torch.nn.Module, precision: str):
    """Within the block, the model's frozen floating-point parameters are in `precision`
    (the trainable ones, a LoRA's, stay float32); on exit the original tensors are back,
    bit for bit. Activations follow the base's weights; PEFT casts each LoRA product
    back to the base layer's output format."""
    dtype = getattr(torch, precision)
    kept = {}
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            kept[p] = p.data
            p.data = p.data.to(dtype)
    try:
        yield model
    finally:
        for p, original in kept.items():
            p.data = original
