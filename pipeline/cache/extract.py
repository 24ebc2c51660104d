"""Activation extraction: plan units of segments, run workers that each load the model
once, and commit every unit whole into the store (docs/design.md#activation-store).

The plan is a pure function of (tokenizer, corpus, segmentation, unit size, token cap),
recorded in the store, so a re-run recomputes the same units and skips committed ones.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import storage
from pipeline.cache.corpus import load_corpus, segment, segmentation_hash
from pipeline.cache.hooks import capture, parse_layers, parse_sites, run_to_deepest, site_dim
from pipeline.cache.models import load_model, load_tokenizer, model_identity, resolve
from pipeline.cache.writeback import WriteBehind
from storage.fs import as_path
from storage.layout import COMPRESSIONS, FORMAT_VERSION, STORAGE_DTYPES, StoreError, as_stored, check_encodable
from runtime.work import run_items
from storage.writer import clean_leftovers, committed_units, create_store, write_unit

CODE_VERSION = "cast-0.1.0"


@dataclass
class ExtractConfig:
    """What `cast extract` does; every field is a flag of the same name."""

    model: str
    """Registry name (smollm2-135m, gemma3-270m, tiny-*), local HF directory or hub id."""
    out: str
    """Store directory or object-store URL (s3://bucket/prefix/x.zarr). Created if absent; an
    existing store is resumed only if it was made with the same model, corpus,
    segmentation, sites, layers and dtype."""
    corpus: str = "nlp-corpus"
    """Built-in corpus name, or a file/directory/glob of .txt/.jsonl/.parquet."""
    sites: str = "resid,attn_in,mlp_in"
    """Comma-separated sites: resid, attn_in, mlp_in, <linear>.in/.out for q/k/v/o/gate/up/down_proj."""
    layers: str = "all"
    """Layers to capture: 'all', '0-5', '3,7,11', '-1'."""
    dtype: str = "bfloat16"
    """Storage dtype: bfloat16 (default: half the bytes of float32, float32's range),
    float32, or float16 (refused where values exceed 65504)."""
    compress: str = "none"
    """Activation chunks as they are (none: the write costs a few percent of a forward pass) or
    zstd level 1 (about 0.79x the bytes on bfloat16 activations, for several times the
    write's CPU, which on a small machine slows extraction; see docs/design.md#store-format)."""
    max_tokens: int = 20_000
    """Cap on tokens extracted (whole segments, in corpus order)."""
    max_chars: int = 512
    """Segment length in characters; both models must use the same value."""
    unit_tokens: int = 4096
    """Tokens per unit: the grain of commits and of resumption."""
    batch_tokens: int = 4096
    """Padded tokens per forward pass (batch x longest sequence)."""
    workers: int = 1
    """Ray extraction actors; 0 runs in this process without Ray."""
    address: str | None = None
    """Ray cluster address; default starts a local Ray on 127.0.0.1."""
    device: str | None = None
    """torch device; default CUDA when present, else CPU."""
    cpus_per_worker: int = 0
    """CPUs each Ray actor reserves and runs torch on (0: an equal share of the cluster's
    CPUs, never more than one node has)."""
    gpus_per_worker: float = 0.0
    """GPUs requested per actor on a cluster (0 on CPU machines)."""
    write_depth: int = 1
    """Units each worker may have waiting to be written while it forwards the next one
    (a writer thread commits them; memory holds depth + 1 units). 0 writes each unit
    before forwarding the next."""

    def __post_init__(self):
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: choose one of {', '.join(STORAGE_DTYPES)}")
        if self.compress not in COMPRESSIONS:
            raise ValueError(f"--compress {self.compress!r}: choose one of {', '.join(COMPRESSIONS)}")
        for name in ("max_tokens", "unit_tokens", "batch_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        if self.write_depth < 0:
            raise ValueError(f"--write-depth must be >= 0, got {self.write_depth}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ValueError("--cpus-per-worker and --gpus-per-worker must be >= 0")
        self.sites = ",".join(parse_sites(self.sites))


@dataclass
class Unit:
    unit: int
    segment_ids: list[int]
    input_ids: list[list[int]]
    offsets: list[list[tuple[int, int]]]

    @property
    def n_tokens(self) -> int:
        return sum(len(x) for x in self.input_ids)


@dataclass
class Plan:
    units: list[Unit] = field(default_factory=list)

    def summary(self) -> list[list[int]]:
        """[first segment, last segment, tokens] per unit: stored, and compared on resume."""
        return [[u.segment_ids[0], u.segment_ids[-1], u.n_tokens] for u in self.units]


def make_plan(tokenizer, segments, max_tokens: int, unit_tokens: int) -> Plan:
    """Tokenize segments in corpus order until max_tokens, grouped into units."""
    plan, cur, total = Plan(), None, 0
    for seg in segments:
        enc = tokenizer(seg.text, return_offsets_mapping=True)
        ids, offs = enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
        if total + len(ids) > max_tokens:
            break
        if cur is None or (cur.n_tokens + len(ids) > unit_tokens and cur.segment_ids):
            cur = Unit(unit=len(plan.units), segment_ids=[], input_ids=[], offsets=[])
            plan.units.append(cur)
        cur.segment_ids.append(seg.segment_id)
        cur.input_ids.append(ids)
        cur.offsets.append(offs)
        total += len(ids)
    return plan


def length_batches(lengths: list[int], batch_tokens: int):
    """Indices of sequences grouped into forward passes of at most batch_tokens padded
    tokens, longest first (similar lengths together: less padding)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) + 1) * lengths[batch[0]] > batch_tokens:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def pad_batch(input_ids: list[list[int]], batch: list[int], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids, attention mask) of the sequences `batch` indexes: each row's real
    tokens are a prefix of it, so one gather takes them all back out."""
    width = max(len(input_ids[i]) for i in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, i in enumerate(batch):
        ids[row, : len(input_ids[i])] = torch.tensor(input_ids[i])
        mask[row, : len(input_ids[i])] = 1
    return ids, mask


@contextmanager
def _one_thread():
    """Run the per-batch copies, encoding and sums on one torch thread. They are many
    small ops; with several intra-op threads each one pays an OpenMP fork/join, which on
    a busy machine (a descheduled thread holds the barrier) cost more than the
    forward pass itself (measured by `cast bench`, part a)."""
    before = torch.get_num_threads()
    if before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before > 1:
            torch.set_num_threads(before)


class Extractor:
    """Loads the model once and turns units into committed store units.
    Used directly (workers=0) or wrapped as a Ray actor."""

    def __init__(self, model: str, store: str, layers: list[int], sites: list[str], dtype: str,
                 batch_tokens: int, device: str | None = None, write_depth: int = 1):
        self.lm = load_model(model, device=device)
        self.store, self.layers, self.sites = as_path(store), layers, sites
        self.dtype, self.batch_tokens = dtype, batch_tokens
        self.pad = self.lm.tokenizer.pad_token_id or 0
        # Units are committed on a writer thread while the next one is forwarded.
        self.writer = WriteBehind(write_depth)

    def retarget(self, store: str | Path) -> None:
        """Commit the next units into another store (made with the same plan and settings)."""
        self.flush()
        self.store = as_path(store)

    @torch.no_grad()
    def run(self, unit: Unit) -> dict:
        """Forward the unit and hand it to the writer thread. Its commit overlaps the next
        unit's forward pass, so the unit returned may not be committed yet: only flush()
        (after the last unit) says every unit is; a failed write is raised, naming its
        unit, by a later run() or by flush()."""
        t0 = time.perf_counter()
        dev = self.lm.device
        lengths = [len(x) for x in unit.input_ids]
        starts = np.concatenate([[0], np.cumsum(lengths)])
        n = int(starts[-1])
        acts: dict = {}  # (layer, site) -> (n, dim) tensor in the storage dtype
        stats: dict = {}
        cur: dict = {}  # the batch in flight: where its real tokens are, where they go, scratch space

        def sink(key, x):
            # Called by the hook as soon as the value exists, so the model frees it as
            # usual. Right padding: each row's real tokens are a prefix; one gather takes
            # them all. Many small ops: one thread (see _one_thread). On two cores every
            # pass over the values here is time the forward pass waits (docs/design.md#performance-bars).
            with _one_thread():
                dim = x.shape[-1]
                if dim not in cur["scratch"]:  # reused by every site of this width: no fresh pages per call
                    cur["scratch"][dim] = [torch.empty((cur["rows"], dim), device=dev) for _ in range(2)]
                real, sq = cur["scratch"][dim]
                torch.index_select(x.reshape(-1, dim).float(), 0, cur["src"], out=real)
                # float32 sums over one batch (torch reduces them pairwise), float64 across batches
                sums = torch.stack([real.sum(0), torch.mul(real, real, out=sq).sum(0)])
                finite = bool(torch.isfinite(sums).all())
                if not finite:  # a non-finite value, or squares past float32's range: exact sums decide
                    r64 = real.double()
                    sums = torch.stack([r64.sum(0), r64.mul_(r64).sum(0)])
                    finite = bool(torch.isfinite(sums).all())
                where = f"{self.lm.info.name} layer {key[0]} site {key[1]} (unit {unit.unit})"
                stored = check_encodable(real, self.dtype, where, finite=finite)
                if key not in acts:
                    acts[key] = torch.empty((n, dim), dtype=stored, device=dev)
                    stats[key] = torch.zeros((2, dim), dtype=torch.float64, device=dev)
                out = acts[key]
                for dst, src, length in cur["runs"]:  # one contiguous copy per sequence, converting as it goes
                    out[dst:dst + length].copy_(real[src:src + length])
                stats[key] += sums

        with capture(self.lm.model, self.layers, self.sites, sink=sink):
            for batch in length_batches(lengths, self.batch_tokens):
                ids, mask = pad_batch(unit.input_ids, batch, self.pad)
                width = ids.shape[1]
                cur["src"] = torch.from_numpy(np.concatenate(
                    [row * width + np.arange(lengths[i]) for row, i in enumerate(batch)])).to(dev)
                cur["rows"] = len(cur["src"])
                sizes = [lengths[i] for i in batch]
                # (where in the unit, where in the gathered batch, tokens) of each sequence
                cur["runs"] = list(zip(starts[batch].tolist(), np.cumsum([0] + sizes)[:-1].tolist(), sizes))
                cur["scratch"] = {}
                run_to_deepest(self.lm.model, ids.to(dev), mask.to(dev))
        tokens = {
            "token_id": np.concatenate([np.asarray(x, dtype=np.int64) for x in unit.input_ids]),
            "segment_id": np.repeat(np.asarray(unit.segment_ids, dtype=np.int64), lengths),
            "char_start": np.array([o[0] for offs in unit.offsets for o in offs], dtype=np.int64),
            "char_end": np.array([o[1] for offs in unit.offsets for o in offs], dtype=np.int64),
            "position": np.concatenate([np.arange(m, dtype=np.int64) for m in lengths]),
        }
        acts = {(layer, site): as_stored(acts[(layer, site)].cpu(), self.dtype)
                for layer in self.layers for site in self.sites}
        stats = {key: s.cpu().numpy() for key, s in stats.items()}
        seconds = time.perf_counter() - t0
        self._commit(unit, tokens, acts, stats, seconds)
        return {"unit": unit.unit, "tokens": n, "seconds": seconds}

    write = staticmethod(write_unit)  # an instance may swap it (bench times extraction without it)

    def _commit(self, unit: Unit, tokens, acts, stats, seconds: float) -> None:
        """Queue the unit for the writer thread (blocks while write_depth units wait)."""
        self.writer.submit(unit.unit, self.write, self.store, unit.unit, tokens, acts, stats, self.dtype,
                           (unit.segment_ids[0], unit.segment_ids[-1]), seconds)

    def flush(self) -> None:
        """Wait until every unit handed to run() is committed (raises a failed write's error)."""
        self.writer.flush()


def store_meta(cfg: ExtractConfig, info: dict, corpus, plan: Plan, layers, sites, dims) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "code_version": CODE_VERSION,
        "model": info,
        "corpus": {"name": corpus.name, "hash": corpus.hash, "source": corpus.source,
                   "max_chars": cfg.max_chars,
                   "segmentation_hash": segmentation_hash(corpus, cfg.max_chars)},
        "sites": sites, "layers": layers, "dims": dims, "dtype": cfg.dtype, "compress": cfg.compress,
        "max_tokens": cfg.max_tokens, "unit_tokens": cfg.unit_tokens,
        "plan": plan.summary(),
    }


def prepare(cfg: ExtractConfig):
    """Everything the driver decides before any forward pass: corpus, plan, metadata."""
    corpus = load_corpus(cfg.corpus)
    segments = segment(corpus, cfg.max_chars)
    tokenizer = load_tokenizer(cfg.model)
    plan = make_plan(tokenizer, segments, cfg.max_tokens, cfg.unit_tokens)
    if not plan.units:
        raise StoreError(f"--corpus {cfg.corpus}: no segment fits within --max-tokens {cfg.max_tokens}")
    path, _ = resolve(cfg.model)
    # Read identity and dims without building the model in the driver.
    from transformers import AutoConfig, AutoModelForCausalLM

    lm_cfg = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(lm_cfg)
    layers = parse_layers(cfg.layers, lm_cfg.num_hidden_layers)
    sites = parse_sites(cfg.sites)
    dims = {s: site_dim(skeleton, s) for s in sites}
    info = model_identity(cfg.model, tokenizer)
    return corpus, plan, store_meta(cfg, info, corpus, plan, layers, sites, dims)


def open_or_create(cfg: ExtractConfig, meta: dict) -> set[int]:
    """Create the store, or resume one made with identical settings; never clobber."""
    out = as_path(cfg.out)
    if (out / "zarr.json").exists():
        existing = storage.open_store(out).meta
        diffs = [k for k in meta if k != "code_version" and existing.get(k) != meta[k]]
        if diffs:
            raise StoreError(
                f"--out {out} holds a store made with different settings ({', '.join(diffs)}); "
                f"refusing to mix them. Use a new --out, or delete {out} to start over."
            )
        done = committed_units(out)
        removed = clean_leftovers(out, done)
        if removed:
            print(f"[cast] removed half-written units from a previous run: {', '.join(removed)}", file=sys.stderr)
        return done
    create_store(out, meta)
    return set()


def estimate_bytes(meta: dict) -> int:
    per_token = sum(meta["dims"][s] for s in meta["sites"]) * len(meta["layers"])
    itemsize = np.dtype(STORAGE_DTYPES[meta["dtype"]]).itemsize
    return per_token * itemsize * sum(u[2] for u in meta["plan"])


def config_dict(cfg: ExtractConfig) -> dict:
    return asdict(cfg)


def run_extract(cfg: ExtractConfig, progress: bool = True) -> dict:
    """Plan, create or resume the store, and fill every pending unit."""
    from tqdm import tqdm

    corpus, plan, meta = prepare(cfg)
    done = open_or_create(cfg, meta)
    pending = [u for u in plan.units if u.unit not in done]
    total = sum(u.n_tokens for u in plan.units)
    todo = sum(u.n_tokens for u in pending)
    print(f"[cast] {cfg.model}: {len(plan.units)} units, {total:,} tokens "
          f"({len(done)} units already committed); store needs ~{estimate_bytes(meta) / 2**20:,.0f} MiB "
          f"uncompressed at {cfg.out}", file=sys.stderr)
    layers, sites = meta["layers"], meta["sites"]
    args = (cfg.model, cfg.out, layers, sites, cfg.dtype, cfg.batch_tokens, cfg.device, cfg.write_depth)
    bar = tqdm(total=todo, unit="tok", desc=f"extract {meta['model']['name']}", disable=not progress,
               file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
    t0 = time.perf_counter()
    # No retries: a unit that fails ends the run; committed units stay and a re-run resumes.
    run_items(pending, Extractor, args, workers=cfg.workers, address=cfg.address,
              cpus_per_worker=cfg.cpus_per_worker or None, gpus_per_worker=cfg.gpus_per_worker,
              label=lambda unit: f"unit {unit.unit}",
              on_result=lambda unit, res: bar.update(res["tokens"]))
    bar.close()
    seconds = time.perf_counter() - t0
    # Workers hand units to writer threads and report them before they are committed; the
    # run succeeds only if the store holds every planned unit (its manifest says so).
    missing = sorted({u.unit for u in plan.units} - committed_units(as_path(cfg.out)))
    if missing:
        raise StoreError(f"--out {cfg.out}: {len(missing)} unit(s) were extracted but are not committed "
                         f"(first: {missing[:5]}); run the same command again to redo them")
    return {"store": cfg.out, "units": len(plan.units), "skipped": len(done), "tokens": total,
            "extracted_tokens": todo, "seconds": seconds,
            "tokens_per_s": todo / seconds if seconds > 0 and todo else 0.0}

