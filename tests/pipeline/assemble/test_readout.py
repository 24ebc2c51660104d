"""`cast readout` scores what the LoRA reads (A·x), not the whole activation: on stores
where the target holds only part of the source's information, a LoRA that reads the
recoverable part scores R² ≈ 1 and one that reads the lost part scores ≈ 0, while the
whole activation's R² is the same for both."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from heads.run import TrainHeadsConfig, run_train_heads
from jobs.cli import main
from pipeline.assemble.readout import ReadoutConfig, run_readout
from tests.heads.synth import build

M = np.random.default_rng(3).standard_normal((12, 12)) + 3 * np.eye(12)


def first_twelve(x):
    return x[:, :12] @ M  # the target keeps source dims 0-11; dims 12-15 are lost


def adapter(root, a: np.ndarray):
    root.mkdir(parents=True)
    (root / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": a.shape[0], "lora_alpha": 4}))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    save_file({key.format("A"): torch.from_numpy(a).float(), key.format("B"): torch.ones(8, a.shape[0])},
              str(root / "adapter_model.safetensors"))
    return root


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    root = tmp_path_factory.mktemp("readout")
    paths = build(root, first_twelve)
    run_train_heads(TrainHeadsConfig(**paths, out=str(root / "h"), workers=0, directions="encoder", kinds="ridge"),
                    progress=False)
    return root / "h"


def test_readout_scores_what_the_lora_reads(heads, tmp_path):
    kept, lost = np.zeros((2, 16)), np.zeros((2, 16))
    kept[0, 0], kept[1, 5] = 1.0, 1.0
    lost[0, 13], lost[1, 14] = 1.0, 1.0
    rows = {}
    for name, a in (("kept", kept), ("lost", lost)):
        res = run_readout(ReadoutConfig(adapter=str(adapter(tmp_path / name, a)), heads=str(heads),
                                        out=str(tmp_path / f"r-{name}"), kinds="ridge"))
        (row,) = res["rows"]
        assert (row["target_layer"], row["source_layer"], row["module"], row["rank"]) == (0, 0, "q_proj", 2)
        assert res["n_rows"] > 100  # held-out segments only
        rows[name] = row
    assert rows["kept"]["r2_ax"] > 0.99 and abs(rows["kept"]["norm_ratio"] - 1) < 0.02
    assert rows["lost"]["r2_ax"] < 0.05  # the encoder can only predict the mean there
    assert rows["kept"]["r2_x"] == pytest.approx(rows["lost"]["r2_x"])
    assert 0.5 < rows["kept"]["r2_x"] < 0.95  # the whole activation hides both facts


def test_cli_writes_table_json_and_plot(heads, tmp_path, capsys):
    a = np.eye(16)[:3]
    assert main(["readout", "--adapter", str(adapter(tmp_path / "a", a)), "--heads", str(heads),
                 "--out", str(tmp_path / "r"), "--max-rows", "50"]) == 0
    out = capsys.readouterr().out
    assert "R²(A·x)" in out and "| 0 | 0 (0) | q_proj | ridge |" in out and "| mlp |" not in out  # kinds present
    assert json.loads((tmp_path / "r" / "readout.json").read_text())["n_rows"] == 50
    assert (tmp_path / "r" / "readout.png").stat().st_size > 0
    assert main(["readout", "--adapter", str(tmp_path / "a"), "--heads", str(heads), "--out", "x",
                 "--max-rows", "3"]) == 2
    assert "--max-rows" in capsys.readouterr().err
    assert main(["readout", "--adapter", str(tmp_path / "a"), "--heads", str(heads), "--out", "x",
                 "--kinds", "mlp"]) == 2
    assert "--kinds mlp" in capsys.readouterr().err
    assert main(["readout", "--adapter", str(adapter(tmp_path / "other", np.eye(10)[:2])), "--heads", str(heads),
                 "--out", "x"]) == 2
    assert "reads 10 dims" in capsys.readouterr().err
