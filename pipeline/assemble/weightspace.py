"""Data-free weight-space transfer baseline (LoRA-X / Cross-LoRA style SVD subspace projection).

For a source update dW_s = scale * B @ A on a module with weights W_s = U_s S_s V_s^T,
the update is expressed in the source module's singular bases, and that core re-embedded
in the target module's singular bases of the same rank order:

    C    = U_s[:, :k_out]^T  dW_s  V_s[:, :k_in]      (k_out = min of output widths, k_in of inputs)
    dW_t = U_t[:, :k_out]  C  V_t[:, :k_in]^T

i.e. the i-th singular direction of the source module is taken to correspond to the
i-th of the target's. Source layers are placed on target layers by the same assignment
the bridge uses; the summed update is cut back to a LoRA by truncated SVD and written as
a plain PEFT adapter for the target. No data is used, only the two models' weights.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from pipeline.assemble.bridge import LoraWeights, assign_layers, read_lora
from pipeline.cache.hooks import find_linear, get_layer_list
from storage.files import sha256_bytes
from storage.fs import writing


BASES: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
"""Weights digest -> (U, Vh) of their full SVD: a target module serves every source layer
assigned to it, and in `cast run` every task transfers between the same two models, so
each module's SVD (most of the transfer's time) is taken once. At most MAX_BASES kept."""
MAX_BASES = 256


def singular_bases(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """U and Vh of w's full SVD in float64, memoised by w's bytes: the same call on the same
    values as without the memo, so the same bases, signs included."""
    key = sha256_bytes(str(w.dtype), str(tuple(w.shape)), w.detach().cpu().contiguous().view(torch.uint8).numpy())
    if key not in BASES:
        if len(BASES) >= MAX_BASES:
            BASES.pop(next(iter(BASES)))
        # Full bases: a wide or tall module's null-space directions complete them, so the
        # projection of a model onto itself is the identity.
        u, _, vh = torch.linalg.svd(w.double(), full_matrices=True)
        BASES[key] = (u, vh)
    return BASES[key]


def project_update(d_ws: torch.Tensor, w_s: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """(out_s, in_s) update on W_s -> (out_t, in_t) update on W_t through singular bases."""
    k_out, k_in = min(w_s.shape[0], w_t.shape[0]), min(w_s.shape[1], w_t.shape[1])
    u_s, vh_s = singular_bases(w_s)
    u_t, vh_t = singular_bases(w_t)
    core = u_s[:, :k_out].T @ d_ws.double() @ vh_s[:k_in].T
    return (u_t[:, :k_out] @ core @ vh_t[:k_in]).float()


def to_lora(d_w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factorisation B @ A of an update (scale 1)."""
    u, s, vh = torch.linalg.svd(d_w.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).float(), (u[:, :rank] * root).float()


def _lora_keys(peft) -> dict[tuple[int, str], torch.nn.Module]:
    """(layer, module name) -> the PEFT LoRA layer there."""
    found = {}
    for name, module in peft.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            parts = name.split(".")
            found[(int(parts[parts.index("layers") + 1]), parts[-1])] = module
    return found


def set_lora(peft, updates: dict[tuple[int, str], tuple], zero_rest: bool = False) -> None:
    """Copy (A, B[, bias]) factors into a PeftModel's "default" LoRA, per (layer, module);
    a factor narrower than the adapter's rank is zero-padded. Modules without an update
    are zeroed with zero_rest, else left as PEFT initialised them (a random A, a zero B)."""
    with torch.no_grad():
        for key, module in _lora_keys(peft).items():
            update = updates.get(key)
            if update is None and not zero_rest:
                continue
            lin_a, lin_b = module.lora_A["default"], module.lora_B["default"]
            lin_a.weight.zero_()
            lin_b.weight.zero_()
            if lin_b.bias is not None:
                lin_b.bias.zero_()
            if update is not None:
                lin_a.weight[:update[0].shape[0]].copy_(update[0])
                lin_b.weight[:, :update[1].shape[1]].copy_(update[1])
                if len(update) > 2:
                    lin_b.bias.copy_(update[2])


def write_lora(target_model, updates: dict[tuple[int, str], tuple], modules: list[str], rank: int,
               out: str | Path, bias: bool = False, extra: dict[str, str] | None = None) -> None:
    """Write a plain PEFT adapter for `target_model` holding `updates` (see set_lora) at
    scale 1 (lora_alpha = r); every other layer's module gets a zero update; `extra` maps
    file names to text written beside it. The model is left as it was."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=modules, lora_dropout=0.0, bias="none",
                     lora_bias=bias, task_type="CAUSAL_LM")
    peft = get_peft_model(target_model, cfg)
    try:
        # Modules without an update hold zeros rather than PEFT's random A: inert either
        # way (B starts at zero), but a zero in the file says what it is.
        set_lora(peft, updates, zero_rest=True)
        with warnings.catch_warnings():  # peft takes a 1-D lora_B.bias for an unsaved ZeRO-3 shard; it is not
            warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape.*")
            with writing(out) as where:  # PEFT writes local directories; out may be object storage
                peft.save_pretrained(where)
                for name, text in (extra or {}).items():
                    (where / name).write_text(text)
    finally:
        peft.unload()


def weightspace_adapter(adapter: str | Path, source_model, target_model, mapping: dict[int, int],
                        out: str | Path, carry: str = "all") -> dict:
    """Write a PEFT adapter for the target transferred in weight space from `adapter`."""
    lw: LoraWeights = read_lora(adapter)
    assignment = assign_layers(lw.source_layers, mapping, carry)
    _, src_blocks = get_layer_list(source_model)
    _, tgt_blocks = get_layer_list(target_model)
    rank = lw.config["r"] * max(len(v) for v in assignment.values())
    updates = {}
    for t, sources in assignment.items():
        for module in lw.modules:
            w_t = find_linear(tgt_blocks[t], module).weight.detach()
            total = torch.zeros_like(w_t, dtype=torch.float32)
            for s in sources:
                if (s, module) not in lw.layers:
                    continue
                a, b = lw.layers[(s, module)]
                w_s = find_linear(src_blocks[s], module).weight.detach()
                total += project_update(lw.scale * b @ a, w_s, w_t)
            updates[(t, module)] = to_lora(total, rank)
    info = {"method": "svd-subspace projection (index-matched singular bases)", "origin": str(adapter),
            "rank": rank, "carry": carry, "assignment": {str(t): s for t, s in assignment.items()}}
    write_lora(target_model, updates, lw.modules, rank, out, extra={"weightspace.json": json.dumps(info, indent=1)})
    return info
