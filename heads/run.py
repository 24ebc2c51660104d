"""`cast train-heads`: every bridged (source layer, target layer, site) gets an encoder and
a decoder of each kind (or only those --only names), each an independent task (Ray or
in-process), skipped when its inputs and config are unchanged, retried when it fails.
Writes one safetensors + JSON per head and an index of the set."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass

import storage
from heads.headset import INDEX
from heads.modules import KINDS, artifact_paths
from heads.train import STATS, HeadSpec, fit_head, split_pairs
from runtime.work import run_items
from storage.artifacts import HEADS_KIND, IDENTITY_FIELDS, load_alignment, load_layermap, store_identity
from storage.files import atomic_write_text, sha256_bytes
from storage.fs import as_path


@dataclass
class TrainHeadsConfig:
    """What `cast train-heads` does; every field is a flag of the same name."""

    src_store: str
    """Source model's activation store."""
    tgt_store: str
    """Target model's activation store (same corpus and segmentation)."""
    align: str
    """Alignment directory from `cast align`."""
    layermap: str
    """Layer map from `cast layermap`: which source layer bridges to each target layer."""
    out: str
    """Head-set directory or object-store URL; re-running skips heads whose inputs and
    config are unchanged."""
    sites: str = "attn_in"
    """Comma-separated sites to bridge: the adapted modules' inputs (encode) and outputs (decode)."""
    kinds: str = "mlp,ridge"
    """Head kinds to fit: mlp (linear skip + MLP), ridge (closed-form linear baseline)."""
    directions: str = "encoder,decoder"
    """encoder: target -> source space; decoder: source -> target space."""
    only: str = ""
    """Fit only these heads of the kinds × sites × directions above, as comma-separated kind:direction:site
    (e.g. ridge:encoder:attn_in); empty: all of them. `cast run` passes what its bridges read."""
    hidden: int = 1024
    """MLP hidden width."""
    epochs: int = 30
    """Maximum MLP epochs (early stopping usually ends sooner)."""
    patience: int = 3
    """Epochs without held-out improvement before stopping."""
    batch_size: int = 256
    """MLP minibatch size."""
    lr: float = 1e-3
    """Peak learning rate (one-cycle schedule)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    cosine_weight: float = 0.1
    """Weight of the (1 - cosine) term added to the MSE loss."""
    holdout: float = 0.1
    """Fraction of segments held out for early stopping and the reported R^2."""
    max_pairs: int = 0
    """Use at most this many aligned pairs (0: all)."""
    noise: float = 0.0
    """Control experiments only: after fitting, add Gaussian noise to each head's linear map, of this size
    relative to the map's RMS entry (an identity map on uncorrelated inputs keeps held-out R² of about
    1 - noise²), to learn what R² a transfer needs (docs/results.md#head-quality-curve). 0: none."""
    min_position: int = 1
    """Skip pairs where either token sits before this position (position 0 is an attention sink)."""
    stats: str = "store"
    """Standardisation statistics (each head's input and output means and stds): 'store' (default), the store's
    over every token it holds, position 0's attention sinks included; 'pairs', over exactly the aligned rows the
    head trains on (after --min-position, --max-pairs and the held-out split), so Gemma-3's massive sink
    dimensions do not set the scale. Off by default: measured, it changed nothing (docs/results.md)."""
    memory_budget_mb: int = 1024
    """Per head: data under this size is read once and kept; above it, streamed per epoch."""
    block_rows: int = 16384
    """Rows per streamed block (the shuffle buffer)."""
    seed: int = 0
    """Seed for the split, sampling and initialisation."""
    workers: int = 2
    """Concurrent head tasks on Ray (--cpus-per-head CPUs each); 0 trains in this process."""
    cpus_per_head: int = 1
    """CPUs each head task reserves on Ray and trains with (torch threads); at most what
    one node has."""
    address: str | None = None
    """Ray cluster address; default starts a local Ray on 127.0.0.1."""
    max_retries: int = 2
    """Times a failed head task is retried before the run fails."""

    def __post_init__(self):
        bad = [k for k in self.kinds.split(",") if k not in KINDS]
        if bad:
            raise ValueError(f"--kinds: unknown {bad}; choose from {', '.join(KINDS)}")
        bad = [d for d in self.directions.split(",") if d not in ("encoder", "decoder")]
        if bad:
            raise ValueError(f"--directions: unknown {bad}; use encoder,decoder")
        if not 0 < self.holdout < 1:
            raise ValueError(f"--holdout must be in (0, 1), got {self.holdout}")
        if self.stats not in STATS:
            raise ValueError(f"--stats {self.stats!r}: choose 'store' or 'pairs'")
        bad = [x for x in self.only.split(",") if x.strip() and len(x.strip().split(":")) != 3]
        if bad:
            raise ValueError(f"--only: {bad[0]!r} is not kind:direction:site")
        if self.noise < 0:
            raise ValueError(f"--noise must be >= 0, got {self.noise}")
        if self.cpus_per_head < 1:
            raise ValueError(f"--cpus-per-head must be at least 1, got {self.cpus_per_head}")
        for name, low in (("hidden", 1), ("epochs", 1), ("patience", 1), ("batch_size", 1), ("max_pairs", 0),
                          ("min_position", 0), ("memory_budget_mb", 0), ("block_rows", 1), ("workers", 0),
                          ("max_retries", 0)):
            if getattr(self, name) < low:
                hint = " (0: all pairs)" if name == "max_pairs" else ""
                raise ValueError(f"--{name.replace('_', '-')} must be at least {low}{hint}, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")


OPTION_KEYS = ("hidden", "epochs", "patience", "batch_size", "lr", "weight_decay", "cosine_weight",
               "holdout", "max_pairs", "min_position", "seed")


def plan_heads(cfg: TrainHeadsConfig) -> tuple[list[HeadSpec], dict]:
    src = storage.open_store(cfg.src_store)
    tgt = storage.open_store(cfg.tgt_store)
    al = load_alignment(cfg.align)
    al.check_stores(src, tgt)
    for store in (src, tgt):
        store.check_files()  # a damaged store stops here, before any Ray work
    lm = load_layermap(cfg.layermap)
    if lm.source["model"] != src.meta["model"]["name"] or lm.target["model"] != tgt.meta["model"]["name"]:
        raise storage.StoreError(f"--layermap {cfg.layermap} maps {lm.source['model']} -> {lm.target['model']}, "
                                 f"but the stores hold {src.meta['model']['name']} -> {tgt.meta['model']['name']}")
    sites = [s.strip() for s in cfg.sites.split(",") if s.strip()]
    for store, role in ((src, "--src-store"), (tgt, "--tgt-store")):
        missing = [s for s in sites if s not in store.sites]
        if missing:
            raise storage.StoreError(f"{role} {store.path} has no site(s) {missing} (has {store.sites}); "
                                     f"re-extract with --sites including them, or drop them from --sites")
    specs = [HeadSpec(d, s_layer, t_layer, site, kind)
             for t_layer, s_layer in sorted(lm.mapping.items())
             for site in sites for d in cfg.directions.split(",") for kind in cfg.kinds.split(",")]
    only = {tuple(x.strip().split(":")) for x in cfg.only.split(",") if x.strip()}
    if only:  # a head's fit depends on its own spec alone: those kept are the heads they were
        specs = [h for h in specs if (h.kind, h.direction, h.site) in only]
    inputs = {"source": store_identity(src), "target": store_identity(tgt),
              "alignment": {k: al.meta[k] for k in ("n_pairs", "coverage")},
              "layermap": {str(k): v for k, v in sorted(lm.mapping.items())}}
    return specs, inputs


# Fewest training pairs a head is fitted on: below it the held-out R² says nothing.
MIN_TRAIN_PAIRS = 16


def check_enough_pairs(cfg: "TrainHeadsConfig", pairs: dict, opts: dict) -> None:
    """Refuse, before any head task starts, an alignment too small to split into training
    and held-out segments (one text segment: every head would fail alike)."""
    _, _, held = split_pairs(pairs, opts)
    segments = len(set(pairs["segment_id"][(pairs["src_pos"] >= cfg.min_position)
                                           & (pairs["tgt_pos"] >= cfg.min_position)].tolist()))
    n_train, n_held = int((~held).sum()), int(held.sum())
    if segments < 2 or n_held == 0 or n_train < MIN_TRAIN_PAIRS:
        raise storage.StoreError(
            f"--align {cfg.align}: {n_train} training and {n_held} held-out pairs from {segments} text segment(s) "
            f"(after --min-position {cfg.min_position}); train-heads needs at least 2 segments (one is held out) "
            f"and {MIN_TRAIN_PAIRS} training pairs. Extract more text (a larger --max-tokens) into both stores "
            f"and align again")


def head_hash(spec: HeadSpec, inputs: dict, opts: dict) -> str:
    """What a head depends on: the stores' content identity (models, corpus, segmentation,
    tokens), the alignment, the layer pair, the options. Not where the files live: a moved
    or remounted store must not retrain every head."""
    content = {role: {k: v for k, v in inputs[role].items() if k in IDENTITY_FIELDS}
               for role in ("source", "target")}
    return sha256_bytes(json.dumps({"spec": asdict(spec), "inputs": {**inputs, **content}, "opts": opts},
                                   sort_keys=True))


def train_and_save(spec: HeadSpec, paths: dict, opts: dict, digest: str, out: str) -> dict:
    """One head task: fit, save safetensors + JSON (with its hash), return its metrics."""
    import torch

    torch.set_num_threads(opts.get("threads", 1))
    head, metrics = fit_head(spec, paths, {k: v for k, v in opts.items() if k != "threads"})
    target = as_path(out) / spec.name
    target.parent.mkdir(parents=True, exist_ok=True)
    head.save(target, {"spec": asdict(spec), "hash": digest, "metrics": metrics})
    return {"name": spec.name, "spec": asdict(spec), "hash": digest, "metrics": metrics}


class HeadTrainer:
    """The worker `run_items` hands heads to: holds nothing between heads, so any worker
    can take any head, and a retried head starts from the stores again."""

    def __init__(self, paths: dict, opts: dict, out: str):
        self.paths, self.opts, self.out = paths, opts, out

    def run(self, item: tuple[HeadSpec, str]) -> dict:
        spec, digest = item
        return train_and_save(spec, self.paths, self.opts, digest, self.out)

    def flush(self) -> None:
        pass  # every head is saved before run() returns


def _done(out, spec: HeadSpec, digest: str) -> dict | None:
    weights, meta_file = artifact_paths(out / spec.name)
    if meta_file.exists() and weights.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("hash") == digest:
            return {"name": spec.name, "spec": meta["spec"], "hash": digest, "metrics": meta["metrics"]}
    return None


def run_train_heads(cfg: TrainHeadsConfig, progress: bool = True) -> dict:
    out = as_path(cfg.out)
    specs, inputs = plan_heads(cfg)
    opts = {k: getattr(cfg, k) for k in OPTION_KEYS}
    check_enough_pairs(cfg, load_alignment(cfg.align).pairs(), opts)
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs are known to suffice
    import torch
    from tqdm import tqdm

    # Only when set: the hashes of every head fitted without them stay as they were.
    if cfg.noise:
        opts["noise"] = cfg.noise
    if cfg.stats != "store":
        opts["stats"] = cfg.stats
    run_opts = {**opts, "memory_budget_mb": cfg.memory_budget_mb, "block_rows": cfg.block_rows}
    paths = {"src_store": cfg.src_store, "tgt_store": cfg.tgt_store, "align": cfg.align}
    results, todo = {}, []
    for spec in specs:
        digest = head_hash(spec, inputs, opts)
        done = _done(out, spec, digest)
        if done:
            results[spec.name] = {**done, "skipped": True}
        else:
            todo.append((spec, digest))
    print(f"[cast] {len(specs)} heads: {len(specs) - len(todo)} up to date, {len(todo)} to train", file=sys.stderr)
    bar = tqdm(total=len(todo), unit="head", desc="train-heads", disable=not progress, file=sys.stderr)
    t0 = time.perf_counter()

    def finished(item, res) -> None:
        results[item[0].name] = res
        bar.update(1)

    # --cpus-per-head CPUs per Ray worker (heads are many and small: 1 by default);
    # in-process, torch's own threads.
    threads = torch.get_num_threads() if cfg.workers == 0 else cfg.cpus_per_head
    run_items(todo, HeadTrainer, (paths, {**run_opts, "threads": threads}, cfg.out), workers=cfg.workers,
              address=cfg.address, cpus_per_worker=cfg.cpus_per_head, retries=cfg.max_retries,
              label=lambda item: f"head {item[0].name}", on_result=finished, flags=("--cpus-per-head", ""))
    bar.close()
    index = {"kind": HEADS_KIND, "version": 1, "inputs": inputs, "options": {**opts, "stats": cfg.stats},
             "paths": paths, "layermap_path": cfg.layermap,
             "heads": [results[s.name] for s in specs], "seconds": time.perf_counter() - t0}
    atomic_write_text(out / INDEX, json.dumps(index, indent=2))
    return index
