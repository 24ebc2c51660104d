"""`cast bench` end to end on the tiny presets: every ratio lands in the JSON as a
positive finite number (timings themselves are not asserted: CI machines are noisy)."""
from __future__ import annotations

import json
import math

import pytest

from jobs.cli import main

RATIOS = ("a_extract_vs_forward", "a_extract_vs_backbone", "b_extract_vs_naive", "c_store_vs_recompute",
          "c_store_kept_vs_recompute", "d_extract_peak_4n_over_n", "d_process_peak_4n_over_n",
          "e_store_vs_raw", "e_store_vs_float32", "a_partner_extract_vs_forward", "a_partner_extract_vs_backbone",
          "w_writer_vs_plain", "f_checksum_vs_extract", "f_checksum_vs_read", "f_listing_vs_read",
          "g_proxy_cached_per_token_512_over_32", "g_proxy_cached_vs_target_tokens_per_s_128",
          "g_proxy_one_pass_vs_two_pass_128", "s_student_step_packed_vs_one_row_per_sample",
          "h_decode_columns_first_vs_linear")


def test_bench_reports_every_ratio(tmp_path, corpus_dir, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", "tiny-llama", "--corpus", str(corpus_dir), "--tokens", "240",
               "--unit-tokens", "100", "--mem-tokens", "240", "--mem-unit-tokens", "100",
               "--max-chars", "160", "--reps", "2", "--workdir", str(tmp_path / "work"),
               "--proxy-source", "tiny-llama", "--proxy-target", "tiny-gemma3", "--student-target", "tiny-gemma3",
               "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    for name in RATIOS:
        value = res["ratios"][name]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, value)
    assert set(res["met"]) == set(res["ratios"])
    assert res["c"]["partner"] == "tiny-gemma3" and res["c"]["pairs"] > 0
    assert res["d"]["units_4n"] > res["d"]["units_n"] >= 2
    assert res["partner"] == "tiny-gemma3" and res["partner_tokens"] > 0
    assert res["w"]["units"] == res["units"] and res["w"]["raw_mb"] > 0  # every unit of the plan, written alone
    assert res["w"]["writer_mb_s"] > 0 and res["w"]["plain_mb_s"] > 0
    for method in ("extract", "forward", "backbone", "hooks", "extract_no_write", "naive", "head_epoch_recompute",
                   "head_epoch_store_streamed", "writer", "plain_write", "partner_extract", "partner_backbone"):
        assert len(res["times"][method]) == 2 and all(t > 0 for t in res["times"][method])
    assert set(res["proxy"]["tokens_per_s"]) == {"target", "target_lora", "proxy_uncached", "proxy_cached",
                                                 "proxy_cached_two_pass"}
    assert all(set(v) == {"32", "128", "512"} for v in res["proxy"]["tokens_per_s"].values())
    tps = res["proxy"]["tokens_per_s"]  # the ratio is what its name says, the right way up
    assert res["ratios"]["g_proxy_cached_vs_target_tokens_per_s_128"] == pytest.approx(
        tps["proxy_cached"]["128"] / tps["target"]["128"], rel=1e-9)
    assert res["ratios"]["g_proxy_one_pass_vs_two_pass_128"] == pytest.approx(
        tps["proxy_cached_two_pass"]["128"] / tps["proxy_cached"]["128"], rel=1e-9)
    st = res["student"]  # the same samples both ways; packing reads each prompt once
    assert st["tokens_per_step"]["packed"] < st["tokens_per_step"]["one_row_per_sample"]
    assert res["ratios"]["s_student_step_packed_vs_one_row_per_sample"] == pytest.approx(
        st["seconds_per_step"]["packed"] / st["seconds_per_step"]["one_row_per_sample"], rel=1e-9)
    hd = res["head"]  # both kernels timed at every row count; the decode gives the same tokens
    assert set(hd["matmul_s"]["linear_forward"]) == set(hd["matmul_s"]["columns_first_forward_backward"]) == {
        "1", "8", "16", "64"}
    assert hd["decode"]["same_tokens"] is True
    assert res["ratios"]["h_decode_columns_first_vs_linear"] == pytest.approx(
        hd["decode"]["seconds"]["columns_first"] / hd["decode"]["seconds"]["linear"], rel=1e-9)
    assert (tmp_path / "bench.md").read_text().startswith("### cast bench: tiny-llama")
    printed = capsys.readouterr().out
    assert "| a_extract_vs_forward |" in printed and "(a) where extraction's time goes" in printed
    assert "| proxy_cached |" in printed and "(s) `cast distill` step on tiny-gemma3" in printed
    assert "(h) tiny-gemma3's LM head" in printed
    assert "| w_writer_vs_plain |" in printed and "(w) the store's unit writer alone" in printed
    assert "| f_checksum_vs_extract |" in printed and "(f) integrity:" in printed
    assert not any((tmp_path / "work").iterdir())  # scratch stores and dumps cleaned up


def test_every_timed_method_starts_on_a_settled_disk():
    # A method must not be timed while the disk still flushes what the one before it wrote.
    from bench.timing import time_interleaved

    events = []
    methods = {name: (lambda rep, name=name: events.append(name) or 0.0) for name in ("a", "b", "c")}
    times = time_interleaved(methods, reps=2, settle=lambda: events.append("settle"))
    assert events == ["settle", "a", "settle", "b", "settle", "c", "settle", "b", "settle", "c", "settle", "a"]
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2, "c": 2}
