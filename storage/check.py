"""`cast verify` (every committed unit is present, well-shaped, finite and matches its
recorded hashes) and `cast inspect` (what a store holds, at a glance)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from storage.fs import disk_usage
from storage.chunks import digest_matches
from storage.integrity import ChunkError, checked, open_unit
from storage.layout import TOKEN_FIELDS, UNITS, StoreError, act_path, decode, unit_name
from storage.reader import ActivationStore, open_store
from storage.writer import read_manifest


@dataclass
class VerifyReport:
    store: str
    units_planned: int
    units_ok: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        head = (f"{self.store}: {self.units_ok}/{self.units_planned} units verified"
                + ("" if self.ok else f", {len(self.problems)} problem(s)"))
        return [head, *[f"  - {p}" for p in self.problems]]


def verify(path: str | Path, progress: bool = False) -> VerifyReport:
    """Re-read every committed unit and check it against its manifest row."""
    from tqdm import tqdm

    store = open_store(path)
    meta = store.meta
    report = VerifyReport(store=str(path), units_planned=len(meta["plan"]))
    rows = {r["unit"]: r for r in read_manifest(store.path)}
    for unit in range(len(meta["plan"])):
        if unit not in rows:
            report.problems.append(f"unit {unit}: not committed (resume with the same `cast extract`)")
    for unit in rows:
        if unit >= len(meta["plan"]):
            report.problems.append(f"unit {unit}: has a manifest row but is not in the plan")
    for unit in tqdm(sorted(rows), desc="verify", unit="unit", disable=not progress):
        before = len(report.problems)
        _verify_unit(store, rows[unit], report.problems)
        report.units_ok += len(report.problems) == before
    return report


def _verify_unit(store: ActivationStore, row: dict, problems: list[str]) -> None:
    unit, meta = row["unit"], store.meta
    where = store.path / UNITS / unit_name(unit)
    if not where.is_dir():
        problems.append(f"unit {unit}: manifest row exists but {where} is missing")
        return
    try:
        group = open_unit(store.path, unit)
    except StoreError as e:  # reported, not raised: verify lists all damage
        problems.append(f"unit {unit}: cannot open {where}: {e}")
        return
    n = row["n_tokens"]
    planned = meta["plan"][unit][2] if unit < len(meta["plan"]) else None
    if planned is not None and planned != n:
        problems.append(f"unit {unit}: {n} tokens committed, plan says {planned}")
    hashes = json.loads(row["hashes"])
    expected = [f"meta/{f}" for f in TOKEN_FIELDS] + [
        act_path(layer, site) for layer in meta["layers"] for site in meta["sites"]]
    for name in expected:
        try:
            arr = checked(group, store.path, unit, name)
            data = arr[...]
        except ChunkError as e:  # "missing" or "fails its check", with the file
            problems.append(f"unit {unit}: {name}: {e.problem}: {e.file}")
            continue
        if data.shape[0] != n:
            problems.append(f"unit {unit}: {name} has {data.shape[0]} rows, expected {n}")
        if name.startswith("act/"):
            site = name.split("/")[-1]
            if data.ndim != 2 or data.shape[1] != meta["dims"][site]:
                problems.append(f"unit {unit}: {name} shape {data.shape}, expected (n, {meta['dims'][site]})")
            if not np.isfinite(decode(data, meta["dtype"])).all():
                problems.append(f"unit {unit}: {name} contains inf/nan")
        if not digest_matches(hashes.get(name, ""), data, arr.chunk_rows):
            kind = "crc32c" if meta["format_version"] >= 4 else "sha256"
            problems.append(f"unit {unit}: {name} does not match its recorded {kind}")


def summary(path: str | Path, sample_tokens: int = 4096) -> dict:
    """Models, corpus, sites, tokens, bytes, and per-(layer, site) norms and spread.
    Norms are measured on `sample_tokens` tokens taken from the start of every unit (so
    every unit's files are read and checked); mean/std use all tokens."""
    if sample_tokens < 1:
        raise ValueError(f"--sample-tokens must be at least 1, got {sample_tokens}")
    store = open_store(path)
    meta = store.meta
    rows = store.manifest
    raw = sum(r["nbytes"] for r in rows)
    info = {
        "store": str(path),
        "model": meta["model"],
        "corpus": {k: meta["corpus"][k] for k in ("name", "hash", "max_chars")},
        "dtype": meta["dtype"],
        "sites": meta["sites"],
        "layers": meta["layers"],
        "units": f"{len(rows)}/{len(meta['plan'])}",
        "tokens": store.n_tokens,
        "segments": len({s for r in rows for s in range(r["first_segment"], r["last_segment"] + 1)}),
        "bytes_on_disk": disk_usage(store.path),
        "bytes_raw": raw,
        "extract_tokens_per_s": (store.n_tokens / sum(r["seconds"] for r in rows)) if rows else 0.0,
        "per_layer": [],
    }
    if not rows:
        return info
    store.check_files()
    starts = np.cumsum([0] + [r["n_tokens"] for r in rows])
    per = -(-sample_tokens // len(rows))
    sample = np.concatenate([np.arange(a, min(a + per, b)) for a, b in zip(starts[:-1], starts[1:])])
    sample = sample[:sample_tokens]
    for layer in meta["layers"]:
        for site in meta["sites"]:
            x = store.array(layer, site)[sample].compute()
            mean, var = store.stats(layer, site)
            norms = np.linalg.norm(x, axis=1)
            info["per_layer"].append({
                "layer": layer, "site": site, "norm_mean": float(norms.mean()),
                "norm_max": float(norms.max()), "abs_max": float(np.abs(x).max()),
                "mean_abs_mean": float(np.abs(mean).mean()), "std_mean": float(np.sqrt(var).mean()),
            })
    return info


def format_summary(info: dict) -> str:
    m = info["model"]
    out = [
        f"store      {info['store']}",
        f"model      {m['name']}  weights {m['weights_hash'][:12]}  tokenizer {m['tokenizer_hash'][:12]}",
        f"corpus     {info['corpus']['name']}  hash {info['corpus']['hash'][:12]}  max_chars {info['corpus']['max_chars']}",
        f"sites      {', '.join(info['sites'])}  dtype {info['dtype']}",
        f"layers     {len(info['layers'])} ({info['layers'][0]}..{info['layers'][-1]})",
        f"units      {info['units']} committed   segments {info['segments']:,}   tokens {info['tokens']:,}",
        f"bytes      {info['bytes_on_disk'] / 2**20:,.1f} MiB on disk, {info['bytes_raw'] / 2**20:,.1f} MiB raw "
        f"({info['bytes_on_disk'] / max(1, info['tokens']):,.0f} B/token)",
        f"speed      {info['extract_tokens_per_s']:,.0f} tokens/s during extraction (per worker)",
    ]
    if info["per_layer"]:
        out.append(f"{'layer':>5} {'site':<12} {'|x| mean':>10} {'|x| max':>10} {'max abs':>10} {'std':>8}")
        for r in info["per_layer"]:
            out.append(f"{r['layer']:>5} {r['site']:<12} {r['norm_mean']:>10.2f} {r['norm_max']:>10.2f} "
                       f"{r['abs_max']:>10.3g} {r['std_mean']:>8.3f}")
    return "\n".join(out)
