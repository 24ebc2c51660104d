"""`cast lora train` and `cast evaluate`: LoRA tooling."""
from __future__ import annotations

import argparse
import json
import sys

from jobs.args import Command, add_dataclass_args, to_dataclass

TRAIN_HELP = """\
Train a standard PEFT LoRA on MODEL for a task and write a plain PEFT adapter directory
(adapter_config.json + adapter_model.safetensors, loadable unchanged with
peft.PeftModel.from_pretrained), plus cast_lora.json (base model identity, task, recipe),
loss.json and loss.png. The loss covers answer tokens only. Built-in tasks: add2,
codebook, reverse, sentiment; or --task-file train.jsonl with one
{"prompt": ..., "answer": ...} object per line.

example:
  cast lora train --model smollm2-135m --task add2 --targets q_proj,v_proj --rank 8 \\
      --steps 150 --out runs/lora/smollm2-add2
"""

EVAL_HELP = """\
Greedy-decode the test split of a task with MODEL (optionally with a PEFT --adapter) and
report exact match after the task's normalisation, with a bootstrap 95-percent interval.
The answer is the generation up to its first newline. With --task-file, the file is the
test set (JSONL, {"prompt": ..., "answer": ...} per line). An adapter is checked against
the model's weights hash and against test prompts it was trained on.

example:
  cast evaluate --model smollm2-135m --adapter runs/lora/smollm2-add2 --task add2 \\
      --limit 100 --out runs/eval/smollm2-add2.json
"""


def cmd_lora_train(ns: argparse.Namespace) -> int:
    from pipeline.lora.train import LoraTrainConfig, train_lora

    cfg = to_dataclass(LoraTrainConfig, ns)
    res = train_lora(cfg, progress=not ns.quiet)
    print(json.dumps({"out": res.out, "final_loss": round(res.final_loss, 4),
                      "first_loss": round(res.losses[0], 4), "train_seconds": round(res.seconds, 1),
                      "trainable_params": res.trainable_params}, indent=2))
    return 0


def cmd_evaluate(ns: argparse.Namespace) -> int:
    from pipeline.lora.evaluate import EvalConfig, run_evaluate

    cfg = to_dataclass(EvalConfig, ns)
    res = run_evaluate(cfg, progress=not ns.quiet)
    print(res.summary() + (f"  -> {cfg.out}" if cfg.out else ""))
    if ns.show:
        for p in res.predictions[:ns.show]:
            mark = "ok " if p["correct"] else "BAD"
            print(f"  {mark} {p['prompt']!r} -> {p['prediction']!r} (expected {p['answer']!r})", file=sys.stderr)
    return 0


def _train_args(p) -> None:
    from pipeline.lora.train import LoraTrainConfig

    add_dataclass_args(p, LoraTrainConfig)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _evaluate_args(p) -> None:
    from pipeline.lora.evaluate import EvalConfig

    add_dataclass_args(p, EvalConfig)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--show", type=int, default=0, metavar="N",
                   help="print the first N predictions to stderr (default: 0)")


LORA = Command(
    help="train LoRA adapters (standard PEFT)",
    description="LoRA adapters on either model. See `cast lora train --help`.",
    subcommands={"train": Command(help="train a LoRA on a task, write a PEFT adapter dir", description=TRAIN_HELP,
                                  add_args=_train_args, run=cmd_lora_train, preformatted=True)})

EVALUATE = Command(
    help="exact-match score of a model (+ adapter) on a task",
    description=EVAL_HELP, add_args=_evaluate_args, run=cmd_evaluate, preformatted=True)
