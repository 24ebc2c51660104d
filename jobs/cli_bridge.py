"""`cast transfer`, `cast generate`, `cast export`, `cast validate`: assembling, exporting
and judging the bridge."""
from __future__ import annotations

import json
import sys

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
    of each --prompt."""
    import torch

    from pipeline.assemble.transfer import load_bridged

    from transformers import LogitsProcessorList

    lm = load_bridged(ns.bridged, device=ns.device)
    proxy = LogitsProcessorList([lm.logits_processor] if lm.logits_processor else [])
    for prompt in ns.prompt:
        ids = lm.tokenizer(prompt, return_tensors="pt").to(lm.device)
        with torch.no_grad():
            out = lm.model.generate(**ids, max_new_tokens=ns.max_new_tokens, do_sample=False,
                                    pad_token_id=lm.tokenizer.pad_token_id, logits_processor=proxy)
        print(prompt + lm.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
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


def _generate_args(p) -> None:
    p.add_argument("bridged", help="artifact directory from `cast transfer`")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: 32)")
    p.add_argument("--device", default=None, help="torch device (default: CUDA when present, else CPU)")


TRANSFER = Command("package a source LoRA + the heads it needs into a bridged artifact", cmd_transfer,
                   config="pipeline.assemble.transfer:TransferConfig")
GENERATE = Command("greedy completion from a bridged target model", cmd_generate, add_args=_generate_args)
EXPORT = Command("write a bridged artifact as a plain PEFT LoRA for the target (ridge: folded, mlp: distilled)",
                 cmd_export, config="pipeline.assemble.export:ExportConfig", positional=("bridged",),
                 quiet="no progress bar")
READOUT = Command("held-out R² of what the LoRA reads (A·x) through the encoder heads, per layer", cmd_readout,
                  config="pipeline.assemble.readout:ReadoutConfig")
VALIDATE = Command("score base / retrained / CAST / ridge CAST / weight-space on a task", cmd_validate,
                   config="pipeline.assemble.validate:ValidateConfig", quiet="no progress bars")
