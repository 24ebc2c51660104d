"""The table `cast bench` prints and writes beside its JSON, and the bars each ratio is
held to (docs/design.md#performance-bars)."""
from __future__ import annotations

TARGETS = {
    "a_extract_vs_forward": (">=", 0.95),
    "a_extract_vs_backbone": (">=", 0.95),
    "a_partner_extract_vs_forward": (">=", 0.95),
    "a_partner_extract_vs_backbone": (">=", 0.95),
    "w_writer_vs_plain": (">=", 0.7),
    "b_extract_vs_naive": (">", 1.0),
    "c_store_vs_recompute": (">=", 20.0),
    "d_extract_peak_4n_over_n": ("<=", 1.1),
    "d_process_peak_4n_over_n": ("<=", 1.1),
    "f_checksum_vs_extract": ("<=", 0.02),
    "g_proxy_cached_per_token_512_over_32": ("<=", 1.5),
    "g_proxy_cached_vs_target_tokens_per_s_128": (">=", 0.4),
}


def met(name: str, value: float) -> bool | None:
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
        "a_partner_extract_vs_forward": f"the same for {r.get('partner', 'the partner')} (the pair's other model)",
        "a_partner_extract_vs_backbone": "the same, backbone (the strict one), for the pair's other model",
        "a_ray_vs_forward": "Ray actor extract tok/s / bare forward tok/s",
        "w_writer_vs_plain": "unit writer MB/s / plain sequential write MB/s, same raw bytes, same disk, both fsync'd",
        "b_extract_vs_naive": f"extract tok/s / naive dump tok/s (output_hidden_states + hooks, np.save {c['naive_dtype']})",
        "c_store_vs_recompute": "recompute epoch s / store epoch s (store streamed, the slower store path)",
        "c_store_kept_vs_recompute": "recompute epoch s / store epoch s (pairs read once, kept)",
        "d_extract_peak_4n_over_n": "peak RSS while extracting (high-water mark reset after the model load) at 4N / at N",
        "d_process_peak_4n_over_n": "peak RSS of the whole `cast extract --workers 0` process at 4N / at N",
        "e_store_vs_raw": f"store activation bytes / raw {c['dtype']} bytes",
        "e_store_vs_float32": "store activation bytes / raw float32 bytes",
        "f_checksum_vs_extract": "crc32c over every stored byte (what a write adds) / extract wall s",
        "f_checksum_vs_read": "crc32c over every stored byte / a full checked read of the store",
        "f_listing_vs_read": "presence check of every chunk file (one listing per unit) / a full checked read",
        "g_proxy_cached_per_token_512_over_32": "cached proxy: decode s per token at 512 tokens / at 32",
        "g_proxy_cached_vs_target_tokens_per_s_128": "cached proxy tok/s / target-alone tok/s, at 128 tokens",
        "g_proxy_one_pass_vs_two_pass_128": "cached proxy decode s per token, source read once a step (LoRA and "
                                            "base rows in one batch) / twice, at 128 tokens",
        "s_student_step_packed_vs_one_row_per_sample": "`cast distill` training step s, a prompt's samples packed in "
                                                       "one row / one row per sample",
        "h_decode_columns_first_vs_linear": "greedy decode s with the LM head as W·xᵀ / as F.linear (x·Wᵀ)",
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
                      f"{nw - h:+.2f} ({(nw - h) / b:+.1%}); the unit write (chunk files, crc32c) {e - nw:+.2f} "
                      f"({(e - nw) / b:+.1%}); extract {e:.2f}."]
    if "w" in r:
        w = r["w"]
        lines += ["", f"(w) the store's unit writer alone ({w['units']} unit(s), {w['raw_mb']:,.0f} MB raw, no forward "
                      f"pass): {w['writer_mb_s']:,.0f} MB/s, against {w['plain_mb_s']:,.0f} MB/s for a plain sequential "
                      f"write of the same bytes into one file (no compression); both include fsync. The writer keeps "
                      f"up with a forward pass of up to {w['writer_mb_s'] * w['tokens'] / w['raw_mb']:,.0f} tok/s "
                      f"({w['raw_mb'] * 1e6 / w['tokens']:,.0f} B/token); a model forwarded faster (a GPU) is bound "
                      f"by the writer, at w_writer_vs_plain of the disk's rate."]
    if "extract_ray" in r.get("times", {}):
        lines += ["", "extract_ray: one Ray actor (model loaded once) fed the same units; its CPU column is the "
                      "driver's only."]
    if "proxy" in r:
        p = r["proxy"]
        lengths = list(p["per_token_s"]["target"])
        lines += ["", f"(g) decoding, ms per generated token (median of {p['reps']}, {p['new_tokens']} tokens after a "
                      f"1-token run, prefill excluded): {p['source']} LoRA through the proxy onto {p['target']}",
                  "", "| system | " + " | ".join(f"at {n} tokens" for n in lengths) + " |",
                  "|---|" + "---:|" * len(lengths)]
        for system, d in p["per_token_s"].items():
            lines.append(f"| {system} | " + " | ".join(f"{d[n] * 1e3:.1f} ({1 / d[n]:.1f} tok/s)" for n in lengths) + " |")
    if "student" in r:
        st = r["student"]
        sec, tok = st["seconds_per_step"], st["tokens_per_step"]
        lines += ["", f"(s) `cast distill` step on {st['target']} ({st['samples']} samples from {st['prompts']} corpus "
                      f"prefixes, prompt {st['mean_prompt']:.1f} and continuation {st['mean_continuation']:.2f} tokens "
                      f"on average; {st['batch_size']} samples a step, median of {st['reps']} x {st['steps_per_rep']} "
                      f"steps): one row per sample "
                      f"{sec['one_row_per_sample']:.3f} s ({tok['one_row_per_sample']} tokens), packed "
                      f"{sec['packed']:.3f} s ({tok['packed']} tokens)."]
    if "head" in r:
        h = r["head"]
        m, d = h["matmul_s"], h["decode"]
        lines += ["", f"(h) {h['target']}'s LM head ({h['vocab']:,} x {h['hidden']}), ms, median of {h['reps']}: "
                      "forward F.linear / columns-first, then forward + backward, per rows: "
                  + "; ".join(f"{n} rows {m['linear_forward'][n] * 1e3:.0f} / {m['columns_first_forward'][n] * 1e3:.0f}, "
                              f"{m['linear_forward_backward'][n] * 1e3:.0f} / {m['columns_first_forward_backward'][n] * 1e3:.0f}"
                              for n in m["linear_forward"])
                  + f". Greedy decode of {d['prompts']} corpus prompts x {d['new_tokens']} tokens: F.linear "
                    f"{d['seconds']['linear']:.2f} s, columns-first {d['seconds']['columns_first']:.2f} s; same tokens: "
                    f"{'yes' if d['same_tokens'] else '**NO**'}."]
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
    if "f" in r:
        f = r["f"]
        ratio = r["ratios"]
        lines += [f"(f) integrity: {f['files']:,} chunk files, {f['bytes'] / 2**20:,.2f} MiB; crc32c over all of "
                  f"them {f['crc_s'] * 1e3:,.3f} ms ({ratio['f_checksum_vs_extract']:.3%} of extraction's wall time, "
                  f"{ratio['f_checksum_vs_read']:.3%} of a full checked read), presence check "
                  f"{f['listing_s'] * 1e3:,.1f} ms, full checked read {f['read_s'] * 1e3:,.1f} ms."]
    return "\n".join(lines)
