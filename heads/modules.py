"""Projection heads: map one model's activations at a site into the other model's space.

Both kinds share one module so assembly loads either the same way:
    mlp    y = destd( L·std(x) + W2·gelu(W1·std(x)) )   linear skip path + MLP
    ridge  y = destd( L·std(x) )                         closed-form baseline / ablation
std/destd use the stores' per-dimension statistics, so every head trains on unit-scale
data whatever the model's activation scale (Gemma-3's residual stream reaches ~1e5).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from storage.files import atomic_path, atomic_write_text
from storage.fs import RemotePath, as_path

KINDS = ("mlp", "ridge")


@dataclass
class HeadConfig:
    """Shape and kind of one head; saved as JSON beside its safetensors."""

    kind: str
    """'mlp' (linear skip + MLP) or 'ridge' (linear, closed form)."""
    in_dim: int
    """Width of the input site."""
    out_dim: int
    """Width of the output site."""
    hidden: int = 1024
    """MLP hidden width (mlp only)."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"--kind {self.kind!r}: choose one of {', '.join(KINDS)}")


def artifact_paths(path: str | Path) -> tuple[Path, Path]:
    """<name>.safetensors and <name>.json (local or object storage). Names carry a kind
    suffix ('x.mlp', 'x.ridge'), so the extension is appended, never substituted."""
    return as_path(f"{path}.safetensors"), as_path(f"{path}.json")


class ProjectionHead(nn.Module):
    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("in_mean", torch.zeros(cfg.in_dim))
        self.register_buffer("in_std", torch.ones(cfg.in_dim))
        self.register_buffer("out_mean", torch.zeros(cfg.out_dim))
        self.register_buffer("out_std", torch.ones(cfg.out_dim))
        self.linear = nn.Linear(cfg.in_dim, cfg.out_dim)
        if cfg.kind == "mlp":
            self.up = nn.Linear(cfg.in_dim, cfg.hidden)
            self.down = nn.Linear(cfg.hidden, cfg.out_dim)
            # The MLP starts as a no-op, so training starts from the linear solution's
            # neighbourhood rather than from noise.
            nn.init.zeros_(self.down.weight)
            nn.init.zeros_(self.down.bias)

    def set_standardisation(self, in_mean, in_std, out_mean, out_std) -> None:
        for name, value in zip(("in_mean", "in_std", "out_mean", "out_std"), (in_mean, in_std, out_mean, out_std)):
            getattr(self, name).copy_(torch.as_tensor(value, dtype=torch.float32))

    def standardised(self, z: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) standardised input -> (..., out_dim) standardised output."""
        y = self.linear(z)
        if self.cfg.kind == "mlp":
            y = y + self.down(nn.functional.gelu(self.up(z)))
        return y

    def linear_change(self, d: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) change of the raw input -> the linear path's change of the raw output,
        M·d with M = diag(out_std) W diag(1/in_std): the means and biases cancel in a difference.
        For a ridge head this is its whole response to d (the bridge decodes a LoRA's change so)."""
        return (d.float() / self.in_std) @ self.linear.weight.T * self.out_std

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The linear path as raw x -> M x + k, float64 (all of a ridge head; `cast export` folds it)."""
        w, b = self.linear.weight.double(), self.linear.bias.double()
        s_in, s_out = self.in_std.double(), self.out_std.double()
        return s_out[:, None] * w / s_in, s_out * (b - w @ (self.in_mean.double() / s_in)) + self.out_mean.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) raw activations -> (..., out_dim) raw activations."""
        z = (x.float() - self.in_mean) / self.in_std
        y = self.standardised(z)
        return (y * self.out_std + self.out_mean).to(x.dtype)

    def save(self, path: Path, extra: dict | None = None) -> None:
        """<path>.safetensors + <path>.json, each committed atomically; the JSON last, so
        a head whose JSON exists is whole (re-runs check for it)."""
        weights, meta = artifact_paths(path)
        with atomic_path(weights) as tmp:
            save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(tmp))
        atomic_write_text(meta, json.dumps({"config": asdict(self.cfg), **(extra or {})}, indent=2))

    @classmethod
    def load(cls, path: Path, device: str | torch.device = "cpu") -> "ProjectionHead":
        weights, meta_file = artifact_paths(path)
        meta = json.loads(meta_file.read_text())
        head = cls(HeadConfig(**meta["config"]))
        if isinstance(weights, RemotePath):  # a head is small: read it whole, no local copy
            from safetensors.torch import load

            state = {k: v.to(device) for k, v in load(weights.read_bytes()).items()}
        else:
            state = load_file(str(weights), device=str(device))
        head.load_state_dict(state)
        return head.eval()
