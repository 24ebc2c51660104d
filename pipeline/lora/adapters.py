"""LoRA adapter directories as CAST reads them: plain PEFT (adapter_config.json +
adapter_model.safetensors) plus, when CAST trained it, cast_lora.json with the base
model's identity, the task and the recipe, so later stages refuse an adapter that does
not belong to their model. Format: docs/design.md#artifacts.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from pipeline.cache.hooks import LINEARS
from pipeline.cache.models import ModelInfo
from storage.fs import as_path, local_copy

ALL_TARGETS = LINEARS
CAST_FILE = "cast_lora.json"


class LoraError(ValueError):
    """A LoRA recipe or adapter directory that cannot be used; the message says why."""


def parse_targets(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if names == ["all"]:
        return list(ALL_TARGETS)
    if not names or "all" in names:
        raise LoraError(f"--targets {spec!r}: give comma-separated module names (e.g. q_proj,v_proj) "
                        f"or 'all'")
    return names


def read_adapter_meta(adapter_dir: str | Path) -> dict | None:
    """cast_lora.json of an adapter, or None for a plain PEFT adapter from elsewhere."""
    d = as_path(adapter_dir)
    if not (d / "adapter_config.json").is_file():
        raise LoraError(f"--adapter {d}: no adapter_config.json; expected a PEFT adapter directory "
                        f"(written by `cast lora train` or peft's save_pretrained)")
    check_adapter_files(d)
    f = d / CAST_FILE
    return _json(f) if f.is_file() else None


def _json(f) -> dict:
    try:
        data = json.loads(f.read_text())
    except ValueError as e:
        raise LoraError(f"{f} is not valid JSON ({e}); the adapter is damaged, train or copy it again") from None
    if not isinstance(data, dict):
        raise LoraError(f"{f} holds no JSON object; the adapter is damaged, train or copy it again")
    return data


def check_adapter_files(d) -> None:
    """Fail naming the file when an adapter's config or weights cannot be read, before a
    library (PEFT, safetensors) fails with an error that names neither."""
    _json(d / "adapter_config.json")
    weights = d / "adapter_model.safetensors"
    if not weights.is_file():
        raise LoraError(f"--adapter {d}: no adapter_model.safetensors; expected a PEFT adapter directory")
    from safetensors import safe_open

    try:
        with safe_open(str(local_copy(weights)), framework="pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 - safetensors' error names no file
        raise LoraError(f"{weights} is not a readable safetensors file ({str(e)[:100]}); the adapter is "
                        f"damaged, train or copy it again") from None


def check_adapter_base(adapter_dir: str | Path, info: ModelInfo) -> dict | None:
    """Refuse an adapter trained on a different base model (by weights hash)."""
    meta = read_adapter_meta(adapter_dir)
    if meta is None:
        print(f"[cast] {adapter_dir} has no {CAST_FILE}: cannot check it was trained on "
              f"{info.name}; using it as is", file=sys.stderr)
        return None
    base = meta["base"]
    if base["weights_hash"] != info.weights_hash:
        raise LoraError(f"--adapter {adapter_dir} was trained on {base['name']} (weights "
                        f"{base['weights_hash'][:12]}), but --model is {info.name} (weights "
                        f"{info.weights_hash[:12]}); pass the adapter's own base model")
    return meta


def load_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """Plain PEFT loading, in eval mode."""
    from peft import PeftModel

    check_adapter_files(as_path(adapter_dir))
    return PeftModel.from_pretrained(model, str(local_copy(adapter_dir))).eval()  # PEFT reads local dirs
