"""The LoRA-through-bridge: a frozen source LoRA applied to the target model via heads.

At each bridged target module (e.g. layer 7's q_proj) with input x_t and output y_t:
    x_s   = E_in(x_t)                         target input  -> source input space
    d_s   = scale * B @ A @ x_s               the frozen source LoRA, in source space
    d_t   = D(y_s + d_s) - D(y_s)             its change, decoded into target output space
            with y_s = E_out(y_t)             (for a linear D this is just D's map of d_s)
    y_t  <- y_t + d_t
Forward hooks on the target's own linear modules carry it, so `generate` works unchanged.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load, load_file
from torch import nn

from heads.modules import ProjectionHead
from pipeline.cache.hooks import IN_SITE, find_linear, get_layer_list
from storage.fs import RemotePath, as_path

_KEY = re.compile(r"layers\.(\d+)\..*?([a-z_]+_proj)\.lora_([AB])\.weight$")


class BridgeError(ValueError):
    """An adapter or head set that cannot be bridged; the message says what to do."""


@dataclass
class LoraWeights:
    """A PEFT LoRA read as plain tensors: (layer, module) -> (A, B), and its scale."""

    layers: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    scale: float
    config: dict

    @property
    def modules(self) -> list[str]:
        return sorted({m for _, m in self.layers})

    @property
    def source_layers(self) -> list[int]:
        return sorted({l for l, _ in self.layers})


def read_lora(adapter_dir: str | Path) -> LoraWeights:
    d = as_path(adapter_dir)
    cfg_file, weights = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise BridgeError(f"--adapter {d}: expected a PEFT adapter directory with adapter_config.json "
                          f"and adapter_model.safetensors")
    try:
        cfg = json.loads(cfg_file.read_text())
        r = cfg["r"]
    except (ValueError, KeyError, TypeError) as e:
        raise BridgeError(f"--adapter {d}: {cfg_file} is not a valid adapter config ({type(e).__name__}: "
                          f"{str(e)[:100]}); rewrite it or train the adapter again") from None
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora") or cfg.get("modules_to_save"):
        raise BridgeError(f"--adapter {d}: only plain LoRA adapters can be bridged (no DoRA, no "
                          f"modules_to_save); this one has peft_type={cfg.get('peft_type')}, "
                          f"use_dora={cfg.get('use_dora')}, modules_to_save={cfg.get('modules_to_save')}")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise BridgeError(f"--adapter {d}: per-module rank/alpha patterns are not supported")
    scale = cfg["lora_alpha"] / (r ** 0.5 if cfg.get("use_rslora") else r)
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        tensors = load(weights.read_bytes()) if isinstance(weights, RemotePath) else load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - safetensors' own error type names no file
        raise BridgeError(f"--adapter {d}: {weights} is not a readable safetensors file ({str(e)[:100]}); "
                          f"the adapter is damaged, train or copy it again") from None
    for key, value in tensors.items():
        m = _KEY.search(key)
        if not m:
            raise BridgeError(f"--adapter {d}: tensor {key!r} is not a per-layer q/k/v/o/gate/up/down "
                              f"LoRA weight; such adapters cannot be bridged")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in IN_SITE:
            raise BridgeError(f"--adapter {d}: module {module} is not a standard LoRA target")
        parts.setdefault((layer, module), {})[ab] = value.float()
    layers = {k: (v["A"], v["B"]) for k, v in parts.items() if "A" in v and "B" in v}
    if not layers:
        raise BridgeError(f"--adapter {d}: no LoRA weights found")
    return LoraWeights(layers=layers, scale=scale, config=cfg)


CARRY = ("all", "mapped")


def assign_layers(source_layers: list[int], mapping: dict[int, int], carry: str) -> dict[int, list[int]]:
    """target layer -> source LoRA layers applied there.
    'mapped': only the source layer the layer map chose for each target layer;
    'all': every source layer, each at the target layer whose chosen source layer is nearest
           (so no part of the LoRA is dropped when the source is deeper than the target)."""
    out: dict[int, list[int]] = {t: [] for t in mapping}
    if carry == "mapped":
        for t, s in mapping.items():
            if s in source_layers:
                out[t].append(s)
    elif carry == "all":
        for s in source_layers:
            t = min(mapping, key=lambda t: (abs(mapping[t] - s), t))
            out[t].append(s)
    else:
        raise BridgeError(f"--carry {carry!r}: choose 'all' or 'mapped'")
    return {t: sorted(v) for t, v in out.items() if v}


FIRST_TOKEN = ("bridge", "keep")
"""--first-token: 'bridge' adds the change at every position; 'keep' leaves each sequence's first real
token as the target computes it."""


def check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"--{flag} {value!r}: choose {' or '.join(repr(c) for c in choices)}")


def first_real(args: tuple, kwargs: dict) -> torch.Tensor:
    """(batch or 1, n) bool, True at each sequence's first real token among the n positions a
    decoder call runs. Read from the 2-D attention mask where there is one (left padding, and a
    cached step whose mask spans the past too), else from position ids, else from the cache length."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    n = (ids if ids is not None else kwargs["inputs_embeds"]).shape[1]
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        real = mask.bool()
        return (real & (real.long().cumsum(-1) == 1))[:, -n:]
    if kwargs.get("position_ids") is not None:
        return kwargs["position_ids"][..., -n:] == 0
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = cache.get_seq_length() if cache is not None else 0
    return (torch.arange(n) + past == 0)[None]


class FirstToken:
    """Where the first real tokens are in the decoder call running now, for bridges that leave
    them alone: head training never sees position 0 (Gemma-3's <bos> attention sink, whose
    v_proj value every later token reads), so a change decoded there is extrapolated."""

    def __init__(self):
        self.where: torch.Tensor | None = None

    def before(self, module, args, kwargs):
        self.where = first_real(args, kwargs)

    def after(self, module, args, kwargs, output):
        self.where = None  # a stale mask must never be read by a later, differently shaped call

    def zero_first(self, d: torch.Tensor) -> torch.Tensor:
        if self.where is None:
            raise BridgeError("--first-token keep: a bridged module ran outside its decoder's forward, so where "
                              "each sequence starts is unknown; call the model (or its decoder)")
        return d.masked_fill(self.where.to(d.device)[..., None], 0)


class SiteBridge(nn.Module):
    """The heads and LoRA pieces for one target module (one layer, one module type)."""

    def __init__(self, enc_in: ProjectionHead, dec_out: ProjectionHead, enc_out: ProjectionHead | None,
                 loras: list[tuple[torch.Tensor, torch.Tensor, float]]):
        super().__init__()
        self.enc_in, self.dec_out, self.enc_out = enc_in, dec_out, enc_out
        self.first: FirstToken | None = None  # set by attach for --first-token keep
        self.scales = [s for _, _, s in loras]
        for i, (a, b, _) in enumerate(loras):  # buffers: frozen, and moved with the model
            self.register_buffer(f"A{i}", a.float())   # (r, in_s)
            self.register_buffer(f"B{i}", b.float())   # (out_s, r)

    def delta(self, x_t: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
        x_s = self.enc_in(x_t.float())                                     # (..., in_s)
        d_s = sum(s * (x_s @ getattr(self, f"A{i}").T) @ getattr(self, f"B{i}").T
                  for i, s in enumerate(self.scales))                      # (..., out_s)
        if self.dec_out.cfg.kind == "ridge":  # linear: D(y + d) - D(y) = D's map of d, no E_out needed
            return self.dec_out.linear_change(d_s).to(y_t.dtype)
        y_s = self.enc_out(y_t.float())
        return (self.dec_out(y_s + d_s) - self.dec_out(y_s)).to(y_t.dtype)

    def hook(self, module, args, output):
        d = self.delta(args[0], output)
        return output + (d if self.first is None else self.first.zero_first(d))


def attach(model: nn.Module, bridges: dict[tuple[int, str], SiteBridge], first_token: str = "bridge") -> list:
    """Register one forward hook per bridged target module (and, for first_token 'keep', two on the
    decoder that owns the blocks, which every caller runs: model(...) and causal_lm_logits alike);
    returns the handles."""
    check_choice("first-token", first_token, FIRST_TOKEN)
    path, blocks = get_layer_list(model)
    handles = []
    if first_token == "keep":
        first = FirstToken()
        decoder = model.get_submodule(path.rpartition(".")[0])
        handles.append(decoder.register_forward_pre_hook(first.before, with_kwargs=True))
        handles.append(decoder.register_forward_hook(first.after, with_kwargs=True))
        for bridge in bridges.values():
            bridge.first = first
    for (layer, module), bridge in sorted(bridges.items()):
        handles.append(find_linear(blocks[layer], module).register_forward_hook(bridge.hook))
    model._cast_bridges = nn.ModuleDict({f"L{l}_{m}": b for (l, m), b in bridges.items()})
    return handles
