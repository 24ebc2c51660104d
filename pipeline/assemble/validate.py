"""`cast validate`: does the behaviour carry over? One report per task comparing the rows of
SYSTEMS below (one entry each: its key, report row, --systems name and builder):

    target base | target + LoRA retrained on target (same recipe) | target + CAST (mlp heads)
    target + CAST (ridge heads) | target + CAST exported (the ridge bridge as a plain PEFT LoRA)
    target + weight-space transfer | target + logit proxy | source base | source + LoRA

with recovery = (system - base) / (retrained - base) and ratio = system / retrained, exact match
first, each with a paired bootstrap interval that resamples items where prompts share them
(pipeline/assemble/report.py). JSON, Markdown and a bar chart.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from heads.headset import load_heads
from pipeline.assemble import OTHERS, PLAUSIBLE, check_plausible
from pipeline.assemble.bridge import CARRY, FIRST_TOKEN, BridgeError, check_choice, read_lora
from pipeline.assemble.report import write_report
from pipeline.assemble.scoring import OFFTASK_LEN, heldout_ids, score_system
from storage.fs import as_path


@dataclass
class ValidateConfig:
    """What `cast validate` does; every field is a flag of the same name."""

    adapter: str
    """Source LoRA adapter (from `cast lora train`: its recipe is reused for the retrained baseline)."""
    out: str
    """Report directory; artifacts made along the way (retrained LoRA, bridges) are kept there and reused."""
    heads: str = ""
    """Head set from `cast train-heads` (must contain mlp and ridge heads for the adapter's modules); the
    systems that need no heads (source, proxy, distilled) run without it, given --target."""
    target: str = ""
    """Without --heads: the target model (registry name or local directory); the source is the adapter's base."""
    proxy_others: str = "prefix"
    """The proxy row's rule for target tokens without a byte-identical source token: prefix, rest or none
    (see `cast transfer --help`)."""
    proxy_plausible: float = PLAUSIBLE
    """The proxy row's plausibility floor: a token the source + LoRA gives less than this fraction of its top
    token's probability gets no rise (see `cast transfer --help`)."""
    task: str | None = None
    """Built-in task name; default: the task the adapter was trained on."""
    task_file: str | None = None
    """Test split as JSONL {"prompt", "answer"} (instead of --task)."""
    task_seed: int | None = None
    """Seed of the built-in task's split; default: the seed the adapter recorded (cast_lora.json), so the test
    prompts are the ones it never trained on (another seed for the adapter's own task is refused)."""
    limit: int = 200
    """Test examples evaluated per system."""
    batch_size: int = 16
    """Generation batch size."""
    carry: str = "all"
    """Source LoRA layers carried: 'all' or 'mapped' (see `cast transfer --help`)."""
    first_token: str = "bridge"
    """The mlp and ridge rows: 'bridge' or 'keep' (leave each sequence's first real token unchanged; see `cast
    transfer --help`). Off by default (measured: docs/results.md)."""
    retrained: str | None = None
    """An existing target LoRA to use as the retrained reference (default: train one with the same recipe)."""
    distilled: str | None = None
    """A target LoRA from `cast distill` (the proxy distilled, no task data) to score as "target + distilled LoRA"."""
    n_boot: int = 2000
    """Bootstrap resamples for the intervals."""
    decode: bool = True
    """Greedy-decode every system for exact match; --no-decode keeps only the measures that need no decoding
    (answer log-likelihood, off-task damage): seconds per system instead of minutes, for ablations."""
    offtask_sequences: int = 32
    """Held-out generic sequences (64 tokens, from the corpus's end, never read by the stores) on which each
    system's perplexity and KL to its base model are measured; 0: skip."""
    systems: str = "all"
    """Systems scored besides the target base and the retrained reference (always: recovery needs them):
    'all' or a comma-separated subset of source, mlp, ridge, exported, weight-space, proxy (the logit proxy:
    the target decoding with the source LoRA's change of log-probabilities; docs/design.md#the-logit-proxy),
    distilled (scored when --distilled is given)."""
    corpus: str = "nlp-corpus"
    """Generic text of the off-task measures (the built-in corpus, or a file, directory or glob)."""
    device: str | None = None
    """torch device; default CUDA when present, else CPU."""

    def __post_init__(self):
        check_choice("carry", self.carry, CARRY)
        check_choice("first-token", self.first_token, FIRST_TOKEN)
        check_choice("proxy-others", self.proxy_others, OTHERS)
        check_plausible("--proxy-plausible", self.proxy_plausible)
        for name, low in (("limit", 1), ("batch_size", 1), ("n_boot", 1), ("offtask_sequences", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")


@dataclass(frozen=True)
class System:
    """One row of the report."""

    key: str
    """Its name in report.json and its files (predictions/<key>.json, answer_ll/<key>.json)."""
    label: str
    """Its row in report.md and report.png."""
    choice: str | None
    """The --systems name that selects it; None: always scored (recovery is measured between them)."""
    side: str
    """'target' or 'source': the model whose tokenizer it reads and whose off-task KL it is measured against."""
    build: Callable[["Run"], tuple]
    """(model, logits processor or None) of the system, built from the run's artifacts."""
    bridge: str | None = None
    """The bridge kind it is built from: the adapter is checked against the heads before any decoding."""
    transferred: bool = True
    """Recovery is reported for it (not for the bases and the reference)."""


@dataclass
class Run:
    """What the builders share: the config, the models' names and head set, the report
    directory, the unwrapped base models, the bridged artifacts made so far (each built once)
    and notes for report.json."""

    cfg: ValidateConfig
    out: Path
    meta: dict
    train_task: object
    names: dict[str, str]
    heads: object
    refs: dict = field(default_factory=dict)
    """side -> its unwrapped LoadedModel (the logit proxy shares the target's)."""
    bases: dict = field(default_factory=dict)
    made: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)

    def fresh(self, side: str):
        """A new copy of that side's model: PEFT wraps models in place."""
        from pipeline.cache.models import load_model

        return load_model(self.names[side], device=self.cfg.device).model

    def transfer(self, kind: str) -> Path:
        from pipeline.assemble.transfer import TransferConfig, run_transfer

        if kind not in self.made:
            path = self.out / f"bridged-{kind}"
            run_transfer(TransferConfig(adapter=self.cfg.adapter, heads=self.cfg.heads, target=self.names["target"],
                                        out=str(path), kind=kind, others=self.cfg.proxy_others,
                                        plausible=self.cfg.proxy_plausible,
                                        carry=self.cfg.carry, force=True,
                                        first_token=self.cfg.first_token if kind != "proxy" else "bridge"))
            self.made[kind] = path
        return self.made[kind]


def _lora(side: str, adapter: Callable[[Run], str | Path]):
    def build(run: Run):
        from pipeline.lora.adapters import load_adapter

        return load_adapter(run.fresh(side), adapter(run)), None
    return build


def _base(side: str):
    return lambda run: (run.bases[side], None)


def _bridged(kind: str):
    def build(run: Run):
        from pipeline.assemble.transfer import load_bridged

        # A proxy leaves its target as loaded, the same weights as the base (load_bridged checks
        # the hash): it runs on the base itself, and shares the base's off-task logits.
        lm = load_bridged(run.transfer(kind), device=run.cfg.device,
                          loaded=run.refs["target"] if kind == "proxy" else None)
        return lm.model, lm.proxy
    return build


EXPORT_MODE = "absorb"
"""How validate exports: the most faithful form that still merges into the weights (cast export's default)."""


def _exported(run: Run) -> str:
    """The ridge bridge folded into a plain PEFT LoRA, its fidelity to the bridge measured on the
    off-task text and kept for the report: the row is this LoRA, not the bridge."""
    from pipeline.assemble.export import ExportConfig, export_peft

    path = run.out / "exported-lora"
    cfg = run.cfg
    info = export_peft(ExportConfig(bridged=str(run.transfer("ridge")), out=str(path), force=True, absorb=True,
                                    bias=False, corpus=cfg.corpus, seq_len=OFFTASK_LEN,
                                    eval_sequences=cfg.offtask_sequences, device=cfg.device), progress=False)
    run.notes["exported"] = {"method": info["method"], "fidelity": info.get("fidelity")}
    f = (info.get("fidelity") or {}).get("vs_bridged")
    if f:
        print(f"[cast] exported ({EXPORT_MODE}) against the ridge bridge: max |logit diff| {f['max_abs_logit_diff']:.4g}, "
              f"top-1 agreement {f['top1_agreement']:.4f} over {f['tokens']} held-out tokens", file=sys.stderr)
    return str(path)


def _weightspace(run: Run) -> str:
    from pipeline.assemble.weightspace import weightspace_adapter

    path = run.out / "weightspace-lora"
    weightspace_adapter(run.cfg.adapter, run.fresh("source"), run.fresh("target"), run.heads.mapping,
                        path, run.cfg.carry)
    return str(path)


SYSTEMS = (
    System("source-base", "source base", "source", "source", _base("source"), transferred=False),
    System("source-lora", "source + LoRA", "source", "source", _lora("source", lambda r: r.cfg.adapter),
           transferred=False),
    System("target-base", "target base", None, "target", _base("target"), transferred=False),
    System("retrained", "target + retrained LoRA", None, "target", _lora("target", lambda r: _ensure_retrained(r)),
           transferred=False),
    System("mlp", "target + CAST (mlp)", "mlp", "target", _bridged("mlp"), bridge="mlp"),
    System("ridge", "target + CAST (ridge)", "ridge", "target", _bridged("ridge"), bridge="ridge"),
    System("exported", f"target + CAST exported ({EXPORT_MODE})", "exported", "target", _lora("target", _exported),
           bridge="ridge"),
    System("weight-space", "target + weight-space", "weight-space", "target", _lora("target", _weightspace)),
    System("proxy", "target + logit proxy", "proxy", "target", _bridged("proxy")),
    System("distilled", "target + distilled LoRA", "distilled", "target", _lora("target", lambda r: r.cfg.distilled)),
)
"""Report rows in order; adding a system is one entry here."""
CHOICES = tuple(dict.fromkeys(s.choice for s in SYSTEMS if s.choice))


def chosen_systems(cfg: ValidateConfig) -> list[System]:
    chosen = set(CHOICES) if cfg.systems == "all" else {x.strip() for x in cfg.systems.split(",") if x.strip()}
    if not chosen or chosen - set(CHOICES):
        raise BridgeError(f"--systems {cfg.systems}: choose 'all' or from {', '.join(CHOICES)}")
    if "distilled" in chosen and not cfg.distilled and cfg.systems != "all":
        raise BridgeError("--systems distilled needs --distilled DIR (a target LoRA from `cast distill`)")
    return [s for s in SYSTEMS if (s.choice is None or s.choice in chosen) and (s.key != "distilled" or cfg.distilled)]


def _scoring_order(systems: list[System]) -> list[System]:
    """The report's order, except the proxy straight after the target base, whose answer
    logits it reuses (held in memory only between the two)."""
    rest = [s for s in systems if s.key != "proxy"]
    if len(rest) == len(systems):
        return systems
    at = next(i for i, s in enumerate(rest) if s.key == "target-base") + 1
    return rest[:at] + [s for s in systems if s.key == "proxy"] + rest[at:]


def task_seed(cfg: ValidateConfig, meta: dict, task_name: str | None) -> int:
    """The adapter's recorded seed for its own task: another would draw test prompts from its
    training split. A task it was not trained on takes --task-seed (default 0)."""
    recorded = meta["task"].get("seed") if meta["task"].get("name") == task_name else None
    if recorded is None:
        return cfg.task_seed or 0
    if cfg.task_seed is not None and cfg.task_seed != recorded:
        raise BridgeError(f"--task-seed {cfg.task_seed}: --adapter {cfg.adapter} was trained on {task_name} with "
                          f"seed {recorded}, whose test split is the held-out one; omit --task-seed")
    return recorded


def refuse_overlap(task, examples: list, cfg: ValidateConfig, adapters: dict[str, str]) -> None:
    """No score on prompts a scored adapter trained on: each adapter's recorded training
    prompts (digests in cast_lora.json) must miss every test prompt. `adapters`: what to
    call it in a message -> its directory."""
    from pipeline.lora.adapters import read_adapter_meta
    from pipeline.lora.evaluate import trained_on

    for what, adapter in adapters.items():
        meta = read_adapter_meta(adapter)
        if meta is None or "train_prompt_keys" not in meta:
            print(f"[cast] {what} records no training prompts: cannot check that the test prompts are held out",
                  file=sys.stderr)
        seen = trained_on(examples, meta)
        if seen:
            where = f"--task-file {cfg.task_file}" if cfg.task_file else f"task {task.name}"
            raise BridgeError(f"{what} was trained on {len(seen)} of the {len(examples)} test prompts of {where} "
                              f"(e.g. {seen[0]!r}); validate on prompts it never saw")


def _ensure_retrained(run: Run) -> str:
    from pipeline.lora.train import LoraTrainConfig, train_lora

    cfg, meta, target_name, task, out = run.cfg, run.meta, run.names["target"], run.train_task, run.out
    if cfg.retrained:
        return cfg.retrained
    path = out / "retrained-target-lora"
    if (path / "adapter_model.safetensors").exists():  # checked against the test split by refuse_overlap
        return str(path)
    r = meta["recipe"]
    print(f"[cast] training the reference LoRA on {target_name} with the source recipe {r}", file=sys.stderr)
    train_lora(LoraTrainConfig(model=target_name, out=str(path), targets=",".join(r["targets"]), rank=r["rank"],
                               alpha=r["alpha"], dropout=r["dropout"], steps=r["steps"], batch_size=r["batch_size"],
                               lr=r["lr"], seed=r["seed"], device=cfg.device,
                               precision=r.get("precision", "float32")), task=task)  # older recipes: float32
    return str(path)


def run_validate(cfg: ValidateConfig, progress: bool = True) -> dict:
    from pipeline.lora.adapters import read_adapter_meta
    from pipeline.cache.models import load_model
    from pipeline.lora.evaluate import resampling_unit
    from pipeline.lora.tasks import load_task
    from pipeline.assemble.transfer import check_adapter

    out = as_path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = read_adapter_meta(cfg.adapter)
    if meta is None:
        raise BridgeError(f"--adapter {cfg.adapter}: validate needs cast_lora.json (the training recipe) to "
                          f"retrain the reference on the target; train it with `cast lora train`")
    systems = chosen_systems(cfg)
    need = [s.choice for s in systems if s.bridge or s.key == "weight-space"]
    if not cfg.heads and (need or not cfg.target):
        raise BridgeError(f"--heads is needed for {', '.join(need)} (pass it, or --systems source,proxy,distilled "
                          f"with --target)" if need else "give --heads, or --target with --systems source,proxy,distilled")
    hs = load_heads(cfg.heads) if cfg.heads else None
    lw = read_lora(cfg.adapter)
    for kind in dict.fromkeys(s.bridge for s in systems if s.bridge):  # built later: refuse now, before decoding
        check_adapter(cfg.adapter, lw, hs, kind)
    task_name = cfg.task or (None if cfg.task_file else meta["task"]["name"])
    seed = task_seed(cfg, meta, task_name)
    task = load_task(task_name, cfg.task_file, split="test", seed=seed)
    examples = task.test[:cfg.limit]
    adapters = {f"--adapter {cfg.adapter}": cfg.adapter}
    kept = out / "retrained-target-lora"  # an earlier run's reference, perhaps trained on another split
    if cfg.retrained:
        adapters[f"--retrained {cfg.retrained}"] = cfg.retrained
    elif (kept / "adapter_config.json").exists():
        adapters[f"the reference LoRA kept in {kept} (delete it to retrain)"] = str(kept)
    refuse_overlap(task, examples, cfg, adapters)
    train_task = load_task(task_name, None, split="train", seed=seed) if task_name else None
    if train_task is None and cfg.retrained is None:  # refused before minutes of decoding, not after
        raise BridgeError("--task-file gives only a test split: pass --retrained with a target LoRA trained "
                          "on the matching training file")
    names = ({"source": hs.source["model"], "target": hs.target["model"]} if hs else
             {"source": meta["base"]["name"], "target": cfg.target})
    run = Run(cfg, out, meta, train_task, names, hs)
    t0 = time.perf_counter()
    # Unwrapped copies: the off-task KL is measured against them, and PEFT wraps models in place.
    # The source side is loaded (and its held-out text tokenized) only when one of its rows is scored.
    ref = {side: load_model(hs.index["inputs"][side]["model"] if hs else names[side], device=cfg.device)
           for side in dict.fromkeys(s.side for s in systems)}
    held = {side: heldout_ids(cfg, lm.tokenizer, [hs.source, hs.target] if hs else []) for side, lm in ref.items()}
    run.refs, run.bases = ref, {side: lm.model for side, lm in ref.items()}
    results, ll_cache = {}, ({} if any(s.key == "proxy" for s in systems) else None)
    for s in _scoring_order(systems):
        t_sys = time.perf_counter()
        model, proxy = s.build(run)
        lm = ref[s.side]
        identity = None if lm.info.weights_hash.startswith("hub:") else f"{lm.info.weights_hash}@{lm.device}"
        # The target base's answer logits are kept for the proxy, scored next on the same model
        # object (it adds its shift to them), then dropped.
        shares = s.key == "target-base" or (s.key == "proxy" and model is run.bases["target"])
        shared = ll_cache if shares else None
        results[s.key] = score_system(model, lm.tokenizer, task, lm.model, held[s.side], cfg, progress, proxy,
                                      base_identity=identity, ll_cache=shared)
        # Where a validate's minutes go: building (the reference LoRA's training, a transfer, an
        # export) and scoring, per row; the rows scored first also pay the models' loading.
        run.notes.setdefault(s.key, {})["seconds"] = round(time.perf_counter() - t_sys, 1)
        print(f"[cast] {s.label:<34} {results[s.key].summary()} ({run.notes[s.key]['seconds']:.0f} s)",
              file=sys.stderr)
        if s.key == "proxy":
            ll_cache = None
    resampled = resampling_unit(examples) | {"groups": [e.unit for e in examples]}
    return write_report(cfg, task.name, systems, results, out, time.perf_counter() - t0, run.names["source"],
                        run.names["target"], resampled, run.notes)
