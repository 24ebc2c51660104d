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
    kind "mlp,ridge" makes both kinds."""
    lm = load_model(model_name)
    n = len(get_layer_list(lm.model)[1])
    ident = {"path": "-", "model": model_name, "weights_hash": lm.info.weights_hash,
             "tokenizer_hash": lm.info.tokenizer_hash}
    heads = []
    for layer in range(n):
        for site, head_kind in ((s, k) for s in sites for k in kind.split(",")):
            dim = site_dim(lm.model, site)
            for direction in ("encoder", "decoder"):
                head = ProjectionHead(HeadConfig(kind=head_kind, in_dim=dim, out_dim=dim, hidden=16))
                with torch.no_grad():
                    head.linear.weight.copy_(torch.eye(dim))
                    head.linear.bias.zero_()
                    if head_kind == "mlp":  # a nonzero MLP whose effect cancels in D(y+d)-D(y) only if d=0
                        head.up.weight.normal_()
                spec = {"direction": direction, "source_layer": layer, "target_layer": layer, "site": site,
                        "kind": head_kind}
                name = f"{direction}/{site}/T{layer:02d}-S{layer:02d}.{head_kind}"
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                head.save(root / name, {"spec": spec, "hash": "x", "metrics": {}})
                heads.append({"name": name, "spec": spec, "hash": "x", "metrics": {}})
    index = {"kind": HEADS_KIND, "version": 1, "heads": heads,
             "inputs": {"source": ident, "target": ident, "layermap": {str(i): i for i in range(n)}}}
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
