"""(h) The LM head's two kernels side by side: torch's F.linear (x·Wᵀ) against the
columns-first product (W·xᵀ) that `load_model` gives a float32 CPU head
(pipeline/cache/head.py).

Two measures on the same model: the head's matmul alone at a few row counts (forward, and
forward + backward as a distillation step takes it), and greedy decoding of corpus
prompts by `generate` (what `cast validate` and the teacher's sampling do), whose tokens
must come out the same both ways. Methods are interleaved, medians reported.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from bench.timing import log, median


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_head(target: str, corpus: str, reps: int = 3, rows: tuple[int, ...] = (1, 8, 16, 64),
               prompts: int = 16, new_tokens: int = 16) -> dict:
    """The bench JSON's `head` entry: seconds of each kernel per row count, and of a decode."""
    from pipeline.assemble.student import corpus_texts
    from pipeline.cache.head import ColumnsFirstLinear, head_matmul
    from pipeline.cache.models import load_model

    lm = load_model(target)
    head = lm.model.get_output_embeddings()
    if not isinstance(head, ColumnsFirstLinear):
        raise ValueError(f"(h): {target}'s output layer is not a float32 CPU nn.Linear; nothing to compare")
    weight = head.weight.detach()
    kernels = {"linear": lambda x: F.linear(x, weight), "columns_first": lambda x: head_matmul(x, weight)}
    matmul: dict[str, dict[int, float]] = {f"{k}_{p}": {} for k in kernels for p in ("forward", "forward_backward")}
    gen = torch.Generator().manual_seed(0)
    for n in rows:
        x = torch.randn(n, weight.shape[1], generator=gen)
        g = torch.randn(n, weight.shape[0], generator=gen)
        for name, k in kernels.items():  # warm-up, then both kernels, one rep each in turn
            k(x)
        times = {f"{name}_{p}": [] for name in kernels for p in ("forward", "forward_backward")}
        for rep in range(reps):
            for name, k in (kernels.items() if rep % 2 == 0 else reversed(kernels.items())):
                times[f"{name}_forward"].append(_seconds(lambda: k(x)))
                xg = x.clone().requires_grad_(True)
                with torch.enable_grad():  # `cast bench` runs with grad off
                    times[f"{name}_forward_backward"].append(_seconds(lambda: k(xg).backward(g)))
        for key, ts in times.items():
            matmul[key][n] = median(ts)
        log(f"(h) {n} rows: F.linear {matmul['linear_forward'][n] * 1e3:.1f} ms, columns-first "
            f"{matmul['columns_first_forward'][n] * 1e3:.1f} ms (forward)")

    tok = lm.tokenizer
    tok.padding_side = "left"
    texts = [t[:120] for t in corpus_texts(corpus, prompts)]
    enc = tok(texts, return_tensors="pt", padding=True)
    eos = tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id

    def decode(cls) -> tuple[float, torch.Tensor]:
        head.__class__ = cls
        try:
            t0 = time.perf_counter()
            out = lm.model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=eos)
            return time.perf_counter() - t0, out
        finally:
            head.__class__ = ColumnsFirstLinear

    ways = {"linear": torch.nn.Linear, "columns_first": ColumnsFirstLinear}
    decode(ColumnsFirstLinear)  # warm-up
    seconds: dict[str, list[float]] = {w: [] for w in ways}
    tokens: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for rep in range(reps):
            for way, cls in (ways.items() if rep % 2 == 0 else reversed(ways.items())):
                dt, tokens[way] = decode(cls)
                seconds[way].append(dt)
                log(f"(h) rep {rep + 1}/{reps} decode with {way}: {dt:.2f} s")
    med = {w: median(v) for w, v in seconds.items()}
    return {"target": target, "vocab": weight.shape[0], "hidden": weight.shape[1], "reps": reps,
            "matmul_s": {k: {str(n): v for n, v in d.items()} for k, d in matmul.items()},
            "decode": {"prompts": len(texts), "new_tokens": new_tokens, "seconds": med,
                       "same_tokens": bool(torch.equal(tokens["linear"], tokens["columns_first"]))},
            "decode_columns_first_vs_linear": med["columns_first"] / med["linear"]}
