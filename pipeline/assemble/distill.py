"""Distil a LoRA on the target from any teacher's next-token distributions, on generic text.

    student  a PEFT LoRA on the target (base frozen); only its trainable parameters move
    teacher  any callable (input_ids, select) -> float logits at the selected positions
    loss     any callable (student_logits, teacher_logits) -> scalar; default KL(teacher || student)

Teacher and student share the target's tokenizer, so their distributions compare token
for token. The text is segments of a corpus that the activation stores never read (the
heads were fitted on those), cut to `seq_len` tokens; the held-out sequences come from the
corpus's end, the training ones from just after the stores' text.

Kind to a CPU: short sequences, the LM head only at `positions` drawn per sequence (the
262k-row head of Gemma-3 costs more than its whole body), torch threads from a flag.
Resumable: every `checkpoint_every` steps the LoRA, the optimiser state and the losses go
to a checkpoint directory (safetensors + JSON, state.json written last as the commit
point); a rerun with the same settings continues there, and the data and positions of a
step depend only on (seed, step), so a resumed run ends where an uninterrupted one would.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from pipeline.cache.corpus import CorpusError, load_corpus, segment
from pipeline.lora.train import causal_lm_logits
from storage.files import atomic_path, atomic_write_text, sha256_bytes

Teacher = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
STATE = "state.json"


@dataclass
class DistillConfig:
    """Distilling a target LoRA from a teacher's next-token distributions on generic text."""

    corpus: str = "nlp-corpus"
    """Generic text: the built-in corpus or a file, directory or glob (segments the stores read are skipped)."""
    seq_len: int = 64
    """Tokens per training and held-out sequence (shorter segments are passed over)."""
    steps: int = 200
    """Distillation steps."""
    batch_size: int = 8
    """Sequences per step and per held-out forward pass."""
    positions: int = 16
    """Positions per sequence whose next-token distributions enter the loss (0: all); fewer is less LM-head work."""
    lr: float = 1e-4
    """Peak learning rate (AdamW; linear warmup over the first 5 percent of steps, then linear decay to a tenth).
    Low, for a student started near its teacher (cast export's fold): 1e-3 made it worse there."""
    eval_sequences: int = 32
    """Held-out sequences (from the corpus's end) on which agreement is measured; 0: none."""
    checkpoint_every: int = 25
    """Steps between checkpoints; a rerun with the same settings resumes from the last one."""
    threads: int | None = None
    """CPU threads for torch (default: torch's choice); 1 or 2 is kind to a shared machine."""
    seed: int = 0
    """Seed of the data order and of the positions drawn."""


def model_logits(model: torch.nn.Module) -> Teacher:
    """A causal LM (with hooks, a PEFT wrapper, or neither) as a teacher."""
    return lambda ids, select: causal_lm_logits(model, select, input_ids=ids)


def kl_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student)."""
    return torch.nn.functional.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                                      reduction="batchmean")


def prefix_read(identity: dict, tokenizer, segments) -> int:
    """How many leading segments a store read. Extraction takes whole segments in corpus
    order until its token cap (pipeline/cache/extract.make_plan), so replaying the token
    count with the store's own tokenizer finds where it stopped."""
    total = 0
    for i, seg in enumerate(segments):
        total += len(tokenizer(seg.text).input_ids)
        if total >= identity["n_tokens"]:
            return i + 1
    return len(segments)


def corpus_sequences(cfg: DistillConfig, tokenizer, stores: list[dict], n_train: int):
    """(train ids, held-out ids, where they came from): (n, seq_len) token tensors from
    segments none of `stores` (store identities, as artifacts record them) read."""
    from pipeline.cache.models import load_tokenizer

    corpus = load_corpus(cfg.corpus)
    same = [s for s in stores if s.get("corpus_hash") == corpus.hash]
    segments = segment(corpus, same[0]["max_chars"] if same else 512)
    skip = max([prefix_read(s, load_tokenizer(s["model"]), segments) for s in same] or [0])

    def take(order, n: int) -> list[tuple[int, list[int]]]:
        found = []
        for i in order:
            if len(found) >= n:
                break
            ids = tokenizer(segments[i].text).input_ids
            if len(ids) >= cfg.seq_len:
                found.append((i, ids[:cfg.seq_len]))
        return found

    held = take(range(len(segments) - 1, skip - 1, -1), cfg.eval_sequences)
    train = take(range(skip, min([i for i, _ in held], default=len(segments))), n_train)
    if (n_train and not train) or (cfg.eval_sequences and not held):
        raise CorpusError(f"--corpus {cfg.corpus}: no segment of {cfg.seq_len}+ tokens beyond the {skip} segments "
                          f"the stores read; pass a larger --corpus or a smaller --seq-len")

    def ids(rows):
        return torch.tensor([r for _, r in rows], dtype=torch.long).reshape(len(rows), cfg.seq_len)

    info = {"corpus": cfg.corpus, "corpus_hash": corpus.hash, "store_segments_skipped": skip,
            "train": {"sequences": len(train), "segments": [train[0][0], train[-1][0]] if train else []},
            "heldout": {"sequences": len(held), "segments": [held[-1][0], held[0][0]] if held else []}}
    return ids(train), ids(held), info


@torch.no_grad()
def agreement(systems: dict[str, Teacher], pairs: list[tuple[str, str]], ids: torch.Tensor,
              batch_size: int) -> dict:
    """Per (reference, other) pair, over every position of `ids`: mean KL(reference || other),
    top-1 agreement, max and mean |logit difference|. Each system runs once per batch."""
    acc = {p: [0.0, 0, 0.0, 0.0] for p in pairs}
    n, vocab = 0, 1
    for start in range(0, len(ids), batch_size):
        batch = ids[start:start + batch_size]
        logits = {name: systems[name](batch, None) for name in dict.fromkeys(x for p in pairs for x in p)}
        for (a, b), s in acc.items():
            la, lb = logits[a], logits[b]
            s[0] += kl_loss(lb, la).item() * len(la)
            s[1] += (la.argmax(-1) == lb.argmax(-1)).sum().item()
            s[2] = max(s[2], (la - lb).abs().max().item())
            s[3] += (la - lb).abs().sum().item()
        n, vocab = n + len(la), la.shape[-1]
    return {f"{a} vs {b}": {"kl": s[0] / n, "top1_agreement": s[1] / n, "max_abs_logit_diff": s[2],
                            "mean_abs_logit_diff": s[3] / (n * vocab), "tokens": n}
            for (a, b), s in acc.items()}


def _draw(ids: torch.Tensor, step: int, cfg: DistillConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step`'s sequences (reshuffled epochs) and the positions its loss reads."""
    n, width = ids.shape
    rows = []
    for p in range(step * cfg.batch_size, (step + 1) * cfg.batch_size):
        epoch, i = divmod(p, n)
        rows.append(torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))[i])
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    select = torch.ones(len(rows), width, dtype=torch.bool)
    if 0 < cfg.positions < width:
        select.zero_().scatter_(1, torch.rand(len(rows), width, generator=g).argsort(1)[:, :cfg.positions], True)
    return ids[torch.stack(rows)], select


def _to(x, device):
    """Tensors, or dicts (a mask per layer type) or tuples (an index pair) of them, on `device`."""
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return tuple(_to(v, device) for v in x) if isinstance(x, tuple) else x.to(device)


def _lr(step: int, cfg: DistillConfig) -> float:
    warm = max(1, cfg.steps // 20)
    return cfg.lr * ((step + 1) / warm if step < warm else max(0.1, 1 - 0.9 * (step - warm) / max(1, cfg.steps - warm)))


def _save(ckpt: Path, key: str, params: dict, opt, step: int, losses: list[float]) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    moments = {f"{name}::{k}": v for name, p in params.items() for k, v in opt.state.get(p, {}).items()}
    for stem, tensors in (("lora", params), ("optim", moments)):
        with atomic_path(ckpt / f"{stem}-{step}.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    old = json.loads((ckpt / STATE).read_text())["step"] if (ckpt / STATE).exists() else None
    atomic_write_text(ckpt / STATE, json.dumps({"key": key, "step": step, "losses": losses}))
    for stem in ("lora", "optim"):  # the previous checkpoint, now superseded
        (ckpt / f"{stem}-{old}.safetensors").unlink(missing_ok=True)


def _resume(ckpt: Path, key: str, params: dict, opt) -> tuple[int, list[float]]:
    if not (ckpt / STATE).exists():
        return 0, []
    state = json.loads((ckpt / STATE).read_text())
    if state["key"] != key:
        print(f"[cast] {ckpt}: a checkpoint made with other settings; starting over", file=sys.stderr)
        shutil.rmtree(ckpt)
        return 0, []
    step = state["step"]
    lora, moments = (load_file(str(ckpt / f"{stem}-{step}.safetensors")) for stem in ("lora", "optim"))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(lora[name])
            opt.state[p] = {k.split("::")[1]: v.to(p.device) for k, v in moments.items() if k.split("::")[0] == name}
    print(f"[cast] resuming the distillation at step {step} from {ckpt}", file=sys.stderr)
    return step, state["losses"]


def distill(student: torch.nn.Module, teacher: Teacher | None, ids: torch.Tensor | None, cfg: DistillConfig,
            ckpt: Path, key: str = "", loss_fn=kl_loss, progress: bool = True, on_step=None, draw=None) -> dict:
    """Train the student's trainable parameters to match the teacher on `ids`
    (sequences, seq_len). `key` names what is distilled (teacher, student's start, text):
    a checkpoint in `ckpt` made for another key or other settings is discarded, never
    resumed. on_step(step, loss) is called after every step. draw(step) -> (ids, select,
    target), when given, replaces drawing from `ids` and calling `teacher`: for teachers
    precomputed on their own text (pipeline/assemble/student.py); it too must depend on the
    step alone, so a resumed run ends where an uninterrupted one would. Its ids may be a dict
    of model inputs and its select a (rows, columns) index pair (packed rows, packing.py)."""
    from tqdm.auto import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    params = {n: p for n, p in student.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=0.0)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("threads", "checkpoint_every")}
    key = sha256_bytes(key, json.dumps(settings, sort_keys=True))
    start, losses = _resume(Path(ckpt), key, params, opt)
    device = next(iter(params.values())).device
    student.eval()  # no dropout anywhere: the student matches the teacher's inference distributions
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="distil", disable=not progress,
               file=sys.stderr)
    for step in bar:
        if draw is None:
            batch, select = (t.to(device) for t in _draw(ids, step, cfg))
            with torch.no_grad():
                target = teacher(batch, select)
        else:
            batch, select, target = draw(step)
            select = _to(select, device)
        inputs = batch if isinstance(batch, dict) else {"input_ids": batch}  # a dict: packed rows (packing.py)
        loss = loss_fn(causal_lm_logits(student, select, **_to(inputs, device)), target)
        if not math.isfinite(loss.item()):
            raise ValueError(f"distillation loss became {loss.item()} at step {step + 1}; lower --lr")
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            _save(Path(ckpt), key, params, opt, step + 1, losses)
        if on_step:
            on_step(step + 1, losses[-1])
    bar.close()
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": cfg.steps, "resumed_from": start, "seconds": round(time.perf_counter() - t0, 1),
            "first_loss": losses[0] if losses else None, "final_loss": sum(tail) / len(tail) if tail else None,
            "losses": losses}
