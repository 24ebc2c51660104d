"""One system's scores in `cast validate`: exact match (decoded), answer log-likelihood and
off-task damage (teacher-forced; pipeline/lora/likelihood.py). docs/design.md#tasks-and-validation
says why both kinds: exact match is all-or-nothing, so a partial transfer shows only in the LL."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.assemble.distill import DistillConfig, corpus_sequences
from pipeline.lora.evaluate import EvalResult, evaluate_model
from pipeline.lora.likelihood import answer_logprobs, offtask
from pipeline.lora.tasks import Task
from storage.files import sha256_bytes

OFFTASK_LEN = 64
OFFTASK_STRIDE = 8
"""Every system's off-task measure scores every 8th position, the same positions for all: the logit
proxy runs the source once per scored position, and KLs are only comparable on one set of positions."""


@dataclass
class SystemScore:
    em: EvalResult | None
    """Greedy exact match (None with --no-decode)."""
    ll: np.ndarray
    """Per test example: log p(reference answer + eos | prompt)."""
    offtask: dict | None
    """Perplexity and KL to the system's base model on held-out generic text (None: not measured)."""

    def summary(self) -> str:
        parts = [self.em.summary()] if self.em else []
        parts.append(f"answer LL {self.ll.mean():.3f}")
        if self.offtask:
            parts.append(f"off-task ppl {self.offtask['perplexity']:.2f} KL {self.offtask['kl_to_base']:.4f}")
        return " | ".join(parts)

    def as_json(self) -> dict:
        em = ({"exact_match": self.em.exact_match, "ci_low": self.em.ci_low, "ci_high": self.em.ci_high,
               "correct": self.em.correct, "n": self.em.n} if self.em else {"n": len(self.ll)})
        return {**em, "answer_ll": float(self.ll.mean()), "offtask": self.offtask}


def heldout_ids(cfg, tokenizer, stores: list[dict]) -> torch.Tensor | None:
    """cfg.offtask_sequences generic sequences from the corpus's end, in `tokenizer`'s ids
    (segments the stores read are never among them)."""
    if not cfg.offtask_sequences:
        return None
    dcfg = DistillConfig(corpus=cfg.corpus, seq_len=OFFTASK_LEN,
                         eval_sequences=cfg.offtask_sequences)
    return corpus_sequences(dcfg, tokenizer, stores, n_train=0)[1]


BASE_LOGITS: dict[tuple, dict] = {}
"""(base identity, held-out ids, batch size) -> offtask()'s base_cache: the base's logits on
the off-task text, computed once for every system measured against it and, in `cast run`,
for every task (the same base and text). One entry per side is kept."""


def base_cache(identity: str, held: torch.Tensor, batch_size: int) -> dict:
    key = (identity, held.shape, sha256_bytes(held.numpy().tobytes()), batch_size, OFFTASK_STRIDE)
    if key not in BASE_LOGITS:
        while len(BASE_LOGITS) >= 2:  # the source's and the target's
            BASE_LOGITS.pop(next(iter(BASE_LOGITS)))
        BASE_LOGITS[key] = {}
    return BASE_LOGITS[key]


def score_system(model, tokenizer, task: Task, base_model, held: torch.Tensor | None, cfg,
                 progress: bool = True, proxy=None, base_identity: str | None = None,
                 ll_cache: dict | None = None) -> SystemScore:
    """Every measure of one system on the first cfg.limit test examples; with `proxy`
    (pipeline/assemble/proxy.LogitProxy) the system is `model` decoding through it.
    base_identity: what identifies base_model's weights (its weights hash), so its off-task
    logits are reused (see BASE_LOGITS); None computes them afresh. ll_cache: `model`'s logits
    on the answers, per batch (answer_logprobs' logits_cache), for a later system on the same model."""
    em = (evaluate_model(model, tokenizer, task, limit=cfg.limit, batch_size=cfg.batch_size, n_boot=cfg.n_boot,
                         progress=progress, logits_processor=proxy) if cfg.decode else None)
    shift = proxy.shift if proxy else None
    ll = answer_logprobs(model, tokenizer, task, task.test[:cfg.limit], cfg.batch_size, shift=shift,
                         logits_cache=ll_cache)
    off = None
    if held is not None and (model is not base_model or proxy):
        cache = base_cache(base_identity, held, cfg.batch_size) if base_identity else None
        off = offtask(model, base_model, held, cfg.batch_size, shift=shift, tokenizer=tokenizer,
                      stride=OFFTASK_STRIDE, base_cache=cache)
    return SystemScore(em, ll, off)
