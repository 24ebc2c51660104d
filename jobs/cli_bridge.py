"""`cast transfer`, `cast generate`, `cast export`, `cast validate`: assembling, exporting
and judging the bridge."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from jobs.args import Command, to_dataclass


def cmd_transfer(ns) -> int:
    """Check that the adapter belongs to the head set's source model (and, for --kind mlp or
    ridge, that every module it adapts is covered by heads), then write BRIDGED/
    (manifest.json, the adapter(s), the needed heads; none for the default --kind proxy).
    Load it with pipeline.assemble.transfer.load_bridged(BRIDGED); `cast generate` decodes
    with it whatever its kind."""
    from pipeline.assemble.transfer import TransferConfig, run_transfer

    manifest = run_transfer(to_dataclass(TransferConfig, ns))
    print(json.dumps({"out": ns.out, "target": manifest["target"]["model"], "source": manifest["source"]["model"],
                      "head_kind": manifest["head_kind"], "adapters": [a["origin"] for a in manifest["adapters"]]},
                     indent=2))
    return 0


def cmd_generate(ns) -> int:
    """Load the target model with a bridged artifact applied and print greedy completions
    of every --prompt, --batch-size at a time."""
    from pipeline.assemble.transfer import load_bridged
    from pipeline.lora.evaluate import generate_greedy

    prompts = list(ns.prompt)
    if ns.prompts_file:
        prompts += [line.rstrip("\n") for line in Path(ns.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts or any(not p for p in prompts):
        raise ValueError("--prompt: every prompt needs at least one character")
    lm = load_bridged(ns.bridged, device=ns.device)
    outs = generate_greedy(lm.model, lm.tokenizer, prompts, ns.max_new_tokens, ns.batch_size,
                           logits_processor=lm.logits_processor)
    for prompt, out in zip(prompts, outs):
        print(prompt + out)
    return 0


def cmd_export(ns) -> int:
    """Write a bridged artifact as a plain PEFT LoRA for its target (adapter_config.json,
    adapter_model.safetensors, cast_export.json with provenance and measured fidelity), to
    load with PeftModel.from_pretrained, merge, or serve like any other LoRA.

    Ridge bridges fold exactly into a LoRA: each source layer carried onto a module adds
    its rank, --rank cuts back by SVD (the loss is reported), and the constant term a
    LoRA cannot hold is by default absorbed into one more rank (the most faithful form
    that still merges; --bias carries it exactly as lora_bias, --no-absorb drops it), and
    the export's agreement with the bridge on held-out text is printed. MLP bridges are distilled: a LoRA of --rank is trained to match the bridged
    model's next-token distributions on corpus text the stores never read (resumable:
    rerun the same command), and its agreement on held-out text is reported."""
    from pipeline.assemble.export import ExportConfig, export_peft

    info = export_peft(to_dataclass(ExportConfig, ns), progress=not ns.quiet)
    print(json.dumps({"out": ns.out, "target": info["target"]["model"], "method": info["method"],
                      "rank": info["rank"], "fidelity": info.get("fidelity")}, indent=2))
    return 0


def cmd_validate(ns) -> int:
    """Evaluate on the task's held-out test split (the adapter's recorded seed; a test prompt
    it trained on is refused): target base, target + a LoRA retrained on the target with the
    source adapter's recipe, target + CAST (mlp and ridge heads), target + CAST exported
    (--absorb), target + weight-space transfer, target + logit proxy, and source base /
    source + LoRA. Writes report.json, report.md and report.png, exact-match recovery first
    (paired bootstrap 95% intervals resampling items where prompts share them)."""
    from pipeline.assemble.report import format_report
    from pipeline.assemble.validate import ValidateConfig, run_validate

    report = run_validate(to_dataclass(ValidateConfig, ns), progress=not ns.quiet)
    print(format_report(report))
    print(f"report: {ns.out}/report.json, report.md, report.png", file=sys.stderr)
    return 0


def cmd_readout(ns) -> int:
    """Per bridged layer and LoRA module, the held-out R² of what the source LoRA reads
    (A·x, its r numbers) when the target's activation is encoded into the source space,
    beside the whole activation's R² and the norm ratio of the read. Uses the head set's
    own stores, alignment and held-out split. Writes OUT/readout.json, readout.md and
    readout.png; says at which layers a bridge can be trusted, before any validation."""
    from pipeline.assemble.readout import ReadoutConfig, format_readout, run_readout

    print(format_readout(run_readout(to_dataclass(ReadoutConfig, ns))))
    print(f"readout: {ns.out}/readout.json, readout.md, readout.png", file=sys.stderr)
    return 0


def cmd_distill(ns) -> int:
    """Distil the logit proxy (the target decoding with the source LoRA's change of
    log-probabilities) into a plain PEFT LoRA for the target, with no labelled task data.

    The teacher writes continuations (temperature 1) from where the LoRA acts: by default
    prefixes of generic corpus text where the source LoRA changes the source's next-token
    distribution most (--data salient), or k unlabelled task prompts (--data prompts
    --prompts FILE; prompts only, and never the task's test prompts). The student, the
    target with a fresh LoRA, learns the teacher's distribution at every continuation
    position (KL on its top-k tokens + the rest). OUT is a plain PEFT adapter
    (PeftModel.from_pretrained, merge_and_unload, any serving stack) with cast_distill.json:
    the source adapter's hash, the teacher, the data regime, steps, tokens, and the
    student's KL and top-1 agreement with the teacher on held-out teacher samples.
    Resumable: rerun the same command. `cast validate` scores it as "target + distilled LoRA"."""
    from pipeline.assemble.student import StudentConfig, run_distill

    info = run_distill(to_dataclass(StudentConfig, ns), progress=not ns.quiet)
    print(json.dumps({"out": ns.out, "target": info["target"]["name"], "data": info["data"]["regime"],
                      "train_samples": info["data"]["train_samples"], "fidelity": info["fidelity"],
                      "seconds": info["seconds"]}, indent=2))
    return 0


def _generate_args(p) -> None:
    p.add_argument("bridged", help="artifact directory from `cast transfer`")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompts-file", default=None, help="a text file of prompts, one per line (with or instead of --prompt)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together (default: 16)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: 32)")
    p.add_argument("--device", default=None, help="torch device (default: CUDA when present, else CPU)")


TRANSFER = Command("package a source LoRA + the heads it needs into a bridged artifact", cmd_transfer,
                   config="pipeline.assemble.transfer:TransferConfig")
GENERATE = Command("greedy completion from a bridged target model", cmd_generate, add_args=_generate_args)
DISTILL = Command("distil the logit proxy into a plain PEFT LoRA for the target (no labelled task data)",
                  cmd_distill, config="pipeline.assemble.student:StudentConfig", quiet="no progress bars")
EXPORT = Command("write a bridged artifact as a plain PEFT LoRA for the target (ridge: folded, mlp: distilled)",
                 cmd_export, config="pipeline.assemble.export:ExportConfig", positional=("bridged",),
                 quiet="no progress bar")
READOUT = Command("held-out R² of what the LoRA reads (A·x) through the encoder heads, per layer", cmd_readout,
                  config="pipeline.assemble.readout:ReadoutConfig")
VALIDATE = Command("score base / retrained / CAST / ridge CAST / weight-space on a task", cmd_validate,
                   config="pipeline.assemble.validate:ValidateConfig", quiet="no progress bars")
