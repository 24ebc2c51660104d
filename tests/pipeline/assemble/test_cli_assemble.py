"""`cast transfer`, `cast generate` and `cast validate` through the CLI.

The head set bridges tiny-llama onto itself through identity heads, so the right answer
is known: the bridged model is the model plus the source LoRA, and every transferred
system of the report must predict what `source + LoRA` predicts.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from jobs.cli import main
from pipeline.cache.models import load_model
from pipeline.lora.adapters import load_adapter
from pipeline.lora.tasks import builtin_task
from tests.pipeline.assemble.bridge_fixtures import identity_heads, random_adapter, sites_for

PROMPTS = ["12+34=", "7+8="]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("assemble")
    heads = identity_heads(root / "heads", "tiny-llama", "mlp,ridge", sites_for(["q_proj", "v_proj"]))
    lora = root / "lora"
    # A bfloat16 base while it trains: the retrained reference must follow the recipe.
    assert main(["lora", "train", "--model", "tiny-llama", "--task", "add2", "--steps", "20", "--lr", "1e-2",
                 "--batch-size", "8", "--out", str(lora), "--precision", "bfloat16", "--quiet"]) == 0
    return {"root": root, "heads": str(heads), "lora": str(lora)}


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("kind", ["ridge", "proxy"])
def test_transfer_then_generate_is_the_model_plus_its_lora(made, tmp_path, capsys, kind):
    code, out, _ = run(capsys, "transfer", "--adapter", made["lora"], "--heads", made["heads"],
                       "--out", tmp_path / "b", "--kind", kind)
    assert code == 0
    assert json.loads(out) == {"out": str(tmp_path / "b"), "target": "tiny-llama", "source": "tiny-llama",
                               "head_kind": kind, "adapters": [made["lora"]]}
    code, out, _ = run(capsys, "generate", tmp_path / "b", *(a for p in PROMPTS for a in ("--prompt", p)),
                       "--max-new-tokens", 4)
    assert code == 0
    lm = load_model("tiny-llama")
    peft = load_adapter(lm.model, made["lora"])
    want = []
    for prompt in PROMPTS:
        ids = lm.tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            gen = peft.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
        want.append(prompt + lm.tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    assert out == "\n".join(want) + "\n"


def test_a_proxy_needs_no_heads(made, tmp_path, capsys):
    code, _, err = run(capsys, "transfer", "--adapter", made["lora"], "--out", tmp_path / "p", "--kind", "proxy")
    assert code == 2 and "--kind proxy needs the target model" in err
    assert run(capsys, "transfer", "--adapter", made["lora"], "--out", tmp_path / "p", "--kind", "proxy",
               "--target", "tiny-llama")[0] == 0
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["kind"] == "cast.proxy" and not (tmp_path / "p" / "heads").exists()
    code, out, _ = run(capsys, "generate", tmp_path / "p", "--prompt", PROMPTS[0], "--max-new-tokens", 4)
    assert code == 0 and out.startswith(PROMPTS[0])
    # validate's proxy row runs on the target already in memory, not on a second copy of it
    from pipeline.assemble.bridge import BridgeError
    from pipeline.assemble.transfer import load_bridged
    base = load_model("tiny-llama")
    shared = load_bridged(tmp_path / "p", loaded=base)
    assert shared.model is base.model and shared.proxy is not None and base.proxy is None
    code, _, err = run(capsys, "transfer", "--adapter", made["lora"], "--out", tmp_path / "r", "--kind", "ridge")
    assert code == 2 and "--kind ridge needs --heads" in err
    assert run(capsys, "transfer", "--adapter", made["lora"], "--heads", made["heads"], "--out", tmp_path / "r",
               "--kind", "ridge")[0] == 0
    with pytest.raises(BridgeError, match="needs a copy of its own"):
        load_bridged(tmp_path / "r", loaded=base)


def test_transfer_refusals_are_messages(made, tmp_path, capsys):
    code, _, err = run(capsys, "transfer", "--adapter", f"{made['lora']},{made['lora']}", "--heads", made["heads"],
                       "--out", tmp_path / "x", "--kind", "proxy")
    assert code == 2 and "--kind proxy carries one adapter" in err
    assert run(capsys, "transfer", "--adapter", made["lora"], "--heads", made["heads"], "--out", tmp_path / "p",
               "--kind", "proxy")[0] == 0
    code, _, err = run(capsys, "generate", tmp_path / "p", "--prompt", "")
    assert code == 2 and "every prompt needs at least one character" in err
    code, _, err = run(capsys, "export", tmp_path / "p", "--out", tmp_path / "x")
    assert code == 2 and "is a logit proxy" in err
    code, _, err = run(capsys, "validate", "--adapter", made["lora"], "--heads", made["heads"], "--out",
                       tmp_path / "v", "--systems", "ridge,bogus")
    assert code == 2 and "--systems ridge,bogus" in err and not (tmp_path / "v" / "report.json").exists()
    code, _, err = run(capsys, "transfer", "--adapter", tmp_path, "--heads", made["heads"], "--out", tmp_path / "x")
    assert code == 2 and "expected a PEFT adapter directory" in err
    code, _, err = run(capsys, "transfer", "--adapter", made["lora"], "--heads", tmp_path, "--out", tmp_path / "x")
    assert code == 2 and "is not a head set" in err
    assert not (tmp_path / "x").exists()


def test_validate_on_a_self_bridge_reproduces_the_lora(made, tmp_path, capsys, corpus_dir):
    out = tmp_path / "report"
    code, stdout, _ = run(capsys, "validate", "--adapter", made["lora"], "--heads", made["heads"], "--out", out,
                          "--limit", 8, "--quiet", "--corpus", corpus_dir, "--offtask-sequences", 2)
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 8 and "| target + CAST (mlp) |" in stdout
    # Exact-match recovery leads the table; the answer LL's recovery follows.
    assert "| system | EM recovery [95% CI] | exact match [95% CI] | LL recovery [95% CI] |" in stdout
    assert report["resampled"] == {"unit": "example", "count": 8, "examples": 8}
    preds = {f.stem: [p["prediction"] for p in json.loads(f.read_text())["predictions"]]
             for f in (out / "predictions").glob("*.json")}
    lora = preds.pop("source-lora")
    assert lora != preds["source-base"]  # the LoRA changes what the model says
    assert set(preds) == {"source-base", "target-base", "retrained", "mlp", "ridge", "exported", "weight-space",
                          "proxy"}
    for system in ("mlp", "ridge", "exported", "retrained", "weight-space", "proxy"):
        assert preds[system] == lora, system
    recipe = json.loads((out / "retrained-target-lora" / "cast_lora.json").read_text())["recipe"]
    assert recipe["precision"] == "bfloat16"  # the source's recipe, number format included
    assert (out / "bridged-mlp" / "manifest.json").exists() and (out / "report.png").stat().st_size > 0
    # The exported row names how the constant term was handled, and how faithful the export is.
    exported = report["systems"]["exported"]
    assert exported["label"] == "target + CAST exported (absorb)" and "| target + CAST exported (absorb) |" in stdout
    assert "absorbed into one more rank" in exported["method"]
    assert exported["fidelity"]["vs_bridged"]["top1_agreement"] == 1.0
    assert "against the bridge it was exported from" in stdout
    # The continuous measures agree: every transferred system scores the answers as the
    # source + LoRA does, and moves off-task text away from its base as much, measured at the
    # same positions for every system (the proxy included).
    systems = report["systems"]
    want = systems["source-lora"]
    assert want["answer_ll"] > systems["source-base"]["answer_ll"] + 1.0
    assert want["offtask"]["kl_to_base"] > 1e-4 and systems["target-base"]["offtask"] is None
    for name in ("mlp", "ridge", "weight-space", "proxy"):
        assert systems[name]["offtask"]["tokens"] == want["offtask"]["tokens"], name
        assert systems[name]["answer_ll"] == pytest.approx(want["answer_ll"], abs=1e-3), name
        assert systems[name]["offtask"]["kl_to_base"] == pytest.approx(want["offtask"]["kl_to_base"], rel=1e-2), name
        assert report["transfer"][name]["ll_recovery"]["value"] == pytest.approx(1.0, abs=1e-3)
    assert "| LL recovery [95% CI] |" in stdout
    # Where the minutes went: every row's own seconds, within the run's. Rows are rounded to
    # 0.1 s and the run is not: on tiny models (about a second in all) the rounding of ten
    # rows can add up to more than the run (CI saw 1.3 against 1.269), so each row may be
    # up to 0.05 s over.
    seconds = [s["seconds"] for s in systems.values()]
    assert all(x >= 0 for x in seconds) and sum(seconds) <= report["seconds"] + 0.05 * len(seconds)
    timed = next(line for line in stdout.splitlines() if line.startswith("Seconds per system"))
    assert all(s["label"] in timed for s in systems.values())


def test_validate_without_decoding_keeps_the_continuous_measures(made, tmp_path, capsys, corpus_dir):
    out = tmp_path / "report"
    code, stdout, _ = run(capsys, "validate", "--adapter", made["lora"], "--heads", made["heads"], "--out", out,
                          "--limit", 6, "--quiet", "--no-decode", "--corpus", corpus_dir, "--offtask-sequences", 2,
                          "--retrained", made["lora"], "--systems", "ridge,proxy")
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["systems"]) == ["target-base", "retrained", "ridge", "proxy"]
    assert not (out / "predictions").exists() and not (out / "report.png").exists()
    assert all("exact_match" not in s for s in report["systems"].values())
    ridge = report["transfer"]["ridge"]
    assert set(ridge) == {"ll_recovery"} and ridge["ll_recovery"]["value"] == pytest.approx(1.0, abs=1e-3)
    assert len(json.loads((out / "answer_ll" / "ridge.json").read_text())) == 6


def test_validate_records_and_passes_on_the_bridge_settings(made, tmp_path, capsys):
    """What the suspects script runs: the bridge rows alone, answer LL only, with --first-token and
    --carry given; both reach the bridged artifact and report.json, and the proxy row ignores them."""
    out = tmp_path / "report"
    code, _, err = run(capsys, "validate", "--adapter", made["lora"], "--heads", made["heads"], "--out", out,
                       "--limit", 4, "--quiet", "--no-decode", "--offtask-sequences", 0, "--retrained", made["lora"],
                       "--systems", "mlp,proxy", "--first-token", "keep", "--carry", "mapped")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert (report["config"]["first_token"], report["config"]["carry"]) == ("keep", "mapped")
    manifest = json.loads((out / "bridged-mlp" / "manifest.json").read_text())
    assert (manifest["first_token"], manifest["carry"]) == ("keep", "mapped")
    assert "first_token" not in json.loads((out / "bridged-proxy" / "manifest.json").read_text())
    # tiny-llama has no <bos>: leaving each prompt's first token unchanged loses part of the LoRA.
    assert report["transfer"]["mlp"]["ll_recovery"]["value"] < 0.999
    assert report["transfer"]["proxy"]["ll_recovery"]["value"] == pytest.approx(1.0, abs=1e-3)


def test_validate_refuses_before_decoding(made, tmp_path, capsys):
    def refused(adapter, heads, *more) -> str:
        out = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
        code, _, err = run(capsys, "validate", "--adapter", adapter, "--heads", heads, "--out", out, *more)
        assert code == 2 and not (out / "report.json").exists()
        assert "exact match" not in err  # refused before any system was scored
        return err

    plain = tmp_path / "plain"  # a PEFT adapter from elsewhere: no recipe to retrain the reference with
    shutil.copytree(made["lora"], plain)
    (plain / "cast_lora.json").unlink()
    assert "validate needs cast_lora.json" in refused(plain, made["heads"])

    tests = tmp_path / "test.jsonl"
    tests.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    assert "--task-file gives only a test split: pass --retrained" in refused(made["lora"], made["heads"],
                                                                             "--task-file", tests)

    assert "--proxy-plausible 1.0: a fraction" in refused(made["lora"], made["heads"], "--proxy-plausible", 1)
    assert "--proxy-others 'all': choose" in refused(made["lora"], made["heads"], "--proxy-others", "all")

    ridge_only = identity_heads(tmp_path / "ridge", "tiny-llama", "ridge", sites_for(["q_proj", "v_proj"]))
    assert "no mlp heads for: encoder attn_in" in refused(made["lora"], ridge_only)

    # No silent leak: test prompts the adapter trained on are refused, counted ... (`fast`: were a
    # refusal missing, the run would end in seconds and the assertion fail, not decode for minutes)
    fast = ("--no-decode", "--offtask-sequences", 0, "--systems", "ridge")
    lora_meta = json.loads((Path(made["lora"]) / "cast_lora.json").read_text())
    trained = builtin_task("add2", seed=lora_meta["task"]["seed"]).train
    leaky = tmp_path / "leaky.jsonl"
    leaky.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n" for e in trained[:3])
                     + json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    err = refused(made["lora"], made["heads"], "--task-file", leaky, "--retrained", made["lora"], *fast)
    assert f"--adapter {made['lora']} was trained on 3 of the 4 test prompts of --task-file {leaky}" in err
    # ... the split is the adapter's own: another --task-seed for its task is refused ...
    assert ("--task-seed 3: --adapter " + made["lora"] + " was trained on add2 with seed 0") in refused(
        made["lora"], made["heads"], "--task-seed", 3, *fast)
    # ... and the seed it recorded is the one used: an adapter whose record says seed 7 is scored on
    # seed 7's test split, which shares prompts with the seed-0 training set it really holds.
    reseeded = tmp_path / "reseeded"
    shutil.copytree(made["lora"], reseeded)
    (reseeded / "cast_lora.json").write_text(json.dumps({**lora_meta, "task": {**lora_meta["task"], "seed": 7}}))
    seven = builtin_task("add2", seed=7).test[:200]
    clash = len({e.prompt for e in seven} & {e.prompt for e in trained})
    assert clash > 0 and f"was trained on {clash} of the 200 test prompts of task add2" in refused(
        reseeded, made["heads"], *fast)

    other = random_adapter(tmp_path / "other", "tiny-gemma3", ["q_proj", "v_proj"])
    (other / "cast_lora.json").write_text(json.dumps({"base": {"name": "tiny-gemma3", "weights_hash": "abc"},
                                                      "task": {"name": "add2"}, "recipe": {}}))
    assert "was trained on tiny-gemma3, but --heads" in refused(other, made["heads"])


def test_validate_needs_heads_only_for_the_systems_that_use_them(made, tmp_path, capsys, corpus_dir):
    code, _, err = run(capsys, "validate", "--adapter", made["lora"], "--target", "tiny-llama", "--out", tmp_path / "v",
                       "--systems", "ridge,proxy")
    assert code == 2 and "--heads is needed for ridge" in err
    code, _, _ = run(capsys, "validate", "--adapter", made["lora"], "--target", "tiny-llama", "--out", tmp_path / "v",
                     "--systems", "proxy", "--limit", 4, "--no-decode", "--retrained", made["lora"], "--corpus",
                     corpus_dir, "--offtask-sequences", 2, "--proxy-others", "none", "--quiet")
    assert code == 0
    report = json.loads((tmp_path / "v" / "report.json").read_text())
    assert report["transfer"]["proxy"]["ll_recovery"]["value"] == pytest.approx(1.0, abs=1e-3)  # same model
    assert json.loads((tmp_path / "v" / "bridged-proxy" / "manifest.json").read_text())["others"] == "none"
