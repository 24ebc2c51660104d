"""`cast run` end to end on tiny models: every stage runs, the bridge it builds acts on
the target, a re-run resumes."""
from __future__ import annotations

import json

import torch

from jobs.cli import main
from pipeline.assemble.transfer import load_bridged, needed_heads
from pipeline.cache.models import load_model


def test_cast_run_on_tiny_models_then_resume(tmp_path, corpus_dir, capsys):
    argv = ["run", "--out", str(tmp_path / "run"), "--source", "tiny-llama", "--target", "tiny-gemma3",
            "--corpus", str(corpus_dir), "--max-tokens", "900", "--tasks", "add2", "--lora-steps", "3",
            "--head-epochs", "1", "--head-hidden", "16", "--limit", "6", "--workers", "0", "--distill-steps", "3",
            "--task-workers", "0", "--quiet"]
    assert main(argv) == 0
    run = tmp_path / "run"
    report = json.loads((run / "validate" / "add2" / "report.json").read_text())
    assert list(report["systems"]) == ["source-base", "source-lora", "target-base", "retrained", "mlp", "ridge",
                                       "exported", "weight-space", "proxy", "distilled"]
    assert report["n"] == 6 and report["group"] == "skill"
    assert {"recovery", "ratio", "ll_recovery"} <= set(report["transfer"]["mlp"])
    assert all(report["systems"][k]["offtask"]["tokens"] > 0 for k in report["transfer"])
    for f in ("report.md", "report.png"):
        assert (run / "validate" / "add2" / f).stat().st_size > 0
    assert "target + CAST (ridge)" in (run / "report.md").read_text()
    summary = json.loads((run / "run.json").read_text())  # where the run's time went, stage by stage
    assert list(summary["timings"]) == ["lora add2", "extract source", "verify source", "extract target",
                                        "verify target", "align", "layermap", "train heads",
                                        "distill and validate"]
    assert list(summary["tasks"]["add2"]) == ["distill add2", "validate add2"]
    assert all(s > 0 for s in [*summary["timings"].values(), *summary["tasks"]["add2"].values()])
    assert sum(summary["tasks"]["add2"].values()) <= summary["timings"]["distill and validate"]
    assert 0 <= summary["unaccounted_seconds"] < summary["seconds"]
    assert summary["extraction"]["target"]["extracted_tokens"] > 0
    heads = json.loads((run / "heads" / "index.json").read_text())
    assert {h["spec"]["site"] for h in heads["heads"]} == {"attn_in", "q_proj.out", "v_proj.out"}
    fitted = {(h["spec"]["kind"], h["spec"]["direction"], h["spec"]["site"]) for h in heads["heads"]}
    assert fitted == {(k, d, s) for k in ("mlp", "ridge") for d, s in needed_heads(["q_proj", "v_proj"], k)}
    # The bridged targets validate scored are not the plain target: the heads carry the
    # source LoRA's change into the target's forward pass (finite, and not zero).
    ids = torch.tensor([[2, 17, 42, 99, 3, 150, 7, 8]])
    with torch.no_grad():
        plain = load_model("tiny-gemma3").model(input_ids=ids).logits
        for kind in ("mlp", "ridge"):
            bridged = load_bridged(run / "validate" / "add2" / f"bridged-{kind}")
            assert bridged.info.name == "tiny-gemma3"
            change = (bridged.model(input_ids=ids).logits - plain).abs()
            assert torch.isfinite(change).all() and change.max() > 1e-2, (kind, change.max())

    # The proxy across two tokenizers: many tokens pair up, the LoRA's change reaches the
    # target's logits, and the documented plain generate() call applies exactly that change.
    proxied = load_bridged(run / "validate" / "add2" / "bridged-proxy")
    assert len(proxied.proxy.ids_t) > 100
    prompt = "12+34="
    enc = proxied.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        gen = proxied.model.generate(**enc, logits_processor=proxied.logits_processor, max_new_tokens=1,
                                     do_sample=False, output_scores=True, return_dict_in_generate=True)
        plain = proxied.model(**enc).logits[0, -1]
    shift = proxied.proxy.shift([prompt], plain.shape[-1])[0]
    assert shift.abs().max() > 1e-3
    assert torch.allclose(gen.scores[0][0], plain + shift, atol=1e-4)

    capsys.readouterr()
    assert main(argv) == 0  # resumes: nothing is recomputed
    err = capsys.readouterr().err
    assert "0 to train" in err and "LoRA on" not in err and "validate add2" not in err and "distill add2" not in err
    assert json.loads((run / "distilled" / "add2" / "cast_distill.json").read_text())["data"]["salience_from"].startswith(
        "store")

    # The same task's validation again, on a Ray worker (as `cast run` runs tasks side by
    # side by default): the same report, the distilled LoRA reused, not made again.
    first = (run / "validate" / "add2" / "report.json").read_text()
    import shutil

    shutil.rmtree(run / "validate" / "add2")
    assert main([*argv[:-3], "--task-workers", "1", "--quiet"]) == 0
    again = json.loads((run / "validate" / "add2" / "report.json").read_text())
    assert list(json.loads((run / "run.json").read_text())["tasks"]["add2"]) == ["validate add2"]
    before = json.loads(first)["systems"]
    assert list(again["systems"]) == list(before)
    for k, v in again["systems"].items():  # one torch thread there: the same answers, logits to rounding
        assert v["correct"] == before[k]["correct"], k
        assert abs(v["answer_ll"] - before[k]["answer_ll"]) < 1e-3, k
