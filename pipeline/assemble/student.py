"""`cast distill`: the logit proxy (teacher) distilled into a plain PEFT LoRA on the target
(student), with no labelled task data; docs/design.md#distilling-the-proxy says why each choice.

    OUT/adapter_config.json, adapter_model.safetensors   the student: plain PEFT, no CAST code needed
    OUT/cast_distill.json    provenance (source adapter hash, teacher, data regime, steps,
                             tokens) and fidelity to the teacher on held-out teacher samples

Data regimes (--data): `salient` (default) prefixes of generic corpus text where the source
LoRA changes the source's next-token distribution most; `uniform` random prefixes of the
same text (the control); `prompts` k unlabelled task prompts from --prompts (never
answers). From every prefix the teacher writes --samples continuations; the student is
trained on KL to the teacher at those positions. Resumable: samples and checkpoints live
beside --out until it is committed.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline.assemble import PLAUSIBLE, check_plausible
from pipeline.assemble.distill import DistillConfig, distill
from pipeline.assemble.packing import for_model, packed_batch, prompt_groups
from pipeline.assemble.teacher import (Sample, batch_of, more_prompts, salient_prefixes, sample_teacher,
                                       sparse_kl, stored_prefixes, teacher_along, uniform_prefixes)
from pipeline.assemble.teacher_files import along_kept, load_samples, save_samples
from pipeline.lora.precision import PRECISIONS, frozen_base_in, resolve_precision
from storage.files import atomic_path, sha256_bytes, sha256_file

DISTILL_FILE = "cast_distill.json"
REGIMES = ("salient", "uniform", "prompts")


class DistillError(ValueError):
    """A distillation that cannot run as asked (said in one line)."""


@dataclass
class StudentConfig:
    """What `cast distill` does; every field is a flag of the same name."""

    adapter: str
    """The source PEFT adapter (from `cast lora train`) whose behaviour is distilled."""
    out: str
    """Directory for the target LoRA (plain PEFT) and cast_distill.json; must be empty or absent unless --force."""
    target: str = "gemma3-270m"
    """Target model: registry name or local Hugging Face directory."""
    data: str = "salient"
    """Where the teacher's continuations start: salient (zero task data: corpus text where the source LoRA acts
    most), uniform (random corpus text, the control) or prompts (k unlabelled task prompts from --prompts)."""
    prompts: str | None = None
    """With --data prompts: a file of task prompts, one per line or JSONL {"prompt": ...}; answers are never read.
    Refused when it overlaps the test split of the task the adapter was trained on."""
    augment: int = 0
    """With --data prompts: this many more prompts, written by the source (without its LoRA) in the manner of
    the k given (shown 8 at a time as a list); any that fall in the adapter's task test split are dropped."""
    corpus: str = "nlp-corpus"
    """Generic text for salient/uniform: the built-in corpus or a file, directory or glob."""
    store: str | None = None
    """With --data salient: the source's activation store (`cast extract`); salience is then read from the
    activations it holds at the adapted modules' inputs (scale·‖B·A·x‖), no model run. Without it, salience is
    the KL between the source with and without the LoRA on --candidates segments (two source passes each);
    measured on capital, that KL is largest where the LoRA only says "stop", and the student learned to
    answer nothing (docs/results.md#distilling-the-proxy): give --store, or use --data uniform."""
    candidates: int = 600
    """Corpus segments scored for salience (each runs the source twice)."""
    prefixes: int = 48
    """Corpus prefixes kept (salient: the most salient; uniform: random)."""
    mix_uniform: int = 0
    """With --data salient: this many more prefixes cut at random from the corpus (--data uniform's), trained
    beside the salient ones. Salient text ends where the LoRA acts, where it mostly says "stop"; random text shows
    the student where the teacher goes on."""
    prompt_weight: float = 0.0
    """Also train on the teacher's distribution at every token of the prompts themselves (read teacher-forced,
    where the teacher goes on with the text), at this weight beside the continuations' (the loss is the
    continuations' mean KL plus this times the prompts'). Salient text ends where the LoRA acts, mostly saying
    "stop", so the continuations alone are short and a third of their positions are eos. Needs --pack."""
    prompt_positions: int = 0
    """With --prompt-weight: this many of each prompt's positions enter a step's loss, drawn at random every step
    (0: all of them, about 40 a corpus prefix). Each costs the target's output layer (262k rows on Gemma-3)."""
    samples: int = 4
    """Continuations the teacher writes per prefix or prompt."""
    temperature: float = 1.0
    """Temperature the teacher's continuations are sampled at. It chooses only the text: the student is matched
    to the teacher's own distribution (temperature 1) at every position of it."""
    plausible: float = PLAUSIBLE
    """The teacher's plausibility floor: a token the source + LoRA gives less than this fraction of its top token's
    probability gets no rise from the LoRA (see `cast transfer --help`)."""
    max_new_tokens: int = 24
    """Longest continuation, in target tokens (one ends earlier at eos)."""
    sample_batch: int = 8
    """Continuations the teacher generates at a time. Each such batch is seeded by its place, so this (not
    --batch-size) decides the draws: changing --batch-size keeps the same teacher samples."""
    top_k: int = 64
    """Teacher tokens kept per position; the rest of its mass is one bucket of the KL."""
    heldout: float = 0.15
    """Fraction of prefixes whose samples are held out to measure fidelity (never trained on)."""
    targets: str = "q_proj,v_proj"
    """Target modules of the student LoRA (comma-separated, or 'all')."""
    rank: int = 8
    """Student LoRA rank (alpha = 2 x rank, as `cast lora train`'s default)."""
    steps: int = 60
    """Optimiser steps. What a zero-data student needs is the samples it sees (docs/results.md): on capital, one
    row per sample and 8 a step, 60, 120 and 240 steps gave exact-match recovery 0.30, 0.71 and 0.89 on the same
    teacher samples (twice the learning rate at 120: 0.43); the default 60 steps of 32 packed samples see as many
    as 240 of 8."""
    batch_size: int = 32
    """Samples per step (packed: batch_size / samples prompts per step, each with all its samples)."""
    pack: bool = True
    """Train each prompt's samples as one row (the prompt once, each continuation attending to it and to itself:
    the same positions and losses as one row per sample, about a quarter of the tokens), drawing whole prompts
    per step; --no-pack draws samples one by one, one row each. Capital, zero task data, as many samples seen
    (1,920), three seeds each on one machine (docs/results.md): 8 prompts x 4 a step for 60 steps (the default)
    gave exact match 0.79, 0.79, 0.68; 4 prompts x 4 for 120 steps 0.76, 0.74, 0.67; 8 samples one row each for
    240 steps (the default before, 3-4 times the training time) 0.74, 0.76, 0.73; 2 prompts x 4 a step for 240
    steps 0.51 (one seed)."""
    lr: float = 2e-3
    """Peak learning rate (AdamW, warmup then linear decay to a tenth)."""
    seed: int = 0
    """Seed of the prefixes drawn, the teacher's sampling and the data order."""
    precision: str = "float32"
    """Number format of the frozen target while the student trains (its LoRA, gradients and optimiser stay
    float32; the teacher always samples in float32): float32, bfloat16, or auto (bfloat16 on CUDA or a CPU with
    bfloat16 matrix units). The saved adapter is float32 and is evaluated on the float32 target. Capital, zero
    task data, 240 steps, 2 CPU cores with AMX (docs/results.md): bfloat16 trained in 0.53-0.56 of the time, at
    exact match 0.67, 0.77, 0.71 on three seeds against 0.75, 0.77, 0.74 in float32, so float32 is the default."""
    threads: int | None = None
    """CPU threads for torch (default: torch's choice)."""
    device: str | None = None
    """torch device; default CUDA when present, else CPU."""
    force: bool = False
    """Replace a non-empty --out."""

    def __post_init__(self):
        if self.data not in REGIMES:
            raise DistillError(f"--data {self.data}: choose one of {', '.join(REGIMES)}")
        if self.store and self.data != "salient":
            raise DistillError(f"--store goes with --data salient (it chooses salient text), not --data {self.data}")
        if (self.data == "prompts") != bool(self.prompts):
            raise DistillError("--prompts FILE goes with --data prompts (and --data prompts needs --prompts)")
        if self.augment and self.data != "prompts":
            raise DistillError("--augment writes more prompts like those of --prompts: it goes with --data prompts")
        if self.mix_uniform and self.data != "salient":
            raise DistillError("--mix-uniform adds random prefixes to salient ones: it goes with --data salient")
        if self.mix_uniform < 0:
            raise DistillError(f"--mix-uniform {self.mix_uniform}: must be 0 or more")
        if self.prompt_weight < 0 or (self.prompt_weight and not self.pack):
            raise DistillError(f"--prompt-weight {self.prompt_weight}: must be 0 or more, and above 0 only with --pack")
        if self.prompt_positions < 0:
            raise DistillError(f"--prompt-positions {self.prompt_positions}: must be 0 (all) or more")
        if self.augment < 0:
            raise DistillError(f"--augment {self.augment}: must be 0 or more")
        for name in ("candidates", "prefixes", "samples", "max_new_tokens", "sample_batch", "top_k", "rank", "steps",
                     "batch_size"):
            if getattr(self, name) < 1:
                raise DistillError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be 1 or more")
        if not self.temperature > 0:
            raise DistillError(f"--temperature {self.temperature}: must be above 0 (1 samples the teacher as it is)")
        check_plausible("--plausible", self.plausible, DistillError)
        if not 0 <= self.heldout < 1:
            raise DistillError(f"--heldout {self.heldout}: a fraction in [0, 1)")
        if self.precision not in PRECISIONS:
            raise DistillError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}")


def read_prompts(path: str) -> list[str]:
    f = Path(path)
    if not f.is_file():
        raise DistillError(f"--prompts {path}: no such file")
    out = []
    for n, line in enumerate(f.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DistillError(f"--prompts {path}:{n}: not JSON ({e.msg})") from None
            if "prompt" not in row:
                raise DistillError(f"--prompts {path}:{n}: a JSON line needs a \"prompt\" field")
            out.append(row["prompt"])
        else:
            out.append(line)
    if not out:
        raise DistillError(f"--prompts {path}: no prompts")
    return list(dict.fromkeys(out))


def test_prompts(adapter_meta: dict | None) -> set[str]:
    """The test prompts of the adapter's own task, when it is a built-in task (else none known)."""
    from pipeline.lora.tasks import BUILTINS, load_task

    task = (adapter_meta or {}).get("task", {})
    if task.get("name") not in BUILTINS:
        return set()
    return {e.prompt for e in load_task(task["name"], split="test", seed=task.get("seed", 0)).test}


def check_unseen(prompts: list[str], adapter_meta: dict | None, where: str) -> None:
    """Refuse prompts from the test split of the adapter's own task (when it is a built-in
    task with a recorded seed): distilling on them would grade the student on its lesson."""
    test = test_prompts(adapter_meta)
    seen = [p for p in prompts if p in test]
    if seen:
        task = adapter_meta["task"]
        raise DistillError(f"--prompts {where}: {len(seen)} of {len(prompts)} prompts are in the test split of "
                           f"{task['name']} (e.g. {seen[0]!r}); use prompts from its training split or elsewhere")


def corpus_texts(corpus: str, n: int) -> list[str]:
    from pipeline.cache.corpus import load_corpus, segment

    return [s.text for s in segment(load_corpus(corpus), 512)[:n]]


def _work_dir(out: Path) -> Path:
    return out.parent / f".tmp-{out.name}-distill"


@torch.no_grad()
def fidelity(model, samples: list[Sample], pad: int, batch_size: int) -> dict | None:
    """KL(teacher || model) per position (top-k + rest buckets) and top-1 agreement on samples."""
    from pipeline.lora.train import causal_lm_logits

    if not samples:
        return None
    kl, agree, n = 0.0, 0, 0
    device = next(model.parameters()).device
    for s in range(0, len(samples), batch_size):
        ids, select, (top_ids, top_lp) = batch_of(samples[s:s + batch_size], pad)
        logits = causal_lm_logits(model, select.to(device), input_ids=ids.to(device)).cpu()
        kl += sparse_kl(logits, top_ids, top_lp).item() * len(logits)
        agree += (logits.argmax(-1) == top_ids[:, 0].long()).sum().item()
        n += len(logits)
    return {"kl": kl / n, "top1_agreement": agree / n, "positions": n}


def run_distill(cfg: StudentConfig, progress: bool = True) -> dict:
    """What `cast distill` does; returns what cast_distill.json holds."""
    from peft import LoraConfig, get_peft_model

    from pipeline.assemble.proxy import LogitProxy
    from pipeline.cache.models import load_model
    from pipeline.lora.adapters import load_adapter, parse_targets, read_adapter_meta

    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.force:
        raise DistillError(f"--out {out} exists and is not empty; choose another path or pass --force")
    meta = read_adapter_meta(cfg.adapter)
    prompts = read_prompts(cfg.prompts) if cfg.prompts else None
    if prompts:
        check_unseen(prompts, meta, cfg.prompts)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    src_name = (meta or {}).get("base", {}).get("name")
    if not src_name:
        raise DistillError(f"--adapter {cfg.adapter}: no cast_lora.json naming its base model; "
                           f"train it with `cast lora train`")
    src, tgt = load_model(src_name, device=cfg.device), load_model(cfg.target, device=cfg.device)
    source = load_adapter(src.model, cfg.adapter)
    proxy = LogitProxy(source, src.tokenizer, tgt.tokenizer, plausible=cfg.plausible)
    work = _work_dir(out)
    work.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "threads", "device", "force", "steps",
                                                                   "batch_size", "lr", "targets", "rank", "precision",
                                                                   "pack", "prompt_weight")}
    key = sha256_bytes(sha256_file(Path(cfg.adapter) / "adapter_model.safetensors"), tgt.info.weights_hash,
                       json.dumps(settings, sort_keys=True), json.dumps(prompts))
    loaded = load_samples(work, key)
    if loaded:
        samples, smeta = loaded
        print(f"[cast] distill: {len(samples)} teacher samples from {work}", file=sys.stderr)
    else:
        salience, median, augmented = None, None, None
        if cfg.data == "prompts":
            starts = prompts
            if cfg.augment:
                made = more_prompts(source, src.tokenizer, prompts, cfg.augment, cfg.seed, progress=progress)
                test = test_prompts(meta)  # a written prompt that happens to be a test prompt is never used
                augmented = {"written": len(made), "dropped_as_test_prompts": sum(p in test for p in made)}
                starts = prompts + [p for p in made if p not in test]
        else:
            texts = [] if cfg.store else corpus_texts(cfg.corpus, cfg.candidates)
            if cfg.data == "salient" and cfg.store:
                starts, salience, median = stored_prefixes(cfg.store, cfg.adapter, cfg.corpus, cfg.prefixes)
            elif cfg.data == "salient":
                starts, salience, median = salient_prefixes(source, src.tokenizer, texts, cfg.prefixes, progress=progress)
            else:
                starts = uniform_prefixes(texts, cfg.prefixes, cfg.seed)
            if cfg.mix_uniform:
                starts = starts + uniform_prefixes(texts or corpus_texts(cfg.corpus, cfg.candidates), cfg.mix_uniform,
                                                   cfg.seed)
        g = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(starts), generator=g).tolist()
        n_held = int(round(cfg.heldout * len(starts)))
        starts = [starts[i] for i in order]
        samples = sample_teacher(tgt.model, tgt.tokenizer, proxy, starts, cfg.samples, cfg.max_new_tokens,
                                 cfg.top_k, cfg.seed, cfg.sample_batch, progress, cfg.temperature)
        smeta = {"key": key, "starts": None, "prefixes": len(starts), "heldout_prefixes": n_held,
                 "uniform_prefixes_mixed_in": cfg.mix_uniform,
                 "examples": starts[:3], "salience": salience[:5] if salience else None,
                 "salience_median_of_candidates": median, "augmented": augmented,
                 "salience_from": ("store " + str(cfg.store)) if cfg.store else ("kl" if salience else None),
                 "sampling_seconds": round(time.perf_counter() - t0, 1)}
        save_samples(work, samples, smeta)
    n_held = smeta["heldout_prefixes"] * cfg.samples
    held, train = samples[:n_held], samples[n_held:]
    if not train:
        raise DistillError(f"no training samples: --heldout {cfg.heldout} holds out all {smeta['prefixes']} prefixes")
    pad = tgt.tokenizer.pad_token_id if tgt.tokenizer.pad_token_id is not None else tgt.tokenizer.eos_token_id
    units = prompt_groups(train) if cfg.pack else [[i] for i in range(len(train))]
    along = along_kept(work, key, lambda: teacher_along(tgt.model, tgt.tokenizer, proxy, [
        train[u[0]].ids[:train[u[0]].start] for u in units], cfg.top_k, progress)) if cfg.prompt_weight else None
    student = get_peft_model(tgt.model, LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, lora_dropout=0.0,
                                                   target_modules=parse_targets(cfg.targets), task_type="CAUSAL_LM"))
    at_start = fidelity(student, held, pad, cfg.batch_size)

    per_step = max(1, cfg.batch_size // cfg.samples) if cfg.pack else cfg.batch_size

    def draw(step: int):  # reshuffled epochs; a step's rows depend on (seed, step) alone
        rows = []
        for p in range(step * per_step, (step + 1) * per_step):
            epoch, i = divmod(p, len(units))
            rows.append(int(torch.randperm(len(units), generator=torch.Generator().manual_seed(
                cfg.seed * 100_003 + epoch))[i]))
        if not cfg.pack:
            return batch_of([train[units[j][0]] for j in rows], pad)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        inputs, select, target = packed_batch([[train[i] for i in units[j]] for j in rows], pad,
                                              [along[j].some(cfg.prompt_positions, g) for j in rows] if along else None,
                                              cfg.prompt_weight)
        return for_model(inputs, student), select, target

    dcfg = DistillConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                         checkpoint_every=25, threads=cfg.threads)
    fmt = resolve_precision(cfg.precision, tgt.device)
    with frozen_base_in(student, fmt):
        run = distill(student, None, None, dcfg, work / "ckpt", key=key + cfg.targets + str(cfg.rank) + fmt + "packed" * cfg.pack
                      + (f"along{cfg.prompt_weight},{cfg.prompt_positions}" if along else ""),
                      loss_fn=lambda s, t: sparse_kl(s, *(x.to(s.device) for x in t)), progress=progress, draw=draw)
    at_end = fidelity(student, held, pad, cfg.batch_size)
    info = {"kind": "cast-distilled-lora", "version": 1,
            "source": {"model": src_name, "adapter": str(cfg.adapter),
                       "adapter_sha256": sha256_file(Path(cfg.adapter) / "adapter_model.safetensors"),
                       "task": (meta or {}).get("task")},
            "target": asdict(tgt.info),
            "teacher": {"kind": "logit proxy", "shared_tokens": len(proxy.ids_t), "others": proxy.others,
                        "plausible": proxy.plausible},
            "data": {"regime": cfg.data, "prompts_file": cfg.prompts,
                     "prompts_sha256": sha256_file(cfg.prompts) if cfg.prompts else None,
                     "k": len(prompts) if prompts else 0, **{k: v for k, v in smeta.items() if k not in ("key", "starts")},
                     "train_samples": len(train), "heldout_samples": len(held),
                     "train_tokens": sum(len(x.ids) - x.start for x in train),
                     "prompt_weight": cfg.prompt_weight, "prompt_columns": sum(len(a.cols) for a in along or [])},
            "student": {"targets": cfg.targets, "rank": cfg.rank, "alpha": 2 * cfg.rank, "trained_in": fmt,
                        "packed": cfg.pack},
            "config": asdict(cfg),
            "fidelity": {"heldout_teacher_samples": at_end, "target_base": at_start},
            "distillation": {k: v for k, v in run.items() if k != "losses"} | {"losses": run["losses"][::5]},
            "seconds": round(time.perf_counter() - t0, 1)}
    with atomic_path(out) as staged:
        student.save_pretrained(staged)
        (staged / DISTILL_FILE).write_text(json.dumps(info, indent=2))
    shutil.rmtree(work, ignore_errors=True)  # committed: nothing left to resume
    return info
