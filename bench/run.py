"""`cast bench`: every measurement of bench/__init__.py in one run, and its table."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from bench.config import BenchConfig
from bench.extraction import Methods, partner_times
from bench.heads import HeadEpoch
from bench.integrity import integrity_cost
from bench.memory import peak_rss
from bench.report import format_table, met
from bench.timing import dir_bytes, log, median, time_interleaved
from bench.writer import WriteMethods
from storage.layout import STORAGE_DTYPES


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
        log(f"{cfg.model}: {m.n_tokens:,} tokens in {len(m.plan.units)} units, {len(m.batches)} batches "
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
            m.start_ray()
        times: dict[str, list[float]] = {}
        cpu_times: dict[str, list[float]] = {}
        wm = None
        if "w" in parts:  # one untimed extraction keeps the units (w) writes
            wm = WriteMethods(m.capture(), m.meta, work)
            methods.update(writer=wm.writer, plain_write=wm.plain)
        if parts & {"a", "b", "c", "e", "w"}:
            m.forward(-1) if "a" in parts else m.backbone(-1)  # warm-up: allocator, kernels, page cache
            times = time_interleaved(methods, cfg.reps, cpu_times)
        m.close()
        if wm is not None:
            result["w"] = {"units": len(wm.units), "tokens": wm.tokens, "raw_mb": wm.nbytes / 1e6}
            methods.clear()
            del wm  # the captured units: hundreds of MB on a real model
        if "a" in parts and cfg.both and cfg.partner_name != cfg.model:
            log(f"(a) {cfg.partner_name}, the pair's other model: extract, forward, backbone")
            result["partner"] = cfg.partner_name
            ptimes, result["partner_tokens"] = partner_times(cfg, work, cpu_times)
            times.update(ptimes)

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
        result["median_cpu_s"] = {k: median(v) for k, v in cpu_times.items()}
        result["median_s"] = {k: median(v) for k, v in times.items()}
        result["tokens_per_s"] = {k: (result["partner_tokens"] if k.startswith("partner_") else m.n_tokens) / v
                                  for k, v in result["median_s"].items()}
        med, ratios = result["median_s"], result["ratios"]
        paired = {}
        if "a" in parts:
            ratios["a_extract_vs_forward"] = med["forward"] / med["extract"]
            ratios["a_extract_vs_backbone"] = med["backbone"] / med["extract"]
            paired["a_extract_vs_forward"] = median([f / e for f, e in zip(times["forward"], times["extract"])])
            paired["a_extract_vs_backbone"] = median([f / e for f, e in zip(times["backbone"], times["extract"])])
            if "partner_extract" in times:
                ratios["a_partner_extract_vs_forward"] = med["partner_forward"] / med["partner_extract"]
                ratios["a_partner_extract_vs_backbone"] = med["partner_backbone"] / med["partner_extract"]
                paired["a_partner_extract_vs_backbone"] = median(
                    [f / e for f, e in zip(times["partner_backbone"], times["partner_extract"])])
            if cfg.ray:
                ratios["a_ray_vs_forward"] = med["forward"] / med["extract_ray"]
        if "w" in result:  # MB/s of the same raw bytes, so the ratio is plain seconds / writer seconds
            result["w"].update(writer_mb_s=result["w"]["raw_mb"] / med["writer"],
                               plain_mb_s=result["w"]["raw_mb"] / med["plain_write"])
            ratios["w_writer_vs_plain"] = med["plain_write"] / med["writer"]
            paired["w_writer_vs_plain"] = median([p / w for p, w in zip(times["plain_write"], times["writer"])])
        if "b" in parts:
            ratios["b_extract_vs_naive"] = med["naive"] / med["extract"]
            paired["b_extract_vs_naive"] = median([n / e for n, e in zip(times["naive"], times["extract"])])
        if hc is not None:
            ratios["c_store_vs_recompute"] = med["head_epoch_recompute"] / med["head_epoch_store_streamed"]
            ratios["c_store_kept_vs_recompute"] = med["head_epoch_recompute"] / med["head_epoch_store_kept"]
            paired["c_store_vs_recompute"] = median(
                [r / s for r, s in zip(times["head_epoch_recompute"], times["head_epoch_store_streamed"])])
            result["c"] = {"partner": hc.partner, "site": cfg.head_site, "kind": cfg.head_kind,
                           "src_layer": hc.src_layer, "tgt_layer": hc.tgt_layer, "pairs": int(len(hc.src_rows)),
                           "steps": hc.steps, "threads": cfg.head_threads or torch.get_num_threads()}
        if "e" in parts:
            store = m.store_path
            n = m.n_tokens
            per_token_values = sum(m.meta["dims"][s] for s in m.sites) * len(m.layers)
            itemsize = np.dtype(STORAGE_DTYPES[cfg.dtype]).itemsize
            act = dir_bytes(store / "units", "*/act/**/*")
            result["e"] = {"store_act_bytes_per_token": act / n, "store_bytes_per_token": dir_bytes(store) / n,
                           "raw_bytes_per_token": per_token_values * itemsize,
                           "float32_bytes_per_token": per_token_values * 4,
                           "values_per_token": per_token_values}
            if m.naive_bytes:
                result["e"]["naive_bytes_per_token"] = m.naive_bytes / n
            ratios["e_store_vs_raw"] = act / (n * per_token_values * itemsize)
            ratios["e_store_vs_float32"] = act / (n * per_token_values * 4)
        if "f" in parts:
            f = result["f"] = integrity_cost(m.store_path, cfg.reps)
            ratios["f_checksum_vs_extract"] = f["crc_s"] / med["extract"]
            ratios["f_checksum_vs_read"] = f["crc_s"] / f["read_s"]
            ratios["f_listing_vs_read"] = f["listing_s"] / f["read_s"]
        result["paired_median_ratios"] = paired
        del m, hc
        if "d" in parts:
            n = cfg.mem_tokens
            log(f"(d) peak RSS: model only, then extraction of {n:,} and {4 * n:,} tokens, fresh processes")
            base = peak_rss(cfg, work, None)
            small = peak_rss(cfg, work, n)
            big = peak_rss(cfg, work, 4 * n)
            result["d"] = {"n": n, "load_only_mb": base["peak_rss_mb"], "small": small, "big": big,
                           "units_n": small["units"], "units_4n": big["units"],
                           "tokens_n": small["tokens"], "tokens_4n": big["tokens"]}
            ratios["d_process_peak_4n_over_n"] = big["peak_rss_mb"] / small["peak_rss_mb"]
            if small["extract_peak_mb"] and big["extract_peak_mb"]:
                ratios["d_extract_peak_4n_over_n"] = big["extract_peak_mb"] / small["extract_peak_mb"]
        if "g" in parts:
            from bench.proxy import bench_proxy

            lengths = tuple(int(x) for x in cfg.proxy_lengths.split(","))
            result["proxy"] = p = bench_proxy(cfg.proxy_source, cfg.proxy_target, cfg.corpus, lengths, reps=cfg.reps)
            ratios[f"g_proxy_cached_per_token_{lengths[-1]}_over_{lengths[0]}"] = p[
                f"per_token_ratio_{lengths[-1]}_{lengths[0]}"]
            if "cached_vs_target_tokens_per_s_128" in p:
                ratios["g_proxy_cached_vs_target_tokens_per_s_128"] = p["cached_vs_target_tokens_per_s_128"]
                ratios["g_proxy_one_pass_vs_two_pass_128"] = p["one_pass_vs_two_pass_per_token_128"]
        if "s" in parts:
            from bench.student import bench_student

            result["student"] = st = bench_student(cfg.student_target, cfg.corpus, cfg.reps,
                                                   continuation=cfg.student_continuation)
            ratios["s_student_step_packed_vs_one_row_per_sample"] = st["packed_vs_one_row_per_sample"]
        if "h" in parts:
            from bench.head import bench_head

            result["head"] = hd = bench_head(cfg.student_target, cfg.corpus, cfg.reps)
            ratios["h_decode_columns_first_vs_linear"] = hd["decode_columns_first_vs_linear"]
        result["ratios"] = ratios = dict(sorted(ratios.items()))
        result["met"] = {k: met(k, v) for k, v in ratios.items()}
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
