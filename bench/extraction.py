"""(a) and (b) of `cast bench`: extraction against a bare forward pass (with and without
the LM head, and split into hooks, post-processing and the write) and against a naive
dump of output_hidden_states, all over the same batches of one loaded model."""
from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.config import BenchConfig
from bench.timing import dir_bytes, padded


PARTNER_DIR = "partner-a"


def partner_times(cfg: BenchConfig, work: Path, cpu: dict) -> tuple[dict[str, list[float]], int]:
    """(a) for the other model of the pair, so one run reports extract / backbone for both:
    its extract, forward and backbone, interleaved as the first model's are. Returns the
    times and the partner's token count (its own tokenizer's, over the same segments)."""
    from bench.timing import time_interleaved

    pm = Methods(replace(cfg, model=cfg.partner_name), work / PARTNER_DIR)
    try:
        pm.forward(-1)  # warm-up
        times = time_interleaved({"partner_extract": pm.extract, "partner_forward": pm.forward,
                                  "partner_backbone": pm.backbone}, cfg.reps, cpu)
    finally:
        pm.close()
    return times, pm.n_tokens


class Methods:
    """The timed methods of (a) and (b), sharing one loaded model and one plan."""

    def __init__(self, cfg: BenchConfig, work: Path):
        from pipeline.cache.extract import ExtractConfig, Extractor, length_batches, prepare

        self.cfg, self.work = cfg, work
        work.mkdir(parents=True, exist_ok=True)
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
            for batch in length_batches(lengths, cfg.batch_tokens):
                self.batches.append(padded(unit, batch, self.worker.pad))
        self.padded_tokens = sum(int(ids.numel()) for ids, _, _ in self.batches)
        self.store_path: Path | None = None
        self.naive_bytes = 0
        self._ray_actor = None

    def capture(self, max_units: int = 4) -> list[tuple]:
        """Extract the plan once, untimed (a warm-up too), keeping the write arguments of up
        to `max_units` units in memory: (w) writes exactly these units."""
        kept: list[tuple] = []
        self.worker.write = lambda *args: kept.append(args) if len(kept) < max_units else None
        try:
            for unit in self.plan.units:
                self.worker.run(unit)
            self.worker.flush()
        finally:
            del self.worker.write
        return kept

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
        self.naive_bytes = dir_bytes(out)
        shutil.rmtree(out, ignore_errors=True)
        return dt

    def extract_ray(self, rep: int) -> float:
        from storage.writer import create_store

        path = self.work / f"ray-{rep}.zarr"
        create_store(path, self.meta)
        import ray

        actor = self.start_ray()
        ray.get(actor.call.remote("retarget", str(path)))
        t0 = time.perf_counter()
        for unit in self.plan.units:  # one actor, units in turn: the Ray path's steady state
            ray.get(actor.run.remote(unit))
        ray.get(actor.flush.remote())
        dt = time.perf_counter() - t0
        shutil.rmtree(path, ignore_errors=True)
        return dt

    def start_ray(self):
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
        if self.store_path is not None and self.work.name == PARTNER_DIR:  # nothing reads the partner's store
            shutil.rmtree(self.store_path, ignore_errors=True)
        if self._ray_actor is not None:
            self._ray_cm.__exit__(None, None, None)
            self._ray_actor = None
