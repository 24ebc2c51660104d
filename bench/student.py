"""(s) One `cast distill` training step (forward, loss, backward) with a prompt's samples
packed into one row (pipeline/assemble/packing.py) against one row per sample.

The text is what `cast distill --data uniform` starts from (random corpus prefixes, cut
to the same 200 characters), with 4 continuations per prefix sampled from the target
itself at temperature 1 and capped at --student-continuation tokens (the zero-data
teacher's continuations average about 1.5 tokens: one word, then eos). Both ways see the
same samples, 16 per step (packed: 4 prompts with their 4 samples each, as `cast distill
--pack --batch-size 16`, the fast recipe, draws them); steps are interleaved, medians reported.
"""
from __future__ import annotations

import time

import torch

from bench.timing import log, median


def bench_student(target: str, corpus: str, reps: int = 3, prompts: int = 16, samples: int = 4,
                  continuation: int = 2, batch_size: int = 16) -> dict:
    """The bench JSON's `student` entry: seconds and tokens per step, packed and one row per sample."""
    from peft import LoraConfig, get_peft_model

    from pipeline.assemble.packing import for_model, packed_batch, prompt_groups
    from pipeline.assemble.student import corpus_texts
    from pipeline.assemble.teacher import batch_of, sample_teacher, sparse_kl, uniform_prefixes
    from pipeline.cache.models import load_model
    from pipeline.lora.train import causal_lm_logits

    lm = load_model(target)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    starts = uniform_prefixes(corpus_texts(corpus, 600), prompts, 0)
    xs = sample_teacher(lm.model, lm.tokenizer, None, starts, samples, continuation, progress=False)
    student = get_peft_model(lm.model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False)).eval()
    groups = prompt_groups(xs)
    per_step = max(1, batch_size // samples)
    steps = min(len(xs) // batch_size, len(groups) // per_step)
    if steps < 1:
        raise ValueError(f"(s): --corpus {corpus} gives {len(groups)} prefixes, too few for one step of {batch_size}")

    def unpacked(i: int) -> tuple[int, torch.Tensor]:
        ids, select, target = batch_of(xs[i * batch_size:(i + 1) * batch_size], pad)
        return ids.numel(), sparse_kl(causal_lm_logits(student, select, input_ids=ids), *target)

    def packed(i: int) -> tuple[int, torch.Tensor]:
        inputs, select, target = packed_batch([[xs[j] for j in g] for g in groups[i * per_step:(i + 1) * per_step]],
                                              pad)
        return inputs["input_ids"].numel(), sparse_kl(causal_lm_logits(student, select, **for_model(inputs, student)),
                                                      *target)

    ways = {"one_row_per_sample": unpacked, "packed": packed}
    seconds: dict[str, list[float]] = {w: [] for w in ways}
    tokens: dict[str, int] = {}
    with torch.enable_grad():
        unpacked(0)[1].backward()  # warm-up
        for rep in range(reps):
            for way, step in (ways.items() if rep % 2 == 0 else reversed(ways.items())):
                t0, n = time.perf_counter(), 0
                for i in range(steps):
                    k, loss = step(i)
                    loss.backward()
                    n += k
                student.zero_grad(set_to_none=True)
                seconds[way].append((time.perf_counter() - t0) / steps)
                tokens[way] = n // steps
                log(f"(s) rep {rep + 1}/{reps} {way}: {seconds[way][-1]:.3f} s/step, {tokens[way]} tokens/step")
    med = {w: median(v) for w, v in seconds.items()}
    return {"target": target, "samples": len(xs), "prompts": len(groups), "batch_size": batch_size,
            "steps_per_rep": steps, "reps": reps,
            "mean_continuation": sum(len(x.ids) - x.start for x in xs) / len(xs),
            "mean_prompt": sum(x.start for x in xs) / len(xs),
            "seconds_per_step": med, "tokens_per_step": tokens,
            "packed_vs_one_row_per_sample": med["packed"] / med["one_row_per_sample"]}
