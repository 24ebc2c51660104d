"""`cast export`: a ridge bridge folds into a PEFT LoRA with the bridge's logits, loads with
plain peft in a fresh process, merges; an mlp bridge is distilled, resumably; bad input is
refused with a message."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from jobs.cli import main
from pipeline.assemble.bridge import BridgeError
from heads.modules import HeadConfig, ProjectionHead
from pipeline.assemble.export import EXPORT_FILE, ExportConfig, absorb, export_peft
from pipeline.assemble.transfer import TransferConfig, load_bridged, run_transfer
from pipeline.cache.models import load_model
from pipeline.lora.adapters import load_adapter
from tests.pipeline.assemble.bridge_fixtures import random_adapter, random_heads, sites_for

SRC, TGT = "tiny-llama", "tiny-gemma3"
TARGETS = ["q_proj", "v_proj"]
MAPPING = {0: 0, 1: 2, 2: 3}  # with --carry all, source layers 0 and 1 both land on target layer 0
IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def bridged_artifact(root, kind="ridge", carry="all", offsets=True):
    heads = random_heads(root / "heads", SRC, TGT, kind, sites_for(TARGETS), MAPPING, offsets=offsets)
    adapter = random_adapter(root / "lora", SRC, TARGETS)
    run_transfer(TransferConfig(adapter=str(adapter), heads=str(heads), out=str(root / "b"), kind=kind, carry=carry))
    return root / "b"


@pytest.mark.parametrize("carry,offsets,rank", [("mapped", False, 4), ("all", False, 8), ("all", True, 8)])
def test_ridge_export_has_the_bridged_logits(tmp_path, carry, offsets, rank):
    """One and several carried source layers; with offsets the constant term rides as lora_bias."""
    bridged = bridged_artifact(tmp_path, carry=carry, offsets=offsets)
    info = export_peft(ExportConfig(bridged=str(bridged), out=str(tmp_path / "x"), bias=offsets, absorb=False,
                                    eval_sequences=0))
    assert info["rank"] == rank and info["method"].startswith("ridge fold, constant term ")
    assert info["method"].endswith("(exact)")
    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert cfg["r"] == rank and cfg["lora_alpha"] == rank and cfg["lora_bias"] is offsets
    assert cfg["base_model_name_or_path"] == load_model(TGT).info.path
    want = logits(load_bridged(bridged).model)
    base = logits(load_model(TGT).model)
    assert (want - base).abs().max() > 1e-2  # the bridge really changes the output
    torch.testing.assert_close(logits(load_adapter(load_model(TGT).model, tmp_path / "x")), want,
                               rtol=0, atol=1e-4)
    norms = info["constant_term"]["norm"]
    assert (max(norms.values()) > 1e-2) is offsets and len(norms) == 2 * len(MAPPING)
    prov = json.loads((tmp_path / "x" / EXPORT_FILE).read_text())
    assert prov["kind"] == "cast.export" and prov["target"]["model"] == TGT and len(prov["heads"]["sha256"]) == 64
    assert prov["adapters"][0]["sha256"] == info["adapters"][0]["sha256"]


FRESH = textwrap.dedent("""
    import json, sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base, adapter, ids = sys.argv[1], sys.argv[2], torch.tensor(json.loads(sys.argv[3]))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    with torch.no_grad():
        peft = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    ours = sorted({m.split(".")[0] for m in sys.modules} & {"pipeline", "heads", "storage", "jobs", "runtime", "bench"})
    print(json.dumps({"peft": peft.tolist(), "merged": merged.tolist(), "ours": ours}))
""")


def test_export_loads_in_a_fresh_process_with_plain_peft_and_merges(tmp_path):
    bridged = bridged_artifact(tmp_path, offsets=False)
    export_peft(ExportConfig(bridged=str(bridged), out=str(tmp_path / "x"), eval_sequences=0))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", FRESH, load_model(TGT).info.path, str(tmp_path / "x"),
                          json.dumps(IDS.tolist())], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["ours"] == []  # nothing of this project was imported
    want = logits(load_bridged(bridged).model)
    torch.testing.assert_close(torch.tensor(got["peft"]), want, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor(got["merged"]), want, rtol=0, atol=1e-4)


def test_bias_export_loads_but_cannot_merge_into_bias_free_modules(tmp_path):
    bridged = bridged_artifact(tmp_path)
    export_peft(ExportConfig(bridged=str(bridged), out=str(tmp_path / "x"), bias=True, eval_sequences=0))
    with pytest.raises(RuntimeError, match="base layer has no bias"):
        load_adapter(load_model(TGT).model, tmp_path / "x").merge_and_unload()


def test_rank_cut_and_measured_fidelity(tmp_path, corpus_dir):
    bridged = bridged_artifact(tmp_path)
    text = dict(corpus=str(corpus_dir), seq_len=8, eval_sequences=3, batch_size=2)
    info = export_peft(ExportConfig(bridged=str(bridged), out=str(tmp_path / "x"), rank=3, absorb=False, **text))
    assert info["method"] == "ridge fold, SVD cut to rank 3, constant term dropped"
    assert json.loads((tmp_path / "x" / "adapter_config.json").read_text())["r"] == 3
    assert 0 < info["rank_cut"]["relative_frobenius_error_total"] <= info["rank_cut"]["relative_frobenius_error_max"] < 1
    fid = info["fidelity"]
    assert set(fid) == {"vs_bridged", "dropping_the_constant", "rank_cut"}
    assert fid["vs_bridged"]["tokens"] == 24 and 0 <= fid["vs_bridged"]["top1_agreement"] <= 1
    assert fid["vs_bridged"]["max_abs_logit_diff"] > 0 and fid["dropping_the_constant"]["kl"] > 0
    assert info["constant_term_relative"]["max"] > 0 and info["text"]["heldout"]["sequences"] == 3
    # Carried as lora_bias at full rank the export is the bridge, on text too.
    exact = export_peft(ExportConfig(bridged=str(bridged), out=str(tmp_path / "x"), bias=True, force=True, **text))
    assert exact["fidelity"]["vs_bridged"]["max_abs_logit_diff"] < 1e-4
    assert exact["fidelity"]["vs_bridged"]["top1_agreement"] == 1.0


def test_absorb_fits_the_constant_to_the_input_statistics(tmp_path, corpus_dir):
    """v = S^-1 m / (1 + m'S^-1 m) is the least-squares v for v'x = 1 over inputs of mean m, variance S."""
    g = torch.Generator().manual_seed(0)
    head = ProjectionHead(HeadConfig(kind="ridge", in_dim=6, out_dim=3))
    head.in_mean.copy_(torch.randn(6, generator=g) * 2)
    head.in_std.copy_(torch.rand(6, generator=g) + 0.5)
    a, b, c = torch.randn(4, 6, generator=g).double(), torch.randn(3, 4, generator=g).double(), torch.randn(3).double()
    a1, b1 = absorb(a, b, c, head)
    assert a1.shape == (5, 6) and b1.shape == (3, 5)
    x = head.in_mean.double() + head.in_std.double() * torch.randn(200_000, 6, generator=g).double()
    fit = torch.linalg.lstsq(x, torch.ones(len(x), 1, dtype=torch.float64)).solution[:, 0]
    torch.testing.assert_close(a1[-1], fit, rtol=0.02, atol=0.02)
    torch.testing.assert_close(b1 @ a1, b @ a + c[:, None] * a1[-1][None], rtol=1e-9, atol=1e-9)
    # End to end: one rank more, a plain adapter (no lora_bias) that merges.
    bridged = bridged_artifact(tmp_path)
    info = export_peft(ExportConfig(bridged=str(bridged), out=str(tmp_path / "x"), absorb=True, corpus=str(corpus_dir),
                                    seq_len=8, eval_sequences=2, batch_size=2))
    assert info["rank"] == 9 and info["method"] == "ridge fold, constant term absorbed into one more rank"
    assert set(info["fidelity"]) == {"vs_bridged", "dropping_the_constant"}
    assert json.loads((tmp_path / "x" / "adapter_config.json").read_text())["lora_bias"] is False
    load_adapter(load_model(TGT).model, tmp_path / "x").merge_and_unload()


def test_the_default_export_absorbs_the_constant_and_prints_its_fidelity(tmp_path, corpus_dir, capsys):
    """Dropping the constant term made another model; the default is the most faithful form that merges."""
    bridged = bridged_artifact(tmp_path)
    capsys.readouterr()
    assert main(["export", str(bridged), "--out", str(tmp_path / "x"), "--corpus", str(corpus_dir), "--seq-len", "8",
                 "--eval-sequences", "2", "--batch-size", "2", "--quiet"]) == 0
    out, err = capsys.readouterr()
    info = json.loads(out)
    assert info["method"] == "ridge fold, constant term absorbed into one more rank" and info["rank"] == 9
    assert "the export against the bridge: max |logit diff|" in err and "top-1 agreement" in err
    assert info["fidelity"]["vs_bridged"]["tokens"] == 16
    assert json.loads((tmp_path / "x" / "adapter_config.json").read_text())["lora_bias"] is False
    load_adapter(load_model(TGT).model, tmp_path / "x").merge_and_unload()


def test_mlp_bridge_is_distilled_and_gets_closer(tmp_path, corpus_dir):
    bridged = bridged_artifact(tmp_path, kind="mlp")
    cfg = ExportConfig(bridged=str(bridged), out=str(tmp_path / "x"), corpus=str(corpus_dir), seq_len=8, steps=12,
                       batch_size=2, positions=4, lr=2e-2, eval_sequences=2, checkpoint_every=5)
    info = export_peft(cfg, progress=False)
    assert info["method"].startswith("mlp distillation") and info["rank"] == 8
    start, end = info["fidelity"]["at_start"], info["fidelity"]["vs_bridged"]
    assert end["kl"] < start["kl"]
    assert info["distillation"]["steps"] == 12 and info["text"]["train"]["sequences"] > 0
    assert not (tmp_path / ".tmp-x-distill").exists()  # the checkpoint goes once the export is committed
    held_segments = info["text"]["heldout"]["segments"]
    assert info["text"]["train"]["segments"][1] < held_segments[0]  # held-out text never trained on
    exported = load_adapter(load_model(TGT).model, tmp_path / "x")
    assert (logits(exported) - logits(load_model(TGT).model)).abs().max() > 1e-3


def test_bad_input_is_a_message(tmp_path, capsys):
    bridged = bridged_artifact(tmp_path)

    def refused(*argv) -> str:
        capsys.readouterr()
        assert main(["export", *map(str, argv), "--eval-sequences", "0", "--quiet"]) == 2
        return capsys.readouterr().err

    assert "--rank 9 is above what the update holds: 8" in refused(bridged, "--out", tmp_path / "x", "--rank", 9,
                                                                   "--no-absorb")
    assert "is not a bridged artifact" in refused(tmp_path / "heads", "--out", tmp_path / "x")
    assert "--bias applies to ridge bridges only" in refused(bridged_artifact(tmp_path / "m", kind="mlp"),
                                                             "--out", tmp_path / "x", "--bias")
    assert "above what the update holds: 9 (" in refused(bridged, "--out", tmp_path / "x", "--rank", 10)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert "--out" in refused(bridged, "--out", tmp_path / "full") and (tmp_path / "full" / "keep.txt").exists()
    assert main(["export", str(bridged), "--out", str(tmp_path / "full"), "--force", "--eval-sequences", "0",
                 "--quiet"]) == 0
    assert not (tmp_path / "full" / "keep.txt").exists() and (tmp_path / "full" / EXPORT_FILE).exists()
    head = next((bridged / "heads" / "decoder").rglob("T02-*.safetensors"))
    head.unlink()
    err = refused(bridged, "--out", tmp_path / "y")
    assert "heads/ lacks ridge decoder" in err and "at target layer 2" in err and "re-run `cast transfer`" in err
    (bridged / "heads" / "index.json").unlink()
    assert "its heads are missing" in refused(bridged, "--out", tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
