"""`cast transfer`: one self-contained bridged artifact (frozen source LoRA(s) + the heads
they need + a manifest), and `load_bridged` to get the target model with it applied.

    BRIDGED/manifest.json        models, stores, head kind, layer assignment per adapter
    BRIDGED/adapters/<i>/        the source PEFT adapters, copied unchanged
    BRIDGED/heads/               only the heads those adapters need, + their index.json

A logit proxy (--kind proxy) needs no heads: its manifest (kind cast.proxy) names the two
models and holds the one source adapter; proxies written as cast.bridged still load.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from heads.headset import INDEX, HeadSet, load_heads
from pipeline.assemble import OTHERS, PLAUSIBLE, check_plausible
from pipeline.assemble.bridge import (CARRY, FIRST_TOKEN, BridgeError, SiteBridge, assign_layers, attach,
                                      check_choice, read_lora)
from pipeline.cache.hooks import IN_SITE, out_site
from storage.artifacts import BRIDGED_KIND, PROXY_KIND, is_kind
from storage.files import atomic_path
from storage.fs import as_path, check_location, copy_to_local, local_copy

MANIFEST = "manifest.json"


@dataclass
class TransferConfig:
    """What `cast transfer` does; every field is a flag of the same name."""

    adapter: str
    """Source PEFT adapter directory; several, comma-separated, are composed (summed)."""
    out: str
    """Bridged artifact directory to write."""
    heads: str = ""
    """Head set from `cast train-heads` (its source must be the adapters' base model); needed by --kind mlp and
    ridge. A proxy needs none: it takes the target from --target, or from the head set when given."""
    target: str = ""
    """With --kind proxy and no --heads: the target model (registry name or local Hugging Face directory)."""
    kind: str = "proxy"
    """proxy (default; the only kind that carries the behaviour on the default pair, docs/results.md): no heads,
    the source with its LoRA runs beside the target and its change of log-probabilities is added to the target's
    logits on shared tokens (docs/design.md#the-logit-proxy). mlp or ridge: the activation-space bridge, the LoRA's
    modules applied through those heads (a plain target LoRA with `cast export`)."""
    others: str = "prefix"
    """--kind proxy: what the target tokens without a byte-identical source token get. prefix (default): the change
    of the source token their text begins with; rest: the change of the source's mass outside the shared tokens;
    none: nothing (docs/results.md#the-proxy-before-and-after-review)."""
    plausible: float = PLAUSIBLE
    """--kind proxy: a token the source + LoRA gives less than this fraction of its top token's probability gets
    no rise from the LoRA (0: every change is copied, the proxy before). A ratio of two negligible probabilities
    is no evidence about the target's own probability of the token (docs/design.md#the-logit-proxy)."""
    carry: str = "all"
    """'all': every source LoRA layer is applied at the target layer whose mapped source layer is
    nearest; 'mapped': only the source layer chosen for each target layer."""
    first_token: str = "bridge"
    """--kind mlp or ridge: 'bridge' (default) adds the decoded change at every position; 'keep' leaves each
    sequence's first real token (after left padding) as the target computes it: heads are never trained there,
    and on Gemma-3 it is the <bos> attention sink every later token reads. Off by default: on the default
    pair it moved answer-LL recovery by about 0.01, inside the intervals (docs/results.md)."""
    weights: str = ""
    """Per-adapter multipliers, comma-separated (default 1 for each)."""
    force: bool = False
    """Replace an existing --out."""

    def __post_init__(self):
        check_choice("carry", self.carry, CARRY)
        check_choice("first-token", self.first_token, FIRST_TOKEN)


def needed_heads(modules: list[str], kind: str) -> list[tuple[str, str]]:
    """(direction, site) pairs the bridge needs for these LoRA modules."""
    need = []
    for m in modules:
        need.append(("encoder", IN_SITE[m]))
        need.append(("decoder", out_site(m)))
        if kind == "mlp":  # a nonlinear decoder's change is taken at the encoded output
            need.append(("encoder", out_site(m)))
    return list(dict.fromkeys(need))


def check_base(adapter: str, hs: HeadSet) -> None:
    from pipeline.lora.adapters import read_adapter_meta

    meta = read_adapter_meta(adapter)
    if meta is not None and meta["base"]["weights_hash"] != hs.source["weights_hash"]:
        raise BridgeError(
            f"--adapter {adapter} was trained on {meta['base']['name']}, but --heads {hs.path} bridge from "
            f"{hs.source['model']}; train heads whose source store was extracted from the adapter's base model")
    if meta is None:
        print(f"[cast] {adapter}: no cast_lora.json; checking shapes only", file=sys.stderr)


def check_adapter(adapter: str, lw, hs: HeadSet, kind: str) -> None:
    check_base(adapter, hs)
    have = {(h["spec"]["direction"], h["spec"]["site"]) for h in hs.entries(kind=kind)}
    missing = [f"{d} {s}" for d, s in needed_heads(lw.modules, kind) if (d, s) not in have]
    if missing:
        sites = sorted({m.split()[1] for m in missing})
        raise BridgeError(
            f"--adapter {adapter} adapts {', '.join(lw.modules)}, but --heads {hs.path} has no {kind} heads for: "
            f"{', '.join(missing)}. Extract both stores with --sites including {','.join(sites)} and run "
            f"`cast train-heads --sites ...` with them")
    for (layer, module), (a, b) in lw.layers.items():
        enc = next(h for h in hs.entries("encoder", IN_SITE[module], kind))
        dec = next(h for h in hs.entries("decoder", out_site(module), kind))
        ein = json.loads((hs.path / (enc["name"] + ".json")).read_text())["config"]["out_dim"]
        din = json.loads((hs.path / (dec["name"] + ".json")).read_text())["config"]["in_dim"]
        if a.shape[1] != ein or b.shape[0] != din:
            raise BridgeError(
                f"--adapter {adapter}: layer {layer} {module} maps {a.shape[1]} -> {b.shape[0]} dims, but the head "
                f"set's source model has {ein} -> {din} there; the adapter is for another base model")


def run_proxy(cfg: TransferConfig, adapters: list[str], weights: list[float], out: Path) -> dict:
    """A proxy artifact: the source adapter and the two models' identities, no heads."""
    from pipeline.cache.models import resolve
    from pipeline.lora.adapters import read_adapter_meta

    if len(adapters) > 1 or weights != [1.0]:
        raise BridgeError("--kind proxy carries one adapter at weight 1; compose several with --kind mlp or ridge")
    if cfg.first_token != "bridge":
        raise BridgeError(f"--first-token {cfg.first_token} applies to --kind mlp or ridge (a proxy adds no change "
                          f"inside the target); omit it")
    lw = read_lora(adapters[0])  # first: a directory that is no adapter is named as such
    if cfg.heads:
        hs = load_heads(cfg.heads)
        check_base(adapters[0], hs)
        source, target = hs.source, hs.target
    else:
        if not cfg.target:
            raise BridgeError("--kind proxy needs the target model: pass --target NAME (or --heads of the pair)")
        meta = read_adapter_meta(adapters[0])
        if meta is None:
            raise BridgeError(f"--adapter {adapters[0]}: no cast_lora.json naming its base model; pass --heads "
                              f"of the pair, or train the adapter with `cast lora train`")
        info = resolve(cfg.target)[1] or {"name": cfg.target, "weights_hash": ""}
        source = {"model": meta["base"]["name"], "weights_hash": meta["base"]["weights_hash"]}
        target = {"model": info["name"], "weights_hash": info["weights_hash"]}
    entries = [{"dir": "adapters/0", "origin": str(adapters[0]), "weight": 1.0, "modules": lw.modules,
                "assignment": {}}]
    manifest = {"kind": PROXY_KIND, "version": 1, "source": source, "target": target, "head_kind": "proxy",
                "others": cfg.others, "plausible": cfg.plausible, "adapters": entries}
    with atomic_path(out) as staged:
        staged.mkdir()
        copy_to_local(adapters[0], staged / "adapters" / "0")
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def run_transfer(cfg: TransferConfig) -> dict:
    adapters = [a.strip() for a in cfg.adapter.split(",") if a.strip()]
    weights = [float(w) for w in cfg.weights.split(",")] if cfg.weights else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise BridgeError(f"--weights has {len(weights)} values for {len(adapters)} adapters")
    out = as_path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.force:
        raise BridgeError(f"--out {out} exists and is not empty; choose another path or pass --force")
    if cfg.kind not in ("mlp", "ridge", "proxy"):
        raise BridgeError(f"--kind {cfg.kind}: choose mlp, ridge or proxy")
    if cfg.kind == "proxy":
        if cfg.others not in OTHERS:
            raise BridgeError(f"--others {cfg.others}: choose one of {', '.join(OTHERS)}")
        check_plausible("--plausible", cfg.plausible, BridgeError)
        return run_proxy(cfg, adapters, weights, out)
    if not cfg.heads:
        raise BridgeError(f"--kind {cfg.kind} needs --heads (a head set from `cast train-heads`)")
    hs = load_heads(cfg.heads)
    entries, names = [], set()
    for i, (adapter, w) in enumerate(zip(adapters, weights)):
        lw = read_lora(adapter)
        check_adapter(adapter, lw, hs, cfg.kind)
        assignment = assign_layers(lw.source_layers, hs.mapping, cfg.carry)
        entries.append({"dir": f"adapters/{i}", "origin": str(adapter), "weight": w, "modules": lw.modules,
                        "assignment": {str(t): s for t, s in sorted(assignment.items())}})
        for direction, site in needed_heads(lw.modules, cfg.kind):
            names.update(h["name"] for h in hs.entries(direction, site, cfg.kind)
                         if h["spec"]["target_layer"] in assignment)
    with atomic_path(out) as staged:  # replaces a --force'd --out only once complete
        staged.mkdir()
        for e in entries:  # the adapters and heads may be local or on object storage
            copy_to_local(e["origin"], staged / e["dir"])
        for name in sorted(names):
            for suffix in (".json", ".safetensors"):
                dst = staged / "heads" / (name + suffix)
                dst.parent.mkdir(parents=True, exist_ok=True)
                copy_to_local(hs.path / (name + suffix), dst)
        index = {**hs.index, "heads": [h for h in hs.index["heads"] if h["name"] in names]}
        (staged / "heads" / INDEX).write_text(json.dumps(index, indent=1))
        manifest = {"kind": BRIDGED_KIND, "version": 1, "source": hs.source, "target": hs.target,
                    "head_kind": cfg.kind, "carry": cfg.carry, "first_token": cfg.first_token,
                    "layermap": hs.index["inputs"]["layermap"], "heads_origin": str(hs.path), "adapters": entries}
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(path: str | Path) -> dict:
    f = as_path(path) / MANIFEST
    if not f.is_file():
        check_location(path)
        raise BridgeError(f"{path} is not a bridged artifact (no {MANIFEST}); make one with `cast transfer`")
    manifest = json.loads(f.read_text())
    if not (is_kind(manifest, BRIDGED_KIND) or is_kind(manifest, PROXY_KIND)):
        raise BridgeError(f"{f} is not a CAST bridged or proxy manifest")
    return manifest


def build_bridges(path: Path, manifest: dict, device="cpu") -> dict:
    """(target layer, module) -> SiteBridge, composing every adapter of the artifact."""
    hs = load_heads(path / "heads")
    kind = manifest["head_kind"]
    pieces: dict[tuple[int, str], list] = {}
    for e in manifest["adapters"]:
        lw = read_lora(path / e["dir"])
        for t, sources in e["assignment"].items():
            for module in lw.modules:
                for s in sources:
                    if (s, module) in lw.layers:
                        a, b = lw.layers[(s, module)]
                        pieces.setdefault((int(t), module), []).append((a, b, lw.scale * e["weight"]))
    bridges = {}
    for (t, module), loras in pieces.items():
        enc_in = hs.head("encoder", t, IN_SITE[module], kind, device)
        dec = hs.head("decoder", t, out_site(module), kind, device)
        enc_out = hs.head("encoder", t, out_site(module), kind, device) if kind == "mlp" else None
        bridges[(t, module)] = SiteBridge(enc_in, dec, enc_out, loras).to(device)
    return bridges


def load_bridged(path: str | Path, device: str | None = None, model: str | None = None, loaded=None):
    """The target model with the bridge applied (a LoadedModel), ready for `generate`.
    `model` overrides where the target is loaded from (default: its registry name). A proxy
    artifact leaves the model as it is and sets `logits_processor`, a LogitsProcessorList holding
    the proxy (pipeline/assemble/proxy.py): pass it as model.generate(..., logits_processor=) or
    to pipeline.lora.evaluate.generate_greedy; `proxy` is the LogitProxy itself. `loaded`, for a
    proxy only: the target already in memory (a LoadedModel, hash-checked like a fresh one),
    which the proxy shares instead of loading a second copy; it is returned in a new LoadedModel."""
    from dataclasses import replace

    from pipeline.cache.models import load_model

    path = local_copy(path)  # a bridged artifact on object storage is read from a local copy
    manifest = read_manifest(path)
    if loaded is not None and manifest["head_kind"] != "proxy":
        raise BridgeError(f"{path}: a {manifest['head_kind']} bridge hooks its target, so it needs a copy of its own")
    lm = replace(loaded) if loaded is not None else load_model(model or manifest["target"]["model"], device=device)
    if lm.info.weights_hash != manifest["target"]["weights_hash"]:
        raise BridgeError(f"{path} was built for {manifest['target']['model']} with weights "
                          f"{manifest['target']['weights_hash'][:12]}, but the model loaded by that name has "
                          f"{lm.info.weights_hash[:12]}")
    lm.model.eval()
    if manifest["head_kind"] == "proxy":  # the target is left as it is; decoding goes through the proxy
        from pipeline.assemble.proxy import LogitProxy, processors
        from pipeline.lora.adapters import load_adapter

        src = load_model(manifest["source"]["model"], device=device)
        lm.proxy = LogitProxy(load_adapter(src.model, path / manifest["adapters"][0]["dir"]),
                              src.tokenizer, lm.tokenizer, others=manifest.get("others", "prefix"),
                              plausible=manifest.get("plausible", 0.0))  # artifacts made before the rule: none
        lm.logits_processor = processors(lm.proxy)
        return lm
    attach(lm.model, build_bridges(path, manifest, lm.device), manifest.get("first_token", "bridge"))
    return lm
