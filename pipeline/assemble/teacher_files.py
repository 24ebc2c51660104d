"""What `cast distill` keeps beside --out while it works, so that a rerun resumes: the teacher's
samples (samples.safetensors + samples.json) and its distribution along the training prompts
(along.safetensors + along.json), each read back only when made for the same key."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.assemble.teacher import Along, Sample
from storage.files import atomic_path, atomic_write_text


def save_samples(path: Path, samples: list[Sample], meta: dict) -> None:
    tensors = {}
    for i, x in enumerate(samples):
        tensors |= {f"{i}.ids": torch.tensor(x.ids), f"{i}.top_ids": x.top_ids, f"{i}.top_lp": x.top_lp}
    with atomic_path(path / "samples.safetensors") as tmp:
        save_file(tensors, str(tmp))
    atomic_write_text(path / "samples.json", json.dumps(meta | {"starts": [x.start for x in samples]}))


def load_samples(path: Path, key: str) -> tuple[list[Sample], dict] | None:
    if not (path / "samples.json").is_file():
        return None
    meta = json.loads((path / "samples.json").read_text())
    if meta.get("key") != key:
        return None
    t = load_file(str(path / "samples.safetensors"))
    return [Sample(t[f"{i}.ids"].tolist(), s, t[f"{i}.top_ids"], t[f"{i}.top_lp"])
            for i, s in enumerate(meta["starts"])], meta


def along_kept(work: Path, key: str, make) -> list[Along]:
    """The teacher along the training prompts, from `work` when made there for `key`, else made and kept."""
    path = work / "along.safetensors"
    if path.is_file() and (work / "along.json").is_file() and json.loads((work / "along.json").read_text()) == key:
        t = load_file(str(path))
        return [Along(t[f"{i}.cols"].tolist(), t[f"{i}.top_ids"], t[f"{i}.top_lp"])
                for i in range(len(t) // 3)]
    along = make()
    tensors = {}
    for i, a in enumerate(along):
        tensors |= {f"{i}.cols": torch.tensor(a.cols, dtype=torch.long), f"{i}.top_ids": a.top_ids,
                    f"{i}.top_lp": a.top_lp}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_text(work / "along.json", json.dumps(key))
    return along
