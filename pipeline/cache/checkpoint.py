"""The identity of a model checkpoint: what stores and adapters record about the model
that made them, kept in `cast_model.json` beside every checkpoint CAST builds so that
loading never rehashes gigabytes of weights."""
from __future__ import annotations

import json
from pathlib import Path

from storage.files import sha256_file

INFO_FILE = "cast_model.json"


def write_info(path: Path, name: str, weights_hash: str) -> dict:
    """Record a checkpoint directory's identity beside it."""
    tok_file = path / "tokenizer.json"
    cfg = json.loads((path / "config.json").read_text())
    info = {
        "name": name,
        "weights_hash": weights_hash,
        "tokenizer_hash": sha256_file(tok_file) if tok_file.exists() else "",
        "arch": cfg.get("model_type", "?"),
        "num_layers": cfg.get("num_hidden_layers"),
        "hidden_size": cfg.get("hidden_size"),
    }
    (path / INFO_FILE).write_text(json.dumps(info, indent=2))
    return info


def read_info(path: Path) -> dict | None:
    f = Path(path) / INFO_FILE
    return json.loads(f.read_text()) if f.exists() else None


def tokenizer_hash(path: Path | str, recorded: dict | None, tokenizer) -> str:
    """The recorded tokenizer hash; else the sha256 of the directory's tokenizer.json;
    else (a hub id, nothing local to hash) the tokenizer's name."""
    if recorded and recorded.get("tokenizer_hash"):
        return recorded["tokenizer_hash"]
    tok_file = Path(path) / "tokenizer.json" if isinstance(path, Path) else None
    return sha256_file(tok_file) if tok_file is not None and tok_file.exists() else tokenizer.name_or_path
