"""`cast run` end to end on tiny models: every stage runs, a re-run resumes."""
from __future__ import annotations

import json

from jobs.cli import main


def test_cast_run_on_tiny_models_then_resume(tmp_path, corpus_dir, capsys):
    argv = ["run", "--out", str(tmp_path / "run"), "--source", "tiny-llama", "--target", "tiny-gemma3",
            "--corpus", str(corpus_dir), "--max-tokens", "900", "--tasks", "add2", "--lora-steps", "3",
            "--head-epochs", "1", "--head-hidden", "16", "--limit", "6", "--workers", "0", "--quiet"]
    assert main(argv) == 0
    run = tmp_path / "run"
    report = json.loads((run / "validate" / "add2" / "report.json").read_text())
    assert set(report["systems"]) == {"source base", "source + LoRA", "target base", "target + retrained LoRA",
                                      "target + CAST (mlp)", "target + CAST (ridge)", "target + weight-space"}
    assert report["n"] == 6
    assert {"recovery", "ratio"} <= set(report["transfer"]["target + CAST (mlp)"])
    for f in ("report.md", "report.png"):
        assert (run / "validate" / "add2" / f).stat().st_size > 0
    assert "target + CAST (ridge)" in (run / "report.md").read_text()
    heads = json.loads((run / "heads" / "index.json").read_text())
    assert {h["spec"]["site"] for h in heads["heads"]} == {"attn_in", "q_proj.out", "v_proj.out"}

    capsys.readouterr()
    assert main(argv) == 0  # resumes: nothing is recomputed
    err = capsys.readouterr().err
    assert "0 to train" in err and "LoRA on" not in err and "validate add2" not in err
