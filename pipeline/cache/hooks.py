"""Architecture-agnostic capture of activation sites, and stopping the forward pass
after the deepest hooked layer (nothing below it, nor the LM head, is computed).

Sites (per decoder layer):
    resid          the block's output: the residual stream after the layer
    attn_in        the normalised input of the attention module
    mlp_in         the normalised input of the MLP
    <linear>.in    the input of a named linear module (q_proj, k_proj, v_proj, o_proj,
    <linear>.out   gate_proj, up_proj, down_proj), and its output

A LoRA on a linear module is bridged at two sites: the one carrying the module's input
(IN_SITE) and the module's output (out_site).
"""
from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import nn

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK_SITES = ("resid", "attn_in", "mlp_in")
ALL_SITES = BLOCK_SITES + tuple(f"{m}.{d}" for m in LINEARS for d in ("in", "out"))
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
# The site that carries each LoRA-able module's input: q/k/v read the attention's
# normalised input, gate/up the MLP's, o/down their own input.
IN_SITE = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "gate_proj": "mlp_in",
           "up_proj": "mlp_in", "o_proj": "o_proj.in", "down_proj": "down_proj.in"}


def out_site(module: str) -> str:
    """The site that carries a linear module's output."""
    return f"{module}.out"


def lora_sites(modules: list[str]) -> list[str]:
    """Every site a LoRA on `modules` is bridged at: their input sites, then their output sites."""
    return list(dict.fromkeys([IN_SITE[m] for m in modules] + [out_site(m) for m in modules]))


class SiteError(ValueError):
    """A site or layer spec that this model cannot provide."""


class StopForward(Exception):
    """Raised by the deepest hook: everything needed has been captured."""


def get_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks, found by shape rather than by architecture-specific names:
    the ModuleList whose length matches config.num_hidden_layers (longest otherwise)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise SiteError(f"{type(model).__name__} has no ModuleList of decoder layers")
    exact = [x for x in lists if len(x[1]) == n]
    return (exact or sorted(lists, key=lambda x: -len(x[1])))[0]


def input_module(block: nn.Module, site: str) -> nn.Module:
    """The attention (attn_in) or MLP (mlp_in) submodule whose input a block site is."""
    names = _ATTN_NAMES if site == "attn_in" else _MLP_NAMES
    for name in names:
        if hasattr(block, name):
            return getattr(block, name)
    raise SiteError(f"{type(block).__name__} has no {site} submodule (looked for {', '.join(names)})")


def find_linear(block: nn.Module, name: str) -> nn.Module:
    """A block's linear module by its last name (q_proj, down_proj, ...), wherever it nests."""
    for child_name, module in block.named_modules():
        if child_name.split(".")[-1] == name:
            return module
    raise SiteError(f"{type(block).__name__} has no linear module named {name!r}")


def site_dim(model: nn.Module, site: str) -> int:
    """Width of a site, read off the modules (not assumed from hidden_size)."""
    _, layers = get_layer_list(model)
    if site in BLOCK_SITES:
        return model.config.hidden_size
    name, direction = site.split(".")
    lin = find_linear(layers[0], name)
    return lin.in_features if direction == "in" else lin.out_features


def parse_sites(spec: str | list[str]) -> list[str]:
    sites = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    sites = [s for s in sites if s]
    bad = [s for s in sites if s not in ALL_SITES]
    if bad or not sites:
        raise SiteError(f"--sites: unknown site(s) {bad or spec!r}; choose from {', '.join(ALL_SITES)}")
    return list(dict.fromkeys(sites))


def parse_layers(spec: str | list[int], num_layers: int) -> list[int]:
    """'all', '0-5', '3,7,11', or '-1' (last); validated against the model's depth."""
    if not isinstance(spec, str):
        layers = list(spec)
    elif spec.strip() == "all":
        layers = list(range(num_layers))
    else:
        layers = []
        for part in (p.strip() for p in spec.split(",")):
            if re.fullmatch(r"\d+-\d+", part):
                a, b = map(int, part.split("-"))
                layers.extend(range(a, b + 1))
            elif re.fullmatch(r"-?\d+", part):
                layers.append(int(part) + num_layers if int(part) < 0 else int(part))
            else:
                raise SiteError(f"--layers: cannot parse {part!r}; use 'all', '0-5', '3,7,11' or '-1'")
    bad = [x for x in layers if not 0 <= x < num_layers]
    if bad or not layers:
        raise SiteError(f"--layers: {bad or spec!r} outside this model's 0..{num_layers - 1}")
    return sorted(set(layers))


@contextmanager
def capture(model: nn.Module, layers: list[int], sites: list[str], sink=None):
    """Register hooks; yields a dict filled with (layer, site) -> tensor on each forward.
    The deepest layer's hook raises StopForward once its sites are captured.

    With `sink`, each value is handed to sink(key, tensor) as soon as it is computed and
    not kept: the model frees it as usual (no batch-sized retention, no fresh pages for
    every capture), and the dict stays empty."""
    _, blocks = get_layer_list(model)
    out: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def keep(key, value):
        if sink is not None:
            sink(key, value.detach())
        else:
            out[key] = value.detach()

    def first_input(args, kwargs):
        return args[0] if args else kwargs["hidden_states"]

    for layer in layers:
        block = blocks[layer]
        for site in sites:
            key = (layer, site)
            if site == "attn_in" or site == "mlp_in":
                mod = input_module(block, site)
                handles.append(mod.register_forward_pre_hook(
                    lambda m, a, k, key=key: keep(key, first_input(a, k)), with_kwargs=True))
            elif site != "resid":
                name, direction = site.split(".")
                mod = find_linear(block, name)
                if direction == "in":
                    handles.append(mod.register_forward_pre_hook(lambda m, a, key=key: keep(key, a[0])))
                else:
                    handles.append(mod.register_forward_hook(lambda m, a, o, key=key: keep(key, o)))

    deepest = max(layers)

    def block_hook(module, args, output, layer):
        if "resid" in sites:
            keep((layer, "resid"), output[0] if isinstance(output, tuple) else output)
        if layer == deepest:
            raise StopForward

    for layer in layers:
        if "resid" in sites or layer == deepest:
            handles.append(blocks[layer].register_forward_hook(
                lambda m, a, o, layer=layer: block_hook(m, a, o, layer)))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def run_to_deepest(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """One forward pass that ends at the deepest hook (inside `capture`)."""
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except StopForward:
        return
    raise SiteError("forward pass finished without reaching the deepest hooked layer")
