"""`cast lora train` and `cast evaluate`: LoRA tooling."""
from __future__ import annotations

import argparse
import json
import sys

from jobs.args import Command, to_dataclass

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


def _show_flag(p) -> None:
    p.add_argument("--show", type=int, default=0, metavar="N", help="print the first N predictions to stderr "
                   "(default: 0)")


TRAIN = Command("train a LoRA on a task, write a PEFT adapter dir", cmd_lora_train, description=TRAIN_HELP,
                preformatted=True, config="pipeline.lora.train:LoraTrainConfig", quiet="no progress bar")
LORA = Command("train LoRA adapters (standard PEFT)", description="LoRA adapters on either model. See "
               "`cast lora train --help`.", subcommands={"train": TRAIN})
EVALUATE = Command("exact-match score of a model (+ adapter) on a task", cmd_evaluate, description=EVAL_HELP,
                   preformatted=True, config="pipeline.lora.evaluate:EvalConfig", add_args=_show_flag,
                   quiet="no progress bar")
