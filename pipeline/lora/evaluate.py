"""Exact-match evaluation by batched greedy decoding, with a bootstrap 95 % interval that
resamples items (a form task's country under every frame) where prompts share them.

`evaluate_model` takes any already-built model that has the Hugging Face `generate`
interface (a plain model, a PeftModel, or the bridged target model with its hooks),
so every row of the final report is scored by the same code.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.lora.batching import left_pad
from pipeline.lora.tasks import Example, Task, load_task, prompt_key
from storage.fs import as_path


@dataclass
class EvalConfig:
    """Score a model (optionally with a LoRA adapter) on a task's test split."""

    model: str
    """Model: registry name (smollm2-135m, gemma3-270m, tiny-llama, ...) or HF directory."""
    adapter: str | None = None
    """PEFT adapter directory to apply (checked against the model's weights hash)."""
    task: str | None = None
    """Built-in task name (add2, codebook, reverse, sentiment)."""
    task_file: str | None = None
    """Test data as JSONL {"prompt": ..., "answer": ...} (instead of --task)."""
    task_seed: int = 0
    """Seed of the built-in task's train/test split (the one the adapter was trained with)."""
    normalise: str = "strip"
    """Normalisation for --task-file answers: strip, lower, number or label."""
    limit: int | None = None
    """Score only the first N test examples (N >= 1; omit the flag to score all)."""
    batch_size: int = 16
    """Prompts decoded together (left-padded)."""
    max_new_tokens: int | None = None
    """Decoding budget; default: longest reference answer in tokens + 4."""
    n_boot: int = 1000
    """Bootstrap resamples for the 95-percent interval."""
    seed: int = 0
    """Seed of the bootstrap."""
    out: str | None = None
    """Write the result, with every prediction, to this JSON file."""
    device: str | None = None
    """torch device; default CUDA when present, else CPU."""
    threads: int | None = None
    """CPU threads for torch (default: torch's choice)."""
    allow_overlap: bool = False
    """Score even if test prompts occur in the adapter's training data."""

    def __post_init__(self):
        for name in ("limit", "batch_size", "max_new_tokens", "n_boot", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                hint = " (omit --limit to score every test example)" if name == "limit" else ""
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}{hint}")


@dataclass
class EvalResult:
    task: str
    """Task name."""
    n: int
    """Examples scored."""
    correct: int
    """Exact matches after normalisation."""
    exact_match: float
    """correct / n."""
    ci_low: float
    """Lower end of the bootstrap 95-percent interval of exact_match (resampling items: see resampled_means)."""
    ci_high: float
    """Upper end of the bootstrap 95-percent interval."""
    seconds: float = 0.0
    """Decoding wall time."""
    predictions: list[dict] = field(default_factory=list)
    """Per example: prompt, item (the unit the interval resamples), answer, prediction (cut at the
    first newline), raw output, correct."""
    meta: dict = field(default_factory=dict)
    """Model, adapter and task provenance."""

    def summary(self) -> str:
        return (f"{self.task}: exact match {self.exact_match:.3f} "
                f"[{self.ci_low:.3f}, {self.ci_high:.3f}] ({self.correct}/{self.n})")

    def to_json(self, path: str | Path) -> None:
        path = as_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1))


def group_index(groups: list[str] | None, n: int) -> np.ndarray:
    """(n,) index of each example's group, numbered in order of first appearance (None:
    every example its own group, which makes the grouped bootstrap the plain one exactly)."""
    if groups is None:
        return np.arange(n)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group ids for {n} examples")
    first: dict = {}
    return np.array([first.setdefault(g, len(first)) for g in groups], dtype=np.int64)


def resampled_means(values: list, groups: list[str] | None, n_boot: int, seed: int = 0) -> list[np.ndarray]:
    """Cluster bootstrap: (n_boot,) means of each array over whole groups drawn with replacement,
    the same draws for every array (paired across systems). Examples that share an item (one
    country under three frames) are one draw: resampling them apart would treat correlated
    answers as independent evidence and make the interval too narrow."""
    xs = [np.asarray(v, dtype=np.float64) for v in values]
    g = group_index(groups, len(xs[0]))
    n_groups = int(g.max()) + 1
    counts = np.bincount(g, minlength=n_groups).astype(np.float64)
    idx = np.random.default_rng(seed).integers(0, n_groups, size=(n_boot, n_groups))
    size = counts[idx].sum(1)  # examples in each resample: groups may differ in size
    return [np.bincount(g, weights=x, minlength=n_groups)[idx].sum(1) / size for x in xs]


def bootstrap_ci(correct: list[bool], n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                 groups: list[str] | None = None) -> tuple[float, float]:
    """Percentile bootstrap of the mean, resampling `groups` (default: each example alone)."""
    if len(correct) == 0:
        return (float("nan"), float("nan"))
    means = resampled_means([correct], groups, n_boot, seed)[0]
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def resampling_unit(examples: list[Example]) -> dict:
    """What the intervals resample, for reports: items when prompts share them, else examples."""
    items = len({e.unit for e in examples})
    unit = "item" if items < len(examples) else "example"
    return {"unit": unit, "count": items if unit == "item" else len(examples), "examples": len(examples)}


def extract_answer(raw: str, reference: str) -> str:
    # Base models keep talking after the answer; answers are one line unless the
    # reference itself spans lines.
    return raw if "\n" in reference.strip() else raw.lstrip("\n").split("\n", 1)[0]


def score_predictions(task: Task, examples: list[Example], raws: list[str], n_boot: int = 1000,
                      seed: int = 0) -> EvalResult:
    """Exact match of raw generations against the references, after the task's normalisation."""
    if len(examples) != len(raws):
        raise ValueError(f"{len(examples)} examples but {len(raws)} predictions")
    if not examples:
        raise ValueError(f"task {task.name}: no test examples to score")
    preds = []
    for ex, raw in zip(examples, raws):
        pred = extract_answer(raw, ex.answer)
        preds.append({"prompt": ex.prompt, "item": ex.unit, "answer": ex.answer, "prediction": pred, "raw": raw,
                      "correct": task.is_correct(pred, ex.answer)})
    ok = [p["correct"] for p in preds]
    lo, hi = bootstrap_ci(ok, n_boot, seed, groups=[e.unit for e in examples])
    return EvalResult(task.name, len(ok), sum(ok), sum(ok) / len(ok), lo, hi, predictions=preds)


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
                    progress: bool = False, desc: str = "decode", logits_processor=None) -> list[str]:
    """Greedy continuations of each prompt (special tokens dropped), in input order.
    logits_processor: a transformers LogitsProcessor applied at every step (the logit proxy)."""
    from transformers import LogitsProcessorList

    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                           eos_token_id=eos, bos_token_id=tokenizer.bos_token_id)
    enc = [tokenizer(p, add_special_tokens=True).input_ids for p in prompts]
    # Similar lengths together: less padding; results are put back in input order.
    order = sorted(range(len(prompts)), key=lambda i: len(enc[i]))
    out: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, file=sys.stderr):
            idx = order[s:s + batch_size]
            ids, mask, _ = left_pad([enc[i] for i in idx], pad)  # generate() derives the positions from the mask
            W = ids.shape[1]
            extra = ({"logits_processor": logits_processor if isinstance(logits_processor, LogitsProcessorList)
                      else LogitsProcessorList([logits_processor])} if logits_processor else {})
            gen_ids = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=gen, **extra)
            for r, i in enumerate(idx):
                out[i] = tokenizer.decode(gen_ids[r, W:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return out


def evaluate_model(model, tokenizer, task: Task, *, limit: int | None = None, batch_size: int = 16,
                   max_new_tokens: int | None = None, n_boot: int = 1000, seed: int = 0,
                   progress: bool = True, logits_processor=None) -> EvalResult:
    """Greedy-decode the task's test split with an already-built model and score it."""
    examples = task.test[:limit] if limit else list(task.test)
    if not examples:
        raise ValueError(f"task {task.name}: no test examples (a --task-file for evaluation "
                         f"must hold the test split)")
    if max_new_tokens is None:
        longest = max(len(tokenizer(task.continuation(e), add_special_tokens=False).input_ids) for e in examples)
        max_new_tokens = longest + 4
    t0 = time.perf_counter()
    raws = generate_greedy(model, tokenizer, [e.prompt for e in examples], max_new_tokens, batch_size,
                           progress, desc=f"eval {task.name}", logits_processor=logits_processor)
    res = score_predictions(task, examples, raws, n_boot, seed)
    res.seconds = time.perf_counter() - t0
    res.meta = {"task": {"name": task.name, "normalise": task.normalise, **task.source},
                "max_new_tokens": max_new_tokens, "n_boot": n_boot, "seed": seed,
                "resampled": resampling_unit(examples)}
    return res


def trained_on(examples: list[Example], adapter_meta: dict | None) -> list[str]:
    """The prompts among `examples` whose digests the adapter recorded as training data."""
    keys = set((adapter_meta or {}).get("train_prompt_keys", ()))
    return [e.prompt for e in examples if prompt_key(e.prompt) in keys]


def check_overlap(task: Task, examples: list[Example], adapter_meta: dict | None, adapter: str) -> None:
    seen = trained_on(examples, adapter_meta)
    if seen:
        raise ValueError(f"{len(seen)} of {len(examples)} test prompts of {task.name} were in the "
                         f"training data of --adapter {adapter} (e.g. {seen[0]!r}); evaluate on "
                         f"held-out prompts (same --task-seed as training), or pass --allow-overlap")


def run_evaluate(cfg: EvalConfig, progress: bool = True) -> EvalResult:
    """What `cast evaluate` does: load, optionally apply the adapter, score, write JSON."""
    from pipeline.lora.adapters import check_adapter_base, load_adapter
    from pipeline.cache.models import load_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = load_task(cfg.task, cfg.task_file, split="test", seed=cfg.task_seed, normalise=cfg.normalise)
    lm = load_model(cfg.model, device=cfg.device)
    model = lm.model
    adapter_meta = None
    if cfg.adapter:
        adapter_meta = check_adapter_base(cfg.adapter, lm.info)
        if not cfg.allow_overlap:
            check_overlap(task, task.test[:cfg.limit] if cfg.limit else task.test, adapter_meta, cfg.adapter)
        model = load_adapter(model, cfg.adapter)
    res = evaluate_model(model, lm.tokenizer, task, limit=cfg.limit, batch_size=cfg.batch_size,
                         max_new_tokens=cfg.max_new_tokens, n_boot=cfg.n_boot, seed=cfg.seed,
                         progress=progress)
    res.meta |= {"model": asdict(lm.info), "adapter": str(as_path(cfg.adapter).resolve()) if cfg.adapter else None,
                 "adapter_recipe": (adapter_meta or {}).get("recipe")}
    if cfg.out:
        res.to_json(cfg.out)
    return res
