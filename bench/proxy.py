"""(g) The logit proxy's decoding cost per token against the target's own, by text length.

Systems, each greedy-decoding the same prompt: the target alone, the target with a LoRA
of the source adapter's rank (what serving a distilled or retrained LoRA costs), the
proxy re-reading the whole text with the source at every token (uncached), and the proxy
with the source's KV caches (pipeline/assemble/proxy_cache.py), reading the source with and
without its LoRA in one pass a step (the default) or in two. Per-token time is
decoding alone: (time for 1 + n new tokens − time for 1) / n, so the prompt's prefill
is not counted; a length L means a prompt of L − n − 1 tokens. Repeats are interleaved
(every system and length once per round) and medians are reported.
"""
from __future__ import annotations

import time

import torch

from bench.timing import log, median

SYSTEMS = ("target", "target_lora", "proxy_uncached", "proxy_cached", "proxy_cached_two_pass")


def _prompt_ids(tokenizer, corpus: str, length: int) -> torch.Tensor:
    from pipeline.cache.corpus import load_corpus, segment

    ids: list[int] = tokenizer("", add_special_tokens=True).input_ids
    for seg in segment(load_corpus(corpus), 512):
        ids += tokenizer(" " + seg.text, add_special_tokens=False).input_ids
        if len(ids) >= length:
            return torch.tensor([ids[:length]])
    raise ValueError(f"--corpus {corpus} holds {len(ids)} tokens, fewer than --proxy-lengths needs ({length})")


def _decode_seconds(model, ids: torch.Tensor, new: int, processors, pad: int) -> float:
    t0 = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                   do_sample=False, pad_token_id=pad, logits_processor=processors)
    return time.perf_counter() - t0


@torch.no_grad()
def bench_proxy(source: str, target: str, corpus: str, lengths=(32, 128, 512), new_tokens: int = 8,
                reps: int = 3, rank: int = 8) -> dict:
    """The bench JSON's `proxy` entry: per_token_s and tokens_per_s per system and length,
    per_token_ratio_512_32 of the cached proxy, cached vs target-alone tokens/s at 128, and
    the cached proxy's per-token time in one source pass a step / in two, at 128."""
    from peft import LoraConfig, get_peft_model

    from pipeline.assemble.proxy import LogitProxy, processors
    from pipeline.cache.models import load_model

    src, tgt, tgt_lora = load_model(source), load_model(target), load_model(target)
    cfg = dict(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora_src = get_peft_model(src.model, LoraConfig(**cfg)).eval()
    lora_tgt = get_peft_model(tgt_lora.model, LoraConfig(**cfg)).eval()
    pad = tgt.tokenizer.pad_token_id if tgt.tokenizer.pad_token_id is not None else tgt.tokenizer.eos_token_id
    runs = {"target": (tgt.model, None), "target_lora": (lora_tgt, None),
            "proxy_uncached": (tgt.model, LogitProxy(lora_src, src.tokenizer, tgt.tokenizer, cache=False)),
            "proxy_cached": (tgt.model, LogitProxy(lora_src, src.tokenizer, tgt.tokenizer, cache=True)),
            "proxy_cached_two_pass": (tgt.model, LogitProxy(lora_src, src.tokenizer, tgt.tokenizer, one_pass=False))}
    prompts = {n: _prompt_ids(tgt.tokenizer, corpus, n - new_tokens - 1) for n in lengths}
    per_token: dict[str, dict[int, list[float]]] = {s: {n: [] for n in lengths} for s in SYSTEMS}
    _decode_seconds(tgt.model, prompts[lengths[0]], 2, processors(None), pad)  # warm-up
    for r in range(reps):
        for n in lengths:
            for name, (model, proxy) in runs.items():
                one = _decode_seconds(model, prompts[n], 1, processors(proxy), pad)
                many = _decode_seconds(model, prompts[n], 1 + new_tokens, processors(proxy), pad)
                per_token[name][n].append(max(many - one, 1e-9) / new_tokens)
        log(f"(g) proxy round {r + 1}/{reps}: " + ", ".join(
            f"{s} {per_token[s][lengths[-1]][-1] * 1e3:.0f} ms/token at {lengths[-1]}" for s in SYSTEMS))
    med = {s: {str(n): median(v) for n, v in per_token[s].items()} for s in SYSTEMS}
    out = {"source": source, "target": target, "new_tokens": new_tokens, "reps": reps, "per_token_s": med,
           "tokens_per_s": {s: {n: 1 / v for n, v in d.items()} for s, d in med.items()}}
    first, last = str(lengths[0]), str(lengths[-1])
    out[f"per_token_ratio_{last}_{first}"] = med["proxy_cached"][last] / med["proxy_cached"][first]
    if "128" in med["target"]:
        out["cached_vs_target_tokens_per_s_128"] = med["target"]["128"] / med["proxy_cached"]["128"]
        out["one_pass_vs_two_pass_per_token_128"] = med["proxy_cached"]["128"] / med["proxy_cached_two_pass"]["128"]
    return out
