"""Identity head sets and PEFT adapters on tiny models, for bridge tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from heads.modules import HeadConfig, ProjectionHead
from pipeline.cache.hooks import get_layer_list, lora_sites, site_dim
from pipeline.cache.models import load_model
from storage.artifacts import HEADS_KIND


def identity_heads(root: Path, model_name: str, kind: str, sites: list[str]) -> Path:
    """A head set mapping model_name onto itself with identity heads at every layer;
    kind "mlp,ridge" makes both kinds.

    An mlp head here is the identity only as a whole: its MLP is a real nonlinear path and its
    skip path is not the identity. gelu(z) - gelu(-z) = z, so with up = [U; -U] and
    down = [V, -V] the MLP adds exactly V·U·x, and the skip path is I - V·U. Code that
    skipped the MLP, or applied an mlp head's linear path alone, breaks the identity."""
    def make(head: ProjectionHead, g: torch.Generator) -> None:
        d, h = head.cfg.in_dim, head.cfg.hidden // 2
        head.linear.bias.zero_()
        if head.cfg.kind == "ridge":
            head.linear.weight.copy_(torch.eye(d))
            return
        u = torch.randn(h, d, generator=g) * 0.5
        v = torch.randn(d, h, generator=g) * 0.5 / h ** 0.5
        head.up.weight.copy_(torch.cat([u, -u]))
        head.up.bias.zero_()
        head.down.weight.copy_(torch.cat([v, -v], dim=1))
        head.down.bias.zero_()
        head.linear.weight.copy_(torch.eye(d) - v @ u)

    n = len(get_layer_list(load_model(model_name).model)[1])
    return _head_set(root, model_name, model_name, kind, sites, {i: i for i in range(n)}, make)


def random_heads(root: Path, source: str, target: str, kind: str, sites: list[str], mapping: dict[int, int],
                 offsets: bool = True) -> Path:
    """Random heads from `target` to `source` and back, with random standardisation
    statistics; offsets=False zeroes every mean and bias (a fold without constant term)."""
    def make(head: ProjectionHead, g: torch.Generator) -> None:
        head.linear.weight.copy_(torch.randn(head.linear.weight.shape, generator=g) / head.cfg.in_dim ** 0.5)
        head.in_std.copy_(torch.rand(head.cfg.in_dim, generator=g) + 0.5)
        head.out_std.copy_(torch.rand(head.cfg.out_dim, generator=g) + 0.5)
        for t in (head.linear.bias, head.in_mean, head.out_mean):
            t.copy_(torch.randn(t.shape, generator=g) * 0.5 if offsets else torch.zeros(t.shape))
        if head.cfg.kind == "mlp":
            for lin in (head.up, head.down):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.3)

    return _head_set(root, source, target, kind, sites, mapping, make)


def _head_set(root: Path, source: str, target: str, kind: str, sites: list[str], mapping: dict[int, int],
              make) -> Path:
    """Encoder (target -> source) and decoder heads per mapped layer and site, each set by
    make(head, generator) under no_grad, and their index."""
    models = {"source": load_model(source), "target": load_model(target)}
    ident = {role: {"path": "-", "model": lm.info.name, "weights_hash": lm.info.weights_hash,
                    "tokenizer_hash": lm.info.tokenizer_hash} for role, lm in models.items()}
    g = torch.Generator().manual_seed(0)
    heads = []
    for t, s in sorted(mapping.items()):
        for site, head_kind in ((x, k) for x in sites for k in kind.split(",")):
            dims = {role: site_dim(lm.model, site) for role, lm in models.items()}
            for direction, (d_in, d_out) in (("encoder", (dims["target"], dims["source"])),
                                             ("decoder", (dims["source"], dims["target"]))):
                head = ProjectionHead(HeadConfig(kind=head_kind, in_dim=d_in, out_dim=d_out, hidden=16))
                with torch.no_grad():
                    make(head, g)
                spec = {"direction": direction, "source_layer": s, "target_layer": t, "site": site,
                        "kind": head_kind}
                name = f"{direction}/{site}/T{t:02d}-S{s:02d}.{head_kind}"
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                head.save(root / name, {"spec": spec, "hash": "x", "metrics": {}})
                heads.append({"name": name, "spec": spec, "hash": "x", "metrics": {}})
    index = {"kind": HEADS_KIND, "version": 1, "heads": heads,
             "inputs": {**ident, "layermap": {str(t): s for t, s in mapping.items()}}}
    (root / "index.json").write_text(json.dumps(index))
    return root


def random_adapter(root: Path, model_name: str, targets: list[str], zero: bool = False, seed: int = 0) -> Path:
    from peft import LoraConfig, get_peft_model

    lm = load_model(model_name)
    torch.manual_seed(seed)
    peft = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.zeros_like(p) if zero else torch.randn_like(p) * 0.5)
    peft.save_pretrained(root)
    return root


def sites_for(targets: list[str]) -> list[str]:
    return sorted(lora_sites(targets))
