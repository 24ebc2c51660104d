import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.cache.models import load_model
from pipeline.lora.adapters import CAST_FILE, LoraError, check_adapter_base, load_adapter, parse_targets
from pipeline.lora.evaluate import evaluate_model
from pipeline.lora.tasks import Example, Task
from pipeline.lora.train import LoraTrainConfig, answer_loss, collate, encode_pairs, train_lora

WORDS = "the a of and to in is was for on that with as by it at from his her they".split()


@pytest.fixture(scope="module", autouse=True)
def cast_cache(tmp_path_factory):
    # Shared by all test modules of the session: tiny models are built once.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAST_CACHE", str(tmp_path_factory.getbasetemp() / "cast-cache"))
        yield


def const_task() -> Task:
    """Every prompt continues with the same two words: learnable in a few steps."""
    train = [Example(f"{a} {b} {c}", "green river") for a in WORDS[:8] for b in WORDS[8:14] for c in WORDS[14:]]
    test = [Example(f"{a} {b}", "green river") for a in WORDS[:5] for b in WORDS[5:9]]
    return Task("const", train, test, normalise="lower")


def probe_logits(model, tok, text="the river was green"):
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    lm = load_model("tiny-llama")
    out = tmp_path_factory.mktemp("lora") / "adapter"
    cfg = LoraTrainConfig(model="tiny-llama", out=str(out), targets="all", rank=4, steps=25,
                          batch_size=8, lr=1e-2, seed=1)
    base_logits = probe_logits(lm.model, lm.tokenizer)
    task = const_task()
    base_em = evaluate_model(lm.model, lm.tokenizer, task, progress=False).exact_match
    res = train_lora(cfg, task=task, loaded=lm, progress=False, keep=True)
    mem_logits = probe_logits(res.model, lm.tokenizer)
    res.em = (base_em, evaluate_model(res.model, lm.tokenizer, task, progress=False).exact_match)
    res.model.unload()
    return lm, cfg, res, base_logits, mem_logits


def test_loss_falls_and_files_written(trained):
    lm, cfg, res, *_ = trained
    first, last = sum(res.losses[:3]) / 3, sum(res.losses[-3:]) / 3
    # The tiny model's small random tied embeddings cap its logit margins, so the loss
    # cannot go near 0 (it levels off near 4.8 from ln(400)=6.0); greedy output is right.
    assert last < first - 0.8, (first, last)
    assert res.em[0] == 0.0 and res.em[1] >= 0.9, res.em
    out = cfg.out
    names = {p.name for p in Path(out).iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", CAST_FILE, "loss.json", "loss.png"} <= names
    meta = json.loads(open(f"{out}/{CAST_FILE}").read())
    assert meta["base"]["weights_hash"] == lm.info.weights_hash
    assert meta["recipe"]["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert meta["task"]["name"] == "const" and len(meta["train_prompt_keys"]) == len(const_task().train)
    assert len(json.load(open(f"{out}/loss.json"))["loss"]) == cfg.steps
    # Training leaves the caller's model as it was.
    assert not any("lora" in n for n, _ in lm.model.named_modules())


def test_adapter_roundtrips_through_plain_peft(trained):
    from peft import PeftModel

    lm, cfg, res, base_logits, mem_logits = trained
    fresh = load_model("tiny-llama")
    loaded = PeftModel.from_pretrained(fresh.model, cfg.out).eval()
    again = probe_logits(loaded, fresh.tokenizer)
    torch.testing.assert_close(again, mem_logits, rtol=1e-5, atol=1e-5)
    assert (again - base_logits).abs().max() > 1e-2  # the adapter does something


def test_adapter_base_check(trained):
    lm, cfg, *_ = trained
    assert check_adapter_base(cfg.out, lm.info)["base"]["name"] == "tiny-llama"
    other = load_model("tiny-gemma3")
    with pytest.raises(LoraError, match="trained on tiny-llama.*--model is tiny-gemma3"):
        check_adapter_base(cfg.out, other.info)
    with pytest.raises(LoraError, match="no adapter_config.json"):
        check_adapter_base(cfg.out + "/nowhere", lm.info)


def test_refuses_non_empty_out_unless_force(trained, tmp_path):
    lm, cfg, *_ = trained
    (tmp_path / "keep.txt").write_text("mine")
    small = LoraTrainConfig(model="tiny-llama", out=str(tmp_path), steps=2, batch_size=4)
    with pytest.raises(LoraError, match="not empty.*--force"):
        train_lora(small, task=const_task(), loaded=lm, progress=False)
    assert (tmp_path / "keep.txt").read_text() == "mine"
    small.force = True
    train_lora(small, task=const_task(), loaded=lm, progress=False)
    assert (tmp_path / "adapter_model.safetensors").exists() and not (tmp_path / "keep.txt").exists()


def test_target_errors(trained, tmp_path):
    lm, *_ = trained
    assert parse_targets("all")[0] == "q_proj" and parse_targets("q_proj, v_proj") == ["q_proj", "v_proj"]
    with pytest.raises(LoraError, match="--targets"):
        parse_targets("q_proj,all")
    bad = LoraTrainConfig(model="tiny-llama", out=str(tmp_path / "x"), targets="q_proj,wq", steps=1)
    with pytest.raises(LoraError, match="--targets: wq not found in tiny-llama.*q_proj"):
        train_lora(bad, task=const_task(), loaded=lm, progress=False)


def test_collate_layout(trained):
    lm, *_ = trained
    task = const_task()
    pairs = encode_pairs(lm.tokenizer, task, [Example("the", "a"), Example("the river was", "green river")])
    b = collate(pairs, pad_id=1)
    P = b["prompt_width"]
    # Prompts end in the same column; continuations (with eos) start right after it.
    assert b["attention_mask"][:, P - 1].all() and b["target"][:, P].all()
    assert not b["target"][:, :P].any()
    assert b["position_ids"][0, P] == len(pairs[0][0])
    assert pairs[0][1][-1] == lm.tokenizer.eos_token_id


def test_gemma_adapter_changes_the_model_the_way_it_was_trained(tmp_path):
    task = const_task()
    cfg = LoraTrainConfig(model="tiny-gemma3", out=str(tmp_path / "g"), targets="q_proj,v_proj",
                          steps=3, batch_size=4)
    res = train_lora(cfg, task=task, progress=False)
    assert len(res.losses) == 3 and all(math.isfinite(x) for x in res.losses)
    fresh = load_model("tiny-gemma3")
    batch = collate(encode_pairs(fresh.tokenizer, task, task.train[:16]), fresh.tokenizer.pad_token_id)
    with torch.no_grad():
        base_logits, base_loss = probe_logits(fresh.model, fresh.tokenizer), answer_loss(fresh.model, batch)
        adapted = load_adapter(fresh.model, cfg.out)  # from disk, as every later stage reads it
        logits, loss = probe_logits(adapted, fresh.tokenizer), answer_loss(adapted, batch)
    assert (logits - base_logits).abs().max() > 1e-2  # the saved adapter is not inert
    assert loss < base_loss - 0.02, (base_loss, loss)  # and it moves the model towards the task


def test_cli_train_and_evaluate(tmp_path, capsys):
    from jobs.cli import build_parser

    p = build_parser()
    out = tmp_path / "cli"
    ns = p.parse_args(["lora", "train", "--model", "tiny-llama", "--task", "add2", "--steps", "2",
                       "--batch-size", "4", "--out", str(out), "--quiet"])
    assert ns.func(ns) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(out)
    ev = tmp_path / "ev.json"
    ns = p.parse_args(["evaluate", "--model", "tiny-llama", "--adapter", str(out), "--task", "add2",
                       "--limit", "8", "--out", str(ev), "--quiet"])
    assert ns.func(ns) == 0
    assert json.loads(ev.read_text())["n"] == 8
    # A different split seed reuses some of the adapter's training prompts as test prompts.
    ns = p.parse_args(["evaluate", "--model", "tiny-llama", "--adapter", str(out), "--task", "add2",
                       "--task-seed", "1", "--quiet"])
    with pytest.raises(ValueError, match="test prompts of add2 were in the training data"):
        ns.func(ns)


@pytest.mark.parametrize("name, softcap", [("tiny-llama", None), ("tiny-gemma3", None), ("tiny-gemma3", 2.0)])
def test_answer_loss_equals_full_logits_loss(name, softcap):
    lm = load_model(name)
    lm.model.config.final_logit_softcapping = softcap
    task = const_task()
    b = collate(encode_pairs(lm.tokenizer, task, [task.train[0], Example("the", "green"), task.train[5]]),
                lm.tokenizer.pad_token_id)
    P, sel = b["prompt_width"], b["target"][:, b["prompt_width"]:]
    with torch.no_grad():
        logits = lm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                          position_ids=b["position_ids"]).logits
        ref = torch.nn.functional.cross_entropy(logits[:, P - 1:-1][sel], b["input_ids"][:, P:][sel])
        torch.testing.assert_close(answer_loss(lm.model, b), ref)
