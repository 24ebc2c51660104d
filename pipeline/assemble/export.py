"""`cast export`: a bridged artifact as a plain PEFT LoRA for its target, served without hooks.

    OUT/adapter_config.json        plain PEFT config (base_model_name_or_path: the target's checkpoint)
    OUT/adapter_model.safetensors  the LoRA, at scale 1 (lora_alpha = r)
    OUT/cast_export.json           provenance: the adapters' and heads' hashes, method, rank, fidelity

Ridge bridges fold exactly. A ridge head is affine, h(x) = diag(so) W diag(1/si) (x - mi)
+ so*b + mo = M x + k, and at a bridged module the bridge adds (bridge.py, SiteBridge.delta)
D_M · sum_j s_j B_j A_j (E_M x + E_k). Hence, per module,

    dW = sum_j (s_j D_M B_j)(A_j E_M):   A' = [A_j E_M] stacked, B' = [s_j D_M B_j] side by side
    c  = sum_j s_j D_M B_j A_j E_k       a constant shift of the output, whatever the input

(the decoder's offsets cancel in D(y + d) - D(y)). The source layers carried onto one
module concatenate their ranks; `--rank` cuts each module's dW back by truncated SVD and
reports what that loses. A bias-free LoRA cannot hold c: it is measured against the
module's output on held-out text and reported. By default (`--absorb`) it is fitted into one
more rank from the stores' input statistics (see absorb()): the most faithful form that is
still a plain, mergeable LoRA (dropping it made another model: on the default pair's add2
ridge bridge, max logit difference 7.42 and top-1 agreement 0.50 against the bridge).
`--bias` carries it exactly as PEFT's lora_bias (PeftModel.from_pretrained loads it;
merge_and_unload refuses modules that have no bias of their own, and serving engines often
ignore it); `--no-absorb` drops it.

MLP bridges are nonlinear: a LoRA of `--rank` on the same modules is distilled
(distill.py) to the bridged model's next-token distributions, starting from the fold of
the heads' linear paths (constant absorbed, cut to the rank).
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from heads.headset import load_heads
from heads.modules import ProjectionHead
from pipeline.assemble.bridge import BridgeError, SiteBridge
from pipeline.assemble.distill import DistillConfig, agreement, corpus_sequences, distill, model_logits
from pipeline.assemble.transfer import MANIFEST, build_bridges, load_bridged, needed_heads, read_manifest
from pipeline.assemble.weightspace import set_lora, to_lora, write_lora
from pipeline.cache.hooks import find_linear, get_layer_list
from storage.files import atomic_path, sha256_bytes, sha256_file
from storage.fs import RemotePath, as_path, local_copy

EXPORT_FILE = "cast_export.json"
EXPORT_KIND = "cast.export"


@dataclass(kw_only=True)
class ExportConfig(DistillConfig):
    """What `cast export` does; every field is a flag of the same name (the distillation's
    flags apply to mlp bridges; --corpus, --seq-len and --eval-sequences also to ridge)."""

    bridged: str
    """Bridged artifact directory from `cast transfer`."""
    out: str
    """PEFT adapter directory to write (an existing one is replaced only with --force)."""
    rank: int = 0
    """LoRA rank. Ridge: 0 is the exact fold (r x the most source layers carried onto one module), less is
    an SVD cut of it. MLP: the distilled LoRA's rank (0: the same number)."""
    bias: bool = False
    """Ridge: carry the fold's constant term exactly as PEFT lora_bias instead of absorbing it (then merge_and_unload
    fails on modules without a bias, and serving engines often ignore it)."""
    absorb: bool = True
    """Ridge: fold the constant term into one more rank, c·vᵀx with v fitted to the module input's mean and variance
    (the stores' statistics): approximate, but a plain, mergeable LoRA; --no-absorb drops the term (measured and
    reported), which on the default pair makes the export another model."""
    force: bool = False
    """Replace an existing --out."""
    device: str | None = None
    """torch device; default CUDA when present, else CPU."""


def constant_mode(cfg: ExportConfig) -> str:
    """What a ridge export does with the fold's constant term: 'bias', 'absorb' or 'drop'."""
    return "bias" if cfg.bias else "absorb" if cfg.absorb else "drop"


def fold(bridge: SiteBridge) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A', B', c), float64, with bridge.delta(x) = B' A' x + c for ridge heads (for mlp
    heads, the same of their linear paths)."""
    e_m, e_k = bridge.enc_in.affine()
    d_m, _ = bridge.dec_out.affine()
    a = [getattr(bridge, f"A{i}").double() for i in range(len(bridge.scales))]
    b = torch.cat([s * d_m @ getattr(bridge, f"B{i}").double() for i, s in enumerate(bridge.scales)], dim=1)
    return torch.cat([a_j @ e_m for a_j in a]), b, b @ torch.cat([a_j @ e_k for a_j in a])


def absorb(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, enc_in: ProjectionHead):
    """The factors with c carried as one more rank, c·vᵀx. v minimises E(1 - vᵀx)² for inputs of the
    stores' mean m and diagonal variance S (the encoder's standardisation): v = S⁻¹m / (1 + mᵀS⁻¹m).
    Where the module's inputs share a strong mean direction (mᵀS⁻¹m large), vᵀx stays near 1."""
    m, w = enc_in.in_mean.double(), enc_in.in_mean.double() / enc_in.in_std.double() ** 2
    return torch.cat([a, (w / (1 + m @ w))[None]]), torch.cat([b, c[:, None]], dim=1)


def cut(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The factors cut to `rank` (unchanged when they hold no more), float32, and the
    relative Frobenius error of the cut."""
    if a.shape[0] <= rank:
        return a.float(), b.float(), 0.0
    full = b @ a
    a_r, b_r = to_lora(full, rank)
    return a_r, b_r, ((full - b_r.double() @ a_r.double()).norm() / full.norm().clamp_min(1e-30)).item()


def check_heads(path: Path, manifest: dict) -> None:
    """Refuse, before any model is loaded, an artifact lacking a head its adapters need."""
    kind = manifest["head_kind"]
    try:
        hs = load_heads(path / "heads")
    except ValueError as e:
        raise BridgeError(f"{path}: its heads are missing ({e}); re-run `cast transfer` to rebuild it") from None
    missing = []
    for e in manifest["adapters"]:
        for direction, site in needed_heads(e["modules"], kind):
            for t in e["assignment"]:
                found = [h["name"] for h in hs.entries(direction, site, kind) if h["spec"]["target_layer"] == int(t)]
                if not found or not all((hs.path / f"{n}{x}").is_file() for n in found for x in (".json", ".safetensors")):
                    missing.append(f"{kind} {direction} {site} at target layer {t}")
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise BridgeError(f"{path}: heads/ lacks {', '.join(missing[:3])}{more}; re-run `cast transfer` to copy "
                          f"them from the head set")


def provenance(path: Path, manifest: dict) -> dict:
    hs = load_heads(path / "heads")
    heads = sorted((h["name"], sha256_file(hs.path / f"{h['name']}.safetensors")) for h in hs.index["heads"])
    return {"kind": EXPORT_KIND, "version": 1, "target": manifest["target"], "source": manifest["source"],
            "bridged": {"path": str(path), "manifest_sha256": sha256_file(path / MANIFEST),
                        "head_kind": manifest["head_kind"], "carry": manifest["carry"],
                        "first_token": manifest.get("first_token", "bridge")},
            "adapters": [{"origin": e["origin"], "weight": e["weight"],
                          "sha256": sha256_file(path / e["dir"] / "adapter_model.safetensors")}
                         for e in manifest["adapters"]],
            "heads": {"origin": manifest["heads_origin"], "count": len(heads),
                      "sha256": sha256_bytes(*(part for h in heads for part in h))}}


def export_peft(cfg: ExportConfig, progress: bool = True) -> dict:
    """Write cfg.out (see the module's docstring); returns what cast_export.json holds."""
    from pipeline.cache.models import load_model

    path, out = local_copy(cfg.bridged), as_path(cfg.out)  # the artifact is read locally; out may be a URL
    manifest = read_manifest(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.force:
        raise BridgeError(f"--out {out} exists and is not empty; choose another path or pass --force")
    kind = manifest["head_kind"]
    if kind == "proxy":
        raise BridgeError(f"--bridged {cfg.bridged} is a logit proxy: it runs the source model at inference and "
                          f"holds no map to fold into a target LoRA; export a --kind ridge or mlp transfer")
    if cfg.rank < 0:
        raise BridgeError(f"--rank {cfg.rank}: must be 0 (the full fold) or more")
    if cfg.bias and kind != "ridge":
        raise BridgeError("--bias applies to ridge bridges only (an mlp bridge is distilled into a plain LoRA); "
                          "omit it")
    absorbing = kind == "ridge" and constant_mode(cfg) == "absorb"
    check_heads(path, manifest)
    bridges = build_bridges(path, manifest)
    folds = {key: fold(b) for key, b in bridges.items()}
    # The source rank times the most source layers carried onto one module (+1: an absorbed constant).
    holds = max(a.shape[0] for a, _, _ in folds.values()) + absorbing
    if absorbing or kind == "mlp":  # for mlp, the distillation's start (see _export_mlp)
        folds = {key: (*absorb(a, b, c, bridges[key].enc_in), c) for key, (a, b, c) in folds.items()}
    if kind == "ridge" and cfg.rank > holds:
        raise BridgeError(f"--rank {cfg.rank} is above what the update holds: {holds} (the source rank times the "
                          f"most source layers carried onto one module{', plus one' if absorbing else ''}); pass "
                          f"--rank {holds} or less, or omit it for the full fold")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank = cfg.rank or holds
    info = provenance(path, manifest) | {"rank": rank}
    target = load_model(manifest["target"]["model"], device=cfg.device)
    text = dict(cfg=cfg, tokenizer=target.tokenizer, stores=[manifest["source"], manifest["target"]])
    with atomic_path(out) as staged:
        if kind == "ridge":
            info |= _export_ridge(cfg, folds, rank, path, target, staged, text)
        else:
            key = json.dumps([info["heads"]["sha256"], [a["sha256"] for a in info["adapters"]], info["target"], rank])
            info |= _export_mlp(cfg, folds, rank, path, target, staged, text, key, progress)
        (staged / EXPORT_FILE).write_text(json.dumps(info, indent=2))
    shutil.rmtree(_checkpoint_dir(out), ignore_errors=True)  # committed: nothing left to resume
    return info


def _checkpoint_dir(out) -> Path:
    """Beside --out, named after it (not random, as atomic_path's is) so a rerun finds it;
    for an object-store --out, in the local temp directory (checkpoints are rewritten often)."""
    if isinstance(out, RemotePath):
        import tempfile

        return Path(tempfile.gettempdir()) / f"cast-distill-{sha256_bytes(str(out))[:16]}"
    return out.parent / f".tmp-{out.name}-distill"


def _log(msg: str) -> None:
    print(f"[cast] export: {msg}", file=sys.stderr)


def _summary(stats: dict) -> str:
    return (f"max |logit diff| {stats['max_abs_logit_diff']:.4g}, top-1 agreement {stats['top1_agreement']:.4f}, "
            f"KL {stats['kl']:.3g} over {stats['tokens']} tokens")


def _export_ridge(cfg, folds, rank, path, target, staged, text) -> dict:
    from pipeline.lora.adapters import load_adapter

    updates, errors = {}, {}
    for key, (a, b, c) in folds.items():
        a_r, b_r, errors[key] = cut(a, b, rank)
        updates[key] = (a_r, b_r, c.float()) if cfg.bias else (a_r, b_r)
    write_lora(target.model, updates, sorted({m for _, m in folds}), rank, staged, bias=cfg.bias)
    full = torch.stack([(b @ a).norm() for a, b, _ in folds.values()])
    lost = torch.tensor([errors[k] for k in folds], dtype=torch.float64) * full
    mode = constant_mode(cfg)
    constant = {"bias": "carried as lora_bias", "absorb": "absorbed into one more rank", "drop": "dropped"}[mode]
    exact = not lost.any() and mode != "absorb" and (mode == "bias" or not any(c.any() for _, _, c in folds.values()))
    info = {"method": "ridge fold" + (f", SVD cut to rank {rank}" if lost.any() else "") + f", constant term {constant}"
                      + (" (exact)" if exact else ""),
            "rank_cut": {"relative_frobenius_error_max": max(errors.values()),
                         "relative_frobenius_error_total": (lost.norm() / full.norm()).item()},
            "constant_term": {"handling": constant,
                              "norm": {_name(k): c.norm().item() for k, (_, _, c) in folds.items()}}}
    _log(f"ridge fold of {len(folds)} modules at rank {rank}; relative Frobenius error of the rank cut: "
         f"max {info['rank_cut']['relative_frobenius_error_max']:.4g}, "
         f"total {info['rank_cut']['relative_frobenius_error_total']:.4g}")
    if cfg.eval_sequences:
        _, held, info["text"] = corpus_sequences(n_train=0, **text)
        exported = load_adapter(target.model, staged)
        info |= _measure_ridge(cfg, folds, path, exported, held, bool(lost.any()), constant)
        exported.unload()
    return info


def _name(key: tuple[int, str]) -> str:
    return f"L{key[0]:02d}.{key[1]}"


def _measure_ridge(cfg, folds, path, exported, held, was_cut: bool, constant: str) -> dict:
    """The export against the bridged model on held-out text; the constant term's size
    against the module outputs there, what dropping it changes, and what the rank cut does."""
    bridged = load_bridged(path, device=cfg.device)
    _, blocks = get_layer_list(bridged.model)
    state = {"shift": False, "norms": {k: [0.0, 0] for k in folds}}

    def probe(key, c):
        def before_bridge(module, args, out):  # the module's own output, once per text batch
            if not state["shift"]:
                n = state["norms"][key]
                n[0], n[1] = n[0] + out.float().norm(dim=-1).sum().item(), n[1] + out.shape[:-1].numel()

        def after_bridge(module, args, out):  # the bridged model without its constant term
            return out - c.to(out.dtype) if state["shift"] else None
        return before_bridge, after_bridge

    for key, (_, _, c) in folds.items():
        module = find_linear(blocks[key[0]], key[1])
        before, after = probe(key, c.float().to(bridged.device))
        module.register_forward_hook(before, prepend=True)
        module.register_forward_hook(after)

    def shifted(ids, select):
        state["shift"] = True
        try:
            return model_logits(bridged.model)(ids, select)
        finally:
            state["shift"] = False

    systems = {"bridged": model_logits(bridged.model), "export": model_logits(exported), "bridged - c": shifted}
    pairs = {"vs_bridged": ("bridged", "export")}
    if not cfg.bias:
        pairs["dropping_the_constant"] = ("bridged", "bridged - c")
    if was_cut and constant_mode(cfg) != "absorb":  # the rank cut alone: against the full fold with the same constant handling
        pairs["rank_cut"] = ("bridged", "export") if cfg.bias else ("bridged - c", "export")
    stats = agreement(systems, list(dict.fromkeys(pairs.values())), held, cfg.batch_size)
    fidelity = {name: stats[f"{a} vs {b}"] for name, (a, b) in pairs.items()}
    rel = {_name(k): folds[k][2].norm().item() / max(s / max(n, 1), 1e-30) for k, (s, n) in state["norms"].items()}
    _log(f"constant term |c| / mean |module output|: max {max(rel.values()):.4g}, mean "
         f"{sum(rel.values()) / len(rel):.4g}; {constant}" + ("" if constant_mode(cfg) != "drop" else
                                                              " (--absorb or --bias carry it)"))
    for name, what in (("dropping_the_constant", "dropping the constant term alone"),
                       ("rank_cut", "the rank cut alone"), ("vs_bridged", "the export against the bridge")):
        if name in fidelity and (name == "vs_bridged" or pairs[name] != pairs["vs_bridged"]):
            _log(f"{what}: {_summary(fidelity[name])}")
    return {"fidelity": fidelity, "constant_term_relative": {"max": max(rel.values()),
                                                             "mean": sum(rel.values()) / len(rel), "per_module": rel}}


def _export_mlp(cfg, folds, rank, path, target, staged, text, key: str, progress) -> dict:
    from peft import LoraConfig, get_peft_model

    train, held, where = corpus_sequences(n_train=cfg.steps * cfg.batch_size, **text)
    student = get_peft_model(target.model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                                      target_modules=sorted({m for _, m in folds}),
                                                      task_type="CAUSAL_LM"))
    # Start from the heads' linear paths folded, their constant absorbed: near the bridge
    # already, where PEFT's zero start would begin at the bare target.
    set_lora(student, {key: cut(a, b, rank)[:2] for key, (a, b, _) in folds.items()})
    bridged = load_bridged(path, device=cfg.device)
    systems = {"bridged": model_logits(bridged.model), "export": model_logits(student)}

    def measure(when: str) -> dict | None:
        if not len(held):
            return None
        stats = agreement(systems, [("bridged", "export")], held, cfg.batch_size)["bridged vs export"]
        _log(f"{when}: {_summary(stats)}")
        return stats

    start = measure(f"rank-{rank} LoRA at the start (the linear paths' fold, constant absorbed)")
    run = distill(student, systems["bridged"], train, cfg, _checkpoint_dir(as_path(cfg.out)), key=key,
                  progress=progress)
    end = measure(f"distilled for {cfg.steps} steps ({run['seconds']} s here)")
    student.save_pretrained(staged)
    return {"method": "mlp distillation (KL to the bridged model's next-token distributions)", "text": where,
            "fidelity": {"vs_bridged": end, "at_start": start},
            "distillation": {k: v for k, v in run.items() if k != "losses"} | {"losses": run["losses"][::10]}}
