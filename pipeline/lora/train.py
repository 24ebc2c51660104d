"""Standard PEFT LoRA training on either model, written as a plain PEFT adapter directory.

The directory holds exactly what `peft.PeftModel.from_pretrained(base, DIR)` reads
(adapter_config.json + adapter_model.safetensors), plus:
    cast_lora.json   the base model's identity, the task and the recipe (see adapters.py)
    loss.json/.png   the training loss curve
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline.cache.models import LoadedModel, load_model
from pipeline.lora.adapters import CAST_FILE, LoraError, parse_targets
from pipeline.lora.batching import continuation_rows, left_pad
from pipeline.lora.precision import PRECISIONS, frozen_base_in, resolve_precision
from pipeline.lora.tasks import Example, Task, load_task, prompt_key
from storage.files import atomic_path
from storage.fs import as_path


@dataclass
class LoraTrainConfig:
    """Train a LoRA adapter on a task (plain PEFT, loss on answer tokens only)."""

    model: str
    """Base model: registry name (smollm2-135m, gemma3-270m, tiny-llama, ...) or HF directory."""
    out: str
    """Adapter directory to write (must be empty or absent unless --force)."""
    task: str | None = None
    """Built-in task name (add2, codebook, reverse, sentiment)."""
    task_file: str | None = None
    """Training data as JSONL {"prompt": ..., "answer": ...} (instead of --task)."""
    task_seed: int = 0
    """Seed of the built-in task's train/test split (use the same one to evaluate)."""
    targets: str = "q_proj,v_proj"
    """Comma-separated linear modules to adapt, or 'all' for q,k,v,o,gate,up,down."""
    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / rank."""
    dropout: float = 0.0
    """LoRA dropout on the adapted modules' inputs."""
    steps: int = 150
    """Optimiser steps."""
    batch_size: int = 16
    """Examples per step."""
    lr: float = 2e-3
    """Peak learning rate (AdamW; linear warmup over the first 5 percent of steps, then linear decay to a tenth)."""
    seed: int = 0
    """Seed of the LoRA initialisation and of the order examples are drawn in."""
    precision: str = "float32"
    """Number format of the frozen base while the LoRA trains (the LoRA, its gradients and the optimiser stay
    float32; the saved adapter is float32): float32, bfloat16, or auto (bfloat16 on CUDA or a CPU with bfloat16
    matrix units). float32 by default: SmolLM2-135M's add2 LoRA took as long in bfloat16 on a 2-core CPU with
    AMX (91.9 s against 88.7 s), and the recorded recipe (the retrained reference reuses it) stays comparable."""
    device: str | None = None
    """torch device; default CUDA when present, else CPU."""
    threads: int | None = None
    """CPU threads for torch (default: torch's choice); 1 is kind to a shared machine."""
    force: bool = False
    """Replace a non-empty --out directory."""

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}")
        for name in ("rank", "steps", "batch_size", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


@dataclass
class LoraTrainResult:
    out: str
    """The adapter directory written."""
    final_loss: float
    """Mean loss over the last tenth of the steps."""
    seconds: float
    """Training wall time (model loading and saving excluded)."""
    trainable_params: int
    """Parameters the LoRA trains."""
    losses: list[float]
    """Loss at every step."""
    model: object | None = None
    """The in-memory PeftModel when train_lora(keep=True); None otherwise."""


def _check_targets(model: torch.nn.Module, targets: list[str], model_name: str) -> None:
    linears = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in targets if t not in linears]
    if missing:
        raise LoraError(f"--targets: {', '.join(missing)} not found in {model_name}; its linear "
                        f"modules are {', '.join(sorted(linears))}")


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LoraError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LoraError(f"--out {out}: directory is not empty; choose another path or pass --force "
                        f"to replace it")


def encode_pairs(tokenizer, task: Task, examples: list[Example]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, continuation ids + eos) per example. The prompt is tokenized alone,
    with the tokenizer's specials (Gemma's <bos>), exactly as evaluation feeds it."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LoraError("the tokenizer has no eos token: the model could not learn to stop")
    out = []
    for ex in examples:
        p = tokenizer(ex.prompt, add_special_tokens=True).input_ids
        c = tokenizer(task.continuation(ex), add_special_tokens=False).input_ids
        out.append((p, c + [eos]))
    return out


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor | int]:
    """Prompts left-padded, continuations right-padded: every continuation starts in the
    same column, so only the logits from there on are computed (Gemma's 262k-row LM head
    would otherwise dominate the step)."""
    p_ids, p_mask, p_pos = left_pad([p for p, _ in pairs], pad_id)
    P, C = p_ids.shape[1], max(len(c) for _, c in pairs)
    c_ids = torch.full((len(pairs), C), pad_id, dtype=torch.long)
    c_mask = torch.zeros((len(pairs), C), dtype=torch.long)
    for i, (_, c) in enumerate(pairs):
        c_ids[i, :len(c)], c_mask[i, :len(c)] = torch.tensor(c), 1
    # A continuation's positions go on from its own prompt's last one, as generate() counts them.
    c_pos = p_pos[:, -1:] + 1 + torch.arange(C)
    return {"input_ids": torch.cat([p_ids, c_ids], 1), "attention_mask": torch.cat([p_mask, c_mask], 1),
            "position_ids": torch.cat([p_pos, c_pos], 1), "target": torch.cat([torch.zeros_like(p_mask, dtype=torch.bool),
                                                                             c_mask.bool()], 1),
            "prompt_width": P}


def causal_lm_logits(model: torch.nn.Module, select: torch.Tensor | tuple | None = None, **inputs) -> torch.Tensor:
    """Float32 next-token logits at the `select`ed (batch, column) positions only, in
    row-major order (all positions when None), as (positions, vocab); `select` is a boolean
    (batch, width) mask, or a (rows, columns) pair of index tensors that may repeat a position.

    The LM head runs on those rows alone, as one 2-D matmul: for Gemma's 262k-row head,
    the batched (3-D) head over every column was 2/3 of a training step. Works through
    PEFT wrappers and forward hooks (both live inside the decoder)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings()
    if decoder is None or head is None:  # not a standard *ForCausalLM: let it compute the logits
        logits = model(**inputs, use_cache=False).logits
        return (logits.flatten(0, 1) if select is None else logits[select]).float()
    hidden = decoder(**inputs, use_cache=False).last_hidden_state
    logits = head(hidden.flatten(0, 1) if select is None else hidden[select])
    cap = getattr(base.config, "final_logit_softcapping", None)
    if cap:  # what Gemma-2-style heads do after the matmul
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def answer_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over continuation tokens (answer + eos) only."""
    select = continuation_rows(batch["target"], batch["prompt_width"])
    logits = causal_lm_logits(model, select, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              position_ids=batch["position_ids"])
    return torch.nn.functional.cross_entropy(logits, batch["input_ids"][batch["target"]])


def _schedule(steps: int):
    warm = max(1, steps // 20)
    return lambda s: (s + 1) / warm if s < warm else max(0.1, 1 - 0.9 * (s - warm) / max(1, steps - warm))


def save_loss_curve(out: Path, losses: list[float]) -> None:
    (out / "loss.json").write_text(json.dumps({"step": list(range(1, len(losses) + 1)), "loss": losses}))
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    k = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, alpha=0.35, label="loss")
    ax.plot(range(1, len(losses) + 1), smooth, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("answer-token cross-entropy")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)  # out: the staged local directory
    plt.close(fig)


def train_lora(cfg: LoraTrainConfig, task: Task | None = None, loaded: LoadedModel | None = None,
               progress: bool = True, keep: bool = False) -> LoraTrainResult:
    """Train and write the adapter directory. `task`/`loaded` skip loading when the
    caller already has them (benchmarks, tests); the base weights are never modified.
    keep=True returns the trained PeftModel in result.model (wrapping loaded.model)
    instead of stripping the LoRA layers out of the caller's model again."""
    from peft import LoraConfig, get_peft_model

    out = as_path(cfg.out)
    _check_out(out, cfg.force)
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.rank < 1:
        raise LoraError("--steps, --batch-size and --rank must be at least 1")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    targets = parse_targets(cfg.targets)
    if task is None:
        task = load_task(cfg.task, cfg.task_file, split="train", seed=cfg.task_seed)
    if not task.train:
        raise LoraError(f"task {task.name} has no training examples")
    lm = loaded or load_model(cfg.model, device=cfg.device)
    _check_targets(lm.model, targets, lm.info.name)

    torch.manual_seed(cfg.seed)
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(lm.model, lcfg)
    try:
        res = _train_and_save(cfg, task, lm, model, targets, out, progress)
    except BaseException:
        model.unload().eval()
        raise
    if keep:
        res.model = model
    else:  # leave the caller's model as it was: strip the LoRA layers back out
        model.unload().eval()
    return res


def _train_and_save(cfg, task, lm, model, targets, out, progress) -> LoraTrainResult:
    from tqdm.auto import tqdm

    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pairs = encode_pairs(lm.tokenizer, task, task.train)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg.steps))
    rng = random.Random(cfg.seed)
    order: list[int] = []
    losses: list[float] = []

    model.train()
    fmt = resolve_precision(cfg.precision, lm.device)
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"lora {task.name} on {lm.info.name}", disable=not progress,
               file=sys.stderr)
    try:
        with frozen_base_in(model, fmt):
            for _ in bar:
                if len(order) < cfg.batch_size:  # reshuffled epochs: every example seen once per pass
                    more = list(range(len(pairs)))
                    rng.shuffle(more)
                    order += more
                idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
                batch = collate([pairs[i] for i in idx], pad)
                batch = {k: v.to(lm.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                loss = answer_loss(model, batch)
                if not math.isfinite(loss.item()):
                    raise LoraError(f"loss became {loss.item()} at step {len(losses) + 1}; lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
                opt.step()
                sched.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    final = sum(tail) / len(tail)

    meta = {
        "cast_lora_version": 1,
        "base": asdict(lm.info),
        "task": {"name": task.name, "normalise": task.normalise, "joiner": task.joiner, **task.source},
        "recipe": {k: getattr(cfg, k) for k in ("rank", "alpha", "dropout", "steps", "batch_size", "lr", "seed")}
        | {"targets": targets, "precision": fmt},
        "result": {"final_loss": final, "first_loss": losses[0], "train_seconds": round(seconds, 2),
                   "trainable_params": n_train},
        # Digests, not data: evaluation uses them to refuse test prompts seen in training.
        "train_prompt_keys": sorted({prompt_key(e.prompt) for e in task.train}),
    }
    with atomic_path(out) as staged:
        model.save_pretrained(staged, safe_serialization=True)
        save_loss_curve(staged, losses)
        (staged / CAST_FILE).write_text(json.dumps(meta, indent=1))
        _check_out(out, cfg.force)  # nobody filled it while we trained
    return LoraTrainResult(str(out), final, seconds, n_train, losses)


