"""`cast bench`: every measurement of bench/__init__.py in one run, and its table."""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

PARTNERS = {"smollm2-135m": "gemma3-270m", "gemma3-270m": "smollm2-135m",
            "tiny-llama": "tiny-gemma3", "tiny-gemma3": "tiny-llama"}
PARTS = ("a", "b", "c", "d", "e")


@dataclass
class BenchConfig:
    """What `cast bench` does; every field is a flag of the same name."""

    model: str = "smollm2-135m"
    """Model to benchmark (registry name, tiny preset or local HF directory)."""
    partner: str | None = None
    """Second model for (c), the head's target; default: the other model of the real pair
    (tiny-llama <-> tiny-gemma3), else the model itself."""
    corpus: str = "nlp-corpus"
    """Built-in corpus name, or a file/directory/glob of .txt/.jsonl/.parquet."""
    tokens: int = 8192
    """N: tokens in the plan every method runs over (whole segments, as `cast extract`)."""
    unit_tokens: int = 4096
    """Tokens per unit (commit grain), `cast extract`'s default. Each unit has a fixed write
    cost (~190 zarr arrays, ~0.7 s on one core) and the last unit's write cannot overlap
    a forward pass, so small N or small units understate extraction."""
    batch_tokens: int = 4096
    """Padded tokens per forward pass, for every method alike."""
    max_chars: int = 512
    """Segment length in characters."""
    sites: str = "resid,attn_in,mlp_in"
    """Sites extracted (and dumped by the naive path)."""
    layers: str = "all"
    """Layers extracted: 'all', '0-5', '3,7,11', '-1'."""
    dtype: str = "bfloat16"
    """Storage dtype of the extraction."""
    naive_dtype: str = "float32"
    """dtype the naive path saves with np.save: float32 (what HF hands out) or float16."""
    reps: int = 3
    """Interleaved repetitions of every timed method; medians are reported."""
    parts: str = "a,b,c,d,e"
    """Which measurements to run (a,b share their timed runs; e needs a)."""
    breakdown: bool = True
    """(a): also time extraction in layers, to show where its cost over the backbone goes:
    `hooks` (every hook fires, values discarded) and `extract_no_write` (hooks, gather, bf16
    encode, stats; the unit is dropped instead of written)."""
    ray: bool = False
    """Also time the Ray path: one extraction actor (model loaded once) fed the same units."""
    head_site: str = "attn_in"
    """(c): site of the head (must be among --sites)."""
    head_kind: str = "mlp"
    """(c): head kind, mlp or ridge (as `cast train-heads`)."""
    head_depth: float = 0.5
    """(c): relative depth of the head's layers in both models (0 first layer, 1 last);
    the recompute path forwards each model only down to that layer."""
    head_threads: int = 1
    """(c): torch threads for both paths of the head epoch; 1 is how `cast train-heads`
    runs each head (one Ray task, one thread); 0 keeps torch's default."""
    mem_tokens: int = 2048
    """(d): N for the memory runs (4N is the other)."""
    mem_unit_tokens: int = 1024
    """(d): unit size of the memory runs. Memory is bounded by the unit (at most two in
    memory: one being filled, one being written), so N should span >= 2 units."""
    threads: int = 0
    """torch threads (0: torch's default, one per core)."""
    workdir: str | None = None
    """Scratch directory for stores and dumps; default a temp dir, removed afterwards."""
    keep: bool = False
    """Keep the scratch directory."""
    json: str | None = None
    """Where to write the JSON result; default runs/bench/<model>.json (a .md table beside it)."""

    def __post_init__(self):
        bad = [p for p in self.parts.split(",") if p.strip() not in PARTS]
        if bad:
            raise ValueError(f"--parts: unknown {bad}; choose from {','.join(PARTS)}")
        if "e" in self.part_set and "a" not in self.part_set:
            raise ValueError("--parts: e (bytes per token) measures the store made by a; add a")
        for name in ("tokens", "unit_tokens", "batch_tokens", "reps", "mem_tokens", "mem_unit_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.naive_dtype not in ("float32", "float16"):
            raise ValueError(f"--naive-dtype {self.naive_dtype!r}: choose float32 or float16")
        if not 0.0 <= self.head_depth <= 1.0:
            raise ValueError(f"--head-depth must be in [0, 1], got {self.head_depth}")
        if "c" in self.part_set and self.head_site not in [s.strip() for s in self.sites.split(",")]:
            raise ValueError(f"--head-site {self.head_site} is not among --sites {self.sites}")

    @property
    def part_set(self) -> set[str]:
        return {p.strip() for p in self.parts.split(",") if p.strip()}


# ----------------------------------------------------------------------------- helpers


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _dir_bytes(path: Path, pattern: str = "**/*") -> int:
    return sum(f.stat().st_size for f in Path(path).glob(pattern) if f.is_file())


def _padded(unit, batch: list[int], pad: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The padded (ids, mask) Extractor.run builds for one batch, and its rows' lengths."""
    lengths = [len(unit.input_ids[i]) for i in batch]
    width = max(lengths)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, i in enumerate(batch):
        ids[row, : lengths[row]] = torch.tensor(unit.input_ids[i])
        mask[row, : lengths[row]] = 1
    return ids, mask, lengths


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- (a), (b)


class Methods:
    """The timed methods of (a) and (b), sharing one loaded model and one plan."""

    def __init__(self, cfg: BenchConfig, work: Path):
        from pipeline.cache.extract import ExtractConfig, Extractor, prepare

        self.cfg, self.work = cfg, work
        self.ecfg = ExtractConfig(model=cfg.model, out=str(work / "store.zarr"), corpus=cfg.corpus,
                                  sites=cfg.sites, layers=cfg.layers, dtype=cfg.dtype,
                                  max_tokens=cfg.tokens, max_chars=cfg.max_chars,
                                  unit_tokens=cfg.unit_tokens, batch_tokens=cfg.batch_tokens, workers=0)
        _, self.plan, self.meta = prepare(self.ecfg)
        self.layers, self.sites = self.meta["layers"], self.meta["sites"]
        self.worker = Extractor(cfg.model, self.ecfg.out, self.layers, self.sites, cfg.dtype, cfg.batch_tokens)
        self.lm = self.worker.lm
        self.n_tokens = sum(u.n_tokens for u in self.plan.units)
        # The same batches for every method: Extractor's own batching of each unit.
        self.batches = []
        for unit in self.plan.units:
            lengths = [len(x) for x in unit.input_ids]
            for batch in self.worker._batches(lengths):
                self.batches.append(_padded(unit, batch, self.worker.pad))
        self.padded_tokens = sum(int(ids.numel()) for ids, _, _ in self.batches)
        self.store_path: Path | None = None
        self.naive_bytes = 0
        self._ray_actor = None

    # -- the methods: each returns seconds for one pass over all tokens

    def extract(self, rep: int) -> float:
        from storage.writer import create_store

        path = self.work / f"extract-{rep}.zarr"
        create_store(path, self.meta)
        self.worker.retarget(path)
        t0 = time.perf_counter()
        for unit in self.plan.units:
            self.worker.run(unit)
        self.worker.flush()  # every unit committed: writes overlap forwards, as in run_extract
        dt = time.perf_counter() - t0
        if self.store_path is not None:  # keep only the latest store: (c) and (e) read it
            shutil.rmtree(self.store_path, ignore_errors=True)
        self.store_path = path
        return dt

    def hooks(self, rep: int) -> float:
        from pipeline.cache.hooks import capture, run_to_deepest

        model = self.lm.model
        t0 = time.perf_counter()
        with capture(model, self.layers, self.sites, sink=lambda key, x: None):
            for ids, mask, _ in self.batches:
                run_to_deepest(model, ids, mask)
        return time.perf_counter() - t0

    def extract_no_write(self, rep: int) -> float:
        self.worker.write = lambda *args: None
        try:
            t0 = time.perf_counter()
            for unit in self.plan.units:
                self.worker.run(unit)
            self.worker.flush()
            return time.perf_counter() - t0
        finally:
            del self.worker.write  # back to the class's write_unit

    def forward(self, rep: int) -> float:
        model = self.lm.model
        t0 = time.perf_counter()
        for ids, mask, _ in self.batches:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        return time.perf_counter() - t0

    def backbone(self, rep: int) -> float:
        base = self.lm.model.base_model
        t0 = time.perf_counter()
        for ids, mask, _ in self.batches:
            base(input_ids=ids, attention_mask=mask, use_cache=False)
        return time.perf_counter() - t0

    def naive(self, rep: int) -> float:
        from pipeline.cache.hooks import get_layer_list, input_module

        model = self.lm.model
        out = self.work / f"naive-{rep}"
        out.mkdir()
        _, blocks = get_layer_list(model)
        hooked = [s for s in self.sites if s in ("attn_in", "mlp_in")]
        got: dict[str, list[torch.Tensor]] = {s: [] for s in hooked}
        handles = []
        for layer in self.layers:
            for site in hooked:
                mod = input_module(blocks[layer], site)
                handles.append(mod.register_forward_pre_hook(
                    lambda m, a, k, site=site: got[site].append(a[0] if a else k["hidden_states"]),
                    with_kwargs=True))
        dtype = np.dtype(self.cfg.naive_dtype)
        t0 = time.perf_counter()
        try:
            for b, (ids, mask, lengths) in enumerate(self.batches):
                for v in got.values():
                    v.clear()
                res = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
                per_site = {s: got[s] for s in hooked}
                if "resid" in self.sites:
                    per_site["resid"] = [res.hidden_states[layer + 1] for layer in self.layers]
                for site, per_layer in per_site.items():
                    arr = np.stack([np.concatenate([h[row, :n].numpy() for row, n in enumerate(lengths)])
                                    for h in per_layer]).astype(dtype, copy=False)
                    np.save(out / f"b{b:04d}-{site}.npy", arr)
        finally:
            for h in handles:
                h.remove()
        dt = time.perf_counter() - t0
        self.naive_bytes = _dir_bytes(out)
        shutil.rmtree(out, ignore_errors=True)
        return dt

    def extract_ray(self, rep: int) -> float:
        from storage.writer import create_store

        path = self.work / f"ray-{rep}.zarr"
        create_store(path, self.meta)
        import ray

        actor = self._ensure_ray()
        ray.get(actor.call.remote("retarget", str(path)))
        t0 = time.perf_counter()
        for unit in self.plan.units:  # one actor, units in turn: the Ray path's steady state
            ray.get(actor.run.remote(unit))
        ray.get(actor.flush.remote())
        dt = time.perf_counter() - t0
        shutil.rmtree(path, ignore_errors=True)
        return dt

    def _ensure_ray(self):
        if self._ray_actor is None:
            from pipeline.cache.extract import Extractor
            from runtime.cluster import ray_session
            from runtime.work import remote_workers

            self._ray_cm = ray_session(None)
            ray = self._ray_cm.__enter__()
            threads = max(1, int(ray.cluster_resources().get("CPU", 1)))
            args = (self.cfg.model, str(self.work / "unused.zarr"), self.layers, self.sites, self.cfg.dtype,
                    self.cfg.batch_tokens, None)
            self._ray_actor = remote_workers(ray, Extractor, args, 1, threads)[0]
            ray.get(self._ray_actor.call.remote("retarget", str(self.work / "unused.zarr")))  # model loaded
        return self._ray_actor

    def close(self):
        if self._ray_actor is not None:
            self._ray_cm.__exit__(None, None, None)
            self._ray_actor = None


def time_interleaved(methods: dict, reps: int, cpu: dict | None = None) -> dict[str, list[float]]:
    """Run every method once per repetition, in a rotating order (A,B,C / B,C,A / ...).
    Returns wall seconds per method; `cpu` (if given) receives the process CPU seconds."""
    names = list(methods)
    times = {n: [] for n in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            c0 = time.process_time()
            dt = methods[name](rep)
            dc = time.process_time() - c0
            times[name].append(dt)
            if cpu is not None:
                cpu.setdefault(name, []).append(dc)
            _log(f"rep {rep + 1}/{reps} {name}: {dt:.2f}s (cpu {dc:.2f}s, load {os.getloadavg()[0]:.1f})")
    return times


# ----------------------------------------------------------------------------- (c)


def _recompute_site(lm, plan, layer: int, site: str, batch_tokens: int) -> np.ndarray:
    """(tokens, dim) float32 of one (layer, site), rows in store order, forwarding only
    down to `layer` (the cheapest recompute the hooks allow)."""
    from pipeline.cache.extract import Extractor
    from pipeline.cache.hooks import capture, run_to_deepest

    pad = lm.tokenizer.pad_token_id or 0
    helper = Extractor.__new__(Extractor)
    helper.batch_tokens = batch_tokens
    parts = []
    with capture(lm.model, [layer], [site]) as got:
        for unit in plan.units:
            lengths = [len(x) for x in unit.input_ids]
            starts = np.concatenate([[0], np.cumsum(lengths)])
            buf = None
            for batch in helper._batches(lengths):
                ids, mask, lens = _padded(unit, batch, pad)
                got.clear()
                run_to_deepest(lm.model, ids, mask)
                x = got[(layer, site)].float()
                if buf is None:
                    buf = np.empty((int(starts[-1]), x.shape[-1]), dtype=np.float32)
                for row, i in enumerate(batch):
                    buf[starts[i]: starts[i + 1]] = x[row, : lens[row]].numpy()
            parts.append(buf)
    return np.concatenate(parts)


def _train_epoch(loader, in_dim: int, out_dim: int, kind: str, opts: dict) -> int:
    """One epoch of the steps `cast train-heads` takes (heads/train.py fit_mlp's loop, or
    ridge's normal-equation pass); returns the number of steps."""
    from heads.modules import HeadConfig, ProjectionHead

    torch.manual_seed(opts["seed"])
    head = ProjectionHead(HeadConfig(kind=kind, in_dim=in_dim, out_dim=out_dim, hidden=opts["hidden"]))
    steps = 0
    with torch.enable_grad():
        if kind == "ridge":
            xtx = torch.zeros(in_dim + 1, in_dim + 1, dtype=torch.float64)
            xty = torch.zeros(in_dim + 1, out_dim, dtype=torch.float64)
            for xb, yb in loader.blocks():
                xa = torch.cat([xb.double(), torch.ones(len(xb), 1, dtype=torch.float64)], 1)
                xtx += xa.T @ xa
                xty += xa.T @ yb.double()
                steps += 1
            torch.linalg.solve(xtx + torch.eye(in_dim + 1, dtype=torch.float64), xty)
            return steps
        opt = torch.optim.AdamW(head.parameters(), lr=opts["lr"], weight_decay=opts["weight_decay"])
        total = max(1, math.ceil(len(loader) / opts["batch_size"]))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opts["lr"], total_steps=total, pct_start=0.1)
        head.train()
        for xb, yb in loader.batches(0):
            pred = head.standardised(xb)
            loss = ((pred - yb) ** 2).mean()
            if opts["cosine_weight"]:
                loss = loss + opts["cosine_weight"] * (
                    1 - torch.nn.functional.cosine_similarity(pred, yb, dim=1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if steps < total - 1:
                sched.step()
            steps += 1
    return steps


class HeadEpoch:
    """(c): one head's epoch from the stores vs with its activations recomputed."""

    def __init__(self, cfg: BenchConfig, m: Methods, work: Path):
        from heads.run import TrainHeadsConfig
        from pipeline.align.pairs import AlignConfig, run_align
        from storage.artifacts import load_alignment
        from pipeline.cache.extract import ExtractConfig, prepare, run_extract
        from pipeline.cache.hooks import parse_layers
        from pipeline.cache.models import load_model

        self.cfg, self.m = cfg, m
        partner = cfg.partner or PARTNERS.get(cfg.model, cfg.model)
        self.partner = partner
        n_src = m.lm.info.num_layers
        pcfg = ExtractConfig(model=partner, out=str(work / "partner.zarr"), corpus=cfg.corpus, sites=cfg.head_site,
                             layers="all", dtype=cfg.dtype, max_tokens=cfg.tokens, max_chars=cfg.max_chars,
                             unit_tokens=cfg.unit_tokens, batch_tokens=cfg.batch_tokens, workers=0)
        _, _, pmeta = prepare(pcfg)
        n_tgt = len(pmeta["layers"])
        self.src_layer = round(cfg.head_depth * (n_src - 1))
        self.tgt_layer = round(cfg.head_depth * (n_tgt - 1))
        if self.src_layer not in m.layers:
            raise ValueError(f"(c) needs layer {self.src_layer} of {cfg.model} (depth {cfg.head_depth}); "
                             f"--layers {cfg.layers} lacks it")
        pcfg.layers = str(self.tgt_layer)
        parse_layers(pcfg.layers, n_tgt)
        _log(f"(c) extracting {partner} layer {self.tgt_layer} {cfg.head_site} (not timed)")
        run_extract(pcfg, progress=False)
        self.partner_store = Path(pcfg.out)
        _, self.partner_plan, _ = prepare(pcfg)
        self.partner_lm = load_model(partner)
        self.src_store = m.store_path
        run_align(AlignConfig(src_store=str(self.src_store), tgt_store=str(self.partner_store),
                              out=str(work / "align"), force=True))
        pairs = load_alignment(work / "align").pairs()
        self.src_rows, self.tgt_rows = pairs["src_row"], pairs["tgt_row"]
        d = TrainHeadsConfig(src_store="", tgt_store="", align="", layermap="", out="")
        self.opts = {k: getattr(d, k) for k in ("hidden", "batch_size", "lr", "weight_decay", "cosine_weight", "seed",
                                                 "memory_budget_mb", "block_rows")}
        self.steps = 0

    def _loader(self, x, y, stats, budget_mb: float):
        from heads.data import PairLoader

        (xm, xv), (ym, yv) = stats
        return PairLoader(x=x, y=y, x_rows=self.src_rows, y_rows=self.tgt_rows,
                          x_mean=xm, x_std=np.sqrt(xv) + 1e-6, y_mean=ym, y_std=np.sqrt(yv) + 1e-6,
                          batch_size=self.opts["batch_size"], block_rows=self.opts["block_rows"],
                          memory_budget_mb=budget_mb, seed=self.opts["seed"])

    def _store_epoch(self, budget_mb: float) -> float:
        import storage

        site = self.cfg.head_site
        t0 = time.perf_counter()
        src, tgt = storage.open_store(self.src_store), storage.open_store(self.partner_store)
        x, y = src.array(self.src_layer, site), tgt.array(self.tgt_layer, site)
        loader = self._loader(x, y, (src.stats(self.src_layer, site), tgt.stats(self.tgt_layer, site)), budget_mb)
        self.steps = _train_epoch(loader, x.shape[1], y.shape[1], self.cfg.head_kind, self.opts)
        return time.perf_counter() - t0

    def store_kept(self, rep: int) -> float:
        """PairLoader's default: the pairs fit the budget, read once and kept."""
        return self._store_epoch(self.opts["memory_budget_mb"] / 2)

    def store_streamed(self, rep: int) -> float:
        """Budget 0: every block read from the stores during the epoch (data > memory)."""
        return self._store_epoch(0)

    def recompute(self, rep: int) -> float:
        import dask.array as da

        site, bt = self.cfg.head_site, self.cfg.batch_tokens
        t0 = time.perf_counter()
        xa = _recompute_site(self.m.lm, self.m.plan, self.src_layer, site, bt)
        ya = _recompute_site(self.partner_lm, self.partner_plan, self.tgt_layer, site, bt)
        stats = ((xa.mean(0, dtype=np.float64), xa.var(0, dtype=np.float64)),
                 (ya.mean(0, dtype=np.float64), ya.var(0, dtype=np.float64)))
        loader = self._loader(da.from_array(xa, chunks=(8192, xa.shape[1])),
                              da.from_array(ya, chunks=(8192, ya.shape[1])), stats, float("inf"))
        self.steps = _train_epoch(loader, xa.shape[1], ya.shape[1], self.cfg.head_kind, self.opts)
        return time.perf_counter() - t0


# ----------------------------------------------------------------------------- (d)


def peak_rss(cfg: BenchConfig, work: Path, tokens: int | None) -> dict:
    """Peak RSS of a fresh `cast extract --workers 0` process (tokens None: load the model only)."""
    job = {"model": cfg.model, "corpus": cfg.corpus, "sites": cfg.sites, "layers": cfg.layers, "dtype": cfg.dtype,
           "max_chars": cfg.max_chars, "unit_tokens": cfg.mem_unit_tokens, "batch_tokens": cfg.batch_tokens,
           "tokens": tokens, "out": str(work / f"mem-{tokens}.zarr"), "threads": cfg.threads}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "bench.memchild", json.dumps(job)], capture_output=True,
                         text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"memory child for {tokens} tokens failed:\n{res.stderr[-2000:]}")
    shutil.rmtree(job["out"], ignore_errors=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report


TARGETS = {
    "a_extract_vs_forward": (">=", 0.9),
    "a_extract_vs_backbone": (">=", 0.9),
    "b_extract_vs_naive": (">", 1.0),
    "c_store_vs_recompute": (">=", 20.0),
    "d_extract_peak_4n_over_n": ("<=", 1.1),
    "d_process_peak_4n_over_n": ("<=", 1.1),
}


def _met(name: str, value: float) -> bool | None:
    if name not in TARGETS:
        return None
    op, bound = TARGETS[name]
    return {">=": value >= bound, ">": value > bound, "<=": value <= bound}[op]


def format_table(r: dict) -> str:
    c = r["config"]
    tps, med = r.get("tokens_per_s", {}), r.get("median_s", {})
    lines = [f"### cast bench: {c['model']} — {r['tokens']:,} tokens, {r['units']} units, {r['batches']} batches, "
             f"{c['reps']} interleaved reps (medians), torch threads {r['machine']['torch_threads']}, "
             f"load avg {r['machine']['loadavg_start']:.1f} -> {r['machine']['loadavg_end']:.1f}",
             "",
             "| method | median wall s | tok/s | median CPU s | wall s per rep |",
             "|---|---:|---:|---:|---|"]
    for name, ts in r.get("times", {}).items():
        cpu = r.get("median_cpu_s", {}).get(name, float("nan"))
        lines.append(f"| {name} | {med[name]:.2f} | {tps[name]:,.0f} | {cpu:.2f} | {' '.join(f'{t:.2f}' for t in ts)} |")
    lines += ["", "| ratio | value | target | met | what |", "|---|---:|---|---|---|"]
    what = {
        "a_extract_vs_forward": "extract tok/s / bare forward tok/s (full model, LM head included)",
        "a_extract_vs_backbone": "extract tok/s / backbone forward tok/s (no LM head: the strict one)",
        "a_ray_vs_forward": "Ray actor extract tok/s / bare forward tok/s",
        "b_extract_vs_naive": f"extract tok/s / naive dump tok/s (output_hidden_states + hooks, np.save {c['naive_dtype']})",
        "c_store_vs_recompute": "recompute epoch s / store epoch s (store streamed, the slower store path)",
        "c_store_kept_vs_recompute": "recompute epoch s / store epoch s (pairs read once, kept)",
        "d_extract_peak_4n_over_n": "peak RSS while extracting (high-water mark reset after the model load) at 4N / at N",
        "d_process_peak_4n_over_n": "peak RSS of the whole `cast extract --workers 0` process at 4N / at N",
        "e_store_vs_raw": f"store activation bytes / raw {c['dtype']} bytes",
        "e_store_vs_float32": "store activation bytes / raw float32 bytes",
    }
    for name, value in r["ratios"].items():
        t = TARGETS.get(name)
        met = r["met"].get(name)
        lines.append(f"| {name} | {value:.3f} | {t[0] + ' ' + str(t[1]) if t else '—'} | "
                     f"{'—' if met is None else ('yes' if met else '**NO**')} | {what.get(name, '')} |")
    if "hooks" in med and "extract_no_write" in med:
        b, h, nw, e = med["backbone"], med["hooks"], med["extract_no_write"], med["extract"]
        lines += ["", f"(a) where extraction's time goes (median wall s, share of the backbone's): backbone {b:.2f}; "
                      f"hooks firing {h - b:+.2f} ({(h - b) / b:+.1%}); gather, bf16 encode and stats "
                      f"{nw - h:+.2f} ({(nw - h) / b:+.1%}); the unit write (zarr, zstd, sha256) {e - nw:+.2f} "
                      f"({(e - nw) / b:+.1%}); extract {e:.2f}."]
    if "extract_ray" in r.get("times", {}):
        lines += ["", "extract_ray: one Ray actor (model loaded once) fed the same units; its CPU column is the "
                      "driver's only."]
    if "c" in r:
        cc = r["c"]
        lines += ["", f"(c) {cc['kind']} head {cc['site']}: {c['model']} L{cc['src_layer']} -> {cc['partner']} "
                      f"L{cc['tgt_layer']}, {cc['pairs']:,} pairs, {cc['steps']} steps/epoch, {cc['threads']} torch thread(s) "
                      f"for both paths; recompute forwards both models down to those layers only (its cheapest "
                      f"form; tokenization and alignment are not timed for either path)."]
    if "d" in r:
        d = r["d"]
        sm, bg = d["small"], d["big"]
        lines += [f"(d) peak RSS (MiB), fresh process each, unit {c['mem_unit_tokens']} tokens: model load alone "
                  f"{d['load_only_mb']:,.0f}; N={d['tokens_n']:,} tokens ({d['units_n']} units): after load "
                  f"{sm['after_load_mb']:,.0f}, extraction peak {sm['extract_peak_mb'] or float('nan'):,.0f}, "
                  f"process peak {sm['peak_rss_mb']:,.0f}; 4N={d['tokens_4n']:,} ({d['units_4n']} units): after load "
                  f"{bg['after_load_mb']:,.0f}, extraction peak {bg['extract_peak_mb'] or float('nan'):,.0f}, "
                  f"process peak {bg['peak_rss_mb']:,.0f}."]
    if "e" in r:
        e = r["e"]
        lines += [f"(e) bytes/token: store activations {e['store_act_bytes_per_token']:,.0f} (whole store "
                  f"{e['store_bytes_per_token']:,.0f}), raw {c['dtype']} {e['raw_bytes_per_token']:,.0f}, raw float32 "
                  f"{e['float32_bytes_per_token']:,.0f}; naive dump {e.get('naive_bytes_per_token', 0):,.0f}."]
    return "\n".join(lines)


def run_bench(cfg: BenchConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    grad_before = torch.is_grad_enabled()  # restored below: callers (and tests) share the process
    torch.set_grad_enabled(False)
    work = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="cast-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    parts = cfg.part_set
    result: dict = {"config": asdict(cfg),
                    "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                "loadavg_start": os.getloadavg()[0]},
                    "ratios": {}}
    try:
        m = Methods(cfg, work)
        result.update(tokens=m.n_tokens, padded_tokens=m.padded_tokens, units=len(m.plan.units),
                      batches=len(m.batches))
        _log(f"{cfg.model}: {m.n_tokens:,} tokens in {len(m.plan.units)} units, {len(m.batches)} batches "
             f"({m.padded_tokens:,} padded)")
        methods = {"extract": m.extract}
        if "a" in parts:
            methods.update(forward=m.forward, backbone=m.backbone)
            if cfg.breakdown:
                methods.update(hooks=m.hooks, extract_no_write=m.extract_no_write)
        if "b" in parts:
            methods["naive"] = m.naive
        if cfg.ray:
            methods["extract_ray"] = m.extract_ray
            m._ensure_ray()
        times: dict[str, list[float]] = {}
        cpu_times: dict[str, list[float]] = {}
        if parts & {"a", "b", "c", "e"}:
            m.forward(-1) if "a" in parts else m.backbone(-1)  # warm-up: allocator, kernels, page cache
            times = time_interleaved(methods, cfg.reps, cpu_times)
        m.close()

        hc = None
        if "c" in parts:
            hc = HeadEpoch(cfg, m, work)
            before = torch.get_num_threads()
            if cfg.head_threads:
                torch.set_num_threads(cfg.head_threads)
            try:
                ctimes = time_interleaved({"head_epoch_store_kept": hc.store_kept,
                                           "head_epoch_store_streamed": hc.store_streamed,
                                           "head_epoch_recompute": hc.recompute}, cfg.reps, cpu_times)
            finally:
                torch.set_num_threads(before)
            times.update(ctimes)
        result["times"] = times
        result["cpu_times"] = cpu_times
        result["median_cpu_s"] = {k: _median(v) for k, v in cpu_times.items()}
        result["median_s"] = {k: _median(v) for k, v in times.items()}
        result["tokens_per_s"] = {k: m.n_tokens / v for k, v in result["median_s"].items()}
        med, ratios = result["median_s"], result["ratios"]
        paired = {}
        if "a" in parts:
            ratios["a_extract_vs_forward"] = med["forward"] / med["extract"]
            ratios["a_extract_vs_backbone"] = med["backbone"] / med["extract"]
            paired["a_extract_vs_forward"] = _median([f / e for f, e in zip(times["forward"], times["extract"])])
            paired["a_extract_vs_backbone"] = _median([f / e for f, e in zip(times["backbone"], times["extract"])])
            if cfg.ray:
                ratios["a_ray_vs_forward"] = med["forward"] / med["extract_ray"]
        if "b" in parts:
            ratios["b_extract_vs_naive"] = med["naive"] / med["extract"]
            paired["b_extract_vs_naive"] = _median([n / e for n, e in zip(times["naive"], times["extract"])])
        if hc is not None:
            ratios["c_store_vs_recompute"] = med["head_epoch_recompute"] / med["head_epoch_store_streamed"]
            ratios["c_store_kept_vs_recompute"] = med["head_epoch_recompute"] / med["head_epoch_store_kept"]
            paired["c_store_vs_recompute"] = _median(
                [r / s for r, s in zip(times["head_epoch_recompute"], times["head_epoch_store_streamed"])])
            result["c"] = {"partner": hc.partner, "site": cfg.head_site, "kind": cfg.head_kind,
                           "src_layer": hc.src_layer, "tgt_layer": hc.tgt_layer, "pairs": int(len(hc.src_rows)),
                           "steps": hc.steps, "threads": cfg.head_threads or torch.get_num_threads()}
        if "e" in parts:
            store = m.store_path
            n = m.n_tokens
            per_token_values = sum(m.meta["dims"][s] for s in m.sites) * len(m.layers)
            itemsize = np.dtype({"bfloat16": "uint16", "float16": "float16", "float32": "float32"}[cfg.dtype]).itemsize
            act = _dir_bytes(store / "units", "*/act/**/*")
            result["e"] = {"store_act_bytes_per_token": act / n, "store_bytes_per_token": _dir_bytes(store) / n,
                           "raw_bytes_per_token": per_token_values * itemsize,
                           "float32_bytes_per_token": per_token_values * 4,
                           "values_per_token": per_token_values}
            if m.naive_bytes:
                result["e"]["naive_bytes_per_token"] = m.naive_bytes / n
            ratios["e_store_vs_raw"] = act / (n * per_token_values * itemsize)
            ratios["e_store_vs_float32"] = act / (n * per_token_values * 4)
        result["paired_median_ratios"] = paired
        del m, hc
        if "d" in parts:
            n = cfg.mem_tokens
            _log(f"(d) peak RSS: model only, then extraction of {n:,} and {4 * n:,} tokens, fresh processes")
            base = peak_rss(cfg, work, None)
            small = peak_rss(cfg, work, n)
            big = peak_rss(cfg, work, 4 * n)
            result["d"] = {"n": n, "load_only_mb": base["peak_rss_mb"], "small": small, "big": big,
                           "units_n": small["units"], "units_4n": big["units"],
                           "tokens_n": small["tokens"], "tokens_4n": big["tokens"]}
            ratios["d_process_peak_4n_over_n"] = big["peak_rss_mb"] / small["peak_rss_mb"]
            if small["extract_peak_mb"] and big["extract_peak_mb"]:
                ratios["d_extract_peak_4n_over_n"] = big["extract_peak_mb"] / small["extract_peak_mb"]
        result["ratios"] = ratios = dict(sorted(ratios.items()))
        result["met"] = {k: _met(k, v) for k, v in ratios.items()}
        result["machine"]["loadavg_end"] = os.getloadavg()[0]
    finally:
        torch.set_grad_enabled(grad_before)
        if not cfg.keep and not cfg.workdir:
            shutil.rmtree(work, ignore_errors=True)
        elif not cfg.keep:
            for p in work.iterdir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    result["table"] = format_table(result)
    out = Path(cfg.json or f"runs/bench/{Path(cfg.model).name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(result["table"] + "\n")
    result["json"] = str(out)
    return result

