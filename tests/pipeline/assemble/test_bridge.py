"""The bridge: exact in the identity case, inert for a zero LoRA, and strict on refusal."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline.assemble.bridge import BridgeError, assign_layers
from pipeline.lora.adapters import ALL_TARGETS, load_adapter
from pipeline.cache.models import load_model
from pipeline.assemble.transfer import TransferConfig, load_bridged, run_transfer
from tests.pipeline.assemble.bridge_fixtures import identity_heads, random_adapter, sites_for

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 120, 64]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("kind", ["ridge", "mlp"])
def test_identity_bridge_equals_target_plus_lora(tmp_path, kind):
    targets = list(ALL_TARGETS)
    heads = identity_heads(tmp_path / "heads", "tiny-llama", kind, sites_for(targets))
    adapter = random_adapter(tmp_path / "lora", "tiny-llama", targets)
    run_transfer(TransferConfig(adapter=str(adapter), heads=str(heads), out=str(tmp_path / "b"), kind=kind,
                                carry="mapped"))
    bridged = load_bridged(tmp_path / "b")
    want = logits(load_adapter(load_model("tiny-llama").model, adapter))
    base = logits(load_model("tiny-llama").model)
    got = logits(bridged.model)
    assert (want - base).abs().max() > 1e-2  # the LoRA really changes the output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    out = bridged.model.generate(input_ids=IDS, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 3)


def test_zero_lora_leaves_the_target_unchanged(tmp_path):
    heads = identity_heads(tmp_path / "heads", "tiny-llama", "mlp", sites_for(["q_proj", "v_proj"]))
    adapter = random_adapter(tmp_path / "lora", "tiny-llama", ["q_proj", "v_proj"], zero=True)
    run_transfer(TransferConfig(adapter=str(adapter), heads=str(heads), out=str(tmp_path / "b"), kind="mlp"))
    torch.testing.assert_close(logits(load_bridged(tmp_path / "b").model), logits(load_model("tiny-llama").model),
                               rtol=0, atol=0)


def test_two_adapters_compose_as_a_sum(tmp_path):
    heads = identity_heads(tmp_path / "heads", "tiny-llama", "ridge", sites_for(["q_proj", "v_proj"]))
    a = random_adapter(tmp_path / "a", "tiny-llama", ["q_proj", "v_proj"], seed=1)
    b = random_adapter(tmp_path / "b", "tiny-llama", ["q_proj", "v_proj"], seed=2)
    run_transfer(TransferConfig(adapter=f"{a},{b}", heads=str(heads), out=str(tmp_path / "ab"), kind="ridge"))
    # The same sum as one PEFT adapter holding A=[A1;A2], B=[B1 B2] (ranks concatenated).
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model("tiny-llama").model, str(a), adapter_name="a")
    model.load_adapter(str(b), adapter_name="b")
    model.base_model.set_adapter(["a", "b"])
    torch.testing.assert_close(logits(load_bridged(tmp_path / "ab").model), logits(model), rtol=1e-4, atol=1e-4)


def test_refusals(tmp_path):
    heads = identity_heads(tmp_path / "heads", "tiny-llama", "ridge", sites_for(["q_proj", "v_proj"]))
    # A LoRA module the heads do not cover.
    up = random_adapter(tmp_path / "up", "tiny-llama", ["up_proj"])
    with pytest.raises(BridgeError, match=r"adapts up_proj, but --heads .* no ridge heads for: encoder mlp_in, "
                                          r"decoder up_proj.out.*--sites including mlp_in,up_proj.out"):
        run_transfer(TransferConfig(adapter=str(up), heads=str(heads), out=str(tmp_path / "x"), kind="ridge"))
    # A LoRA for another base model (by its recorded base, and by shape).
    other = random_adapter(tmp_path / "other", "tiny-gemma3", ["q_proj", "v_proj"])
    with pytest.raises(BridgeError, match="maps 48 -> 48 dims, but the head set's source model has 64 -> 64"):
        run_transfer(TransferConfig(adapter=str(other), heads=str(heads), out=str(tmp_path / "x"), kind="ridge"))
    (other / "cast_lora.json").write_text(json.dumps({"base": {"name": "tiny-gemma3", "weights_hash": "abc"}}))
    with pytest.raises(BridgeError, match="was trained on tiny-gemma3, but --heads .* bridge from tiny-llama"):
        run_transfer(TransferConfig(adapter=str(other), heads=str(heads), out=str(tmp_path / "x"), kind="ridge"))
    # A head set for other models: the bridged target's weights do not match.
    ok = random_adapter(tmp_path / "ok", "tiny-llama", ["q_proj", "v_proj"])
    run_transfer(TransferConfig(adapter=str(ok), heads=str(heads), out=str(tmp_path / "b"), kind="ridge"))
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    m["target"]["weights_hash"] = "0" * 64
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BridgeError, match="was built for tiny-llama with weights 000000000000"):
        load_bridged(tmp_path / "b")
    # Not an adapter; an existing output is not clobbered.
    with pytest.raises(BridgeError, match="expected a PEFT adapter directory"):
        run_transfer(TransferConfig(adapter=str(tmp_path), heads=str(heads), out=str(tmp_path / "y")))
    with pytest.raises(BridgeError, match="exists and is not empty"):
        run_transfer(TransferConfig(adapter=str(ok), heads=str(heads), out=str(tmp_path / "b"), kind="ridge"))
    dora = tmp_path / "dora"
    shutil.copytree(ok, dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(BridgeError, match="only plain LoRA adapters"):
        run_transfer(TransferConfig(adapter=str(dora), heads=str(heads), out=str(tmp_path / "z")))


def test_layer_assignment_carries_every_source_layer():
    mapping = {0: 0, 1: 4, 2: 9}  # target -> source
    assert assign_layers(list(range(10)), mapping, "mapped") == {0: [0], 1: [4], 2: [9]}
    allm = assign_layers(list(range(10)), mapping, "all")
    assert sorted(s for v in allm.values() for s in v) == list(range(10))
    assert allm == {0: [0, 1, 2], 1: [3, 4, 5, 6], 2: [7, 8, 9]}


def test_the_mlp_fixture_is_the_identity_only_through_its_mlp(tmp_path):
    # What makes the mlp case above able to fail: the skip path alone is far from the identity.
    from heads.modules import ProjectionHead

    identity_heads(tmp_path / "heads", "tiny-llama", "mlp", ["attn_in"])
    head = ProjectionHead.load(tmp_path / "heads" / "encoder" / "attn_in" / "T00-S00.mlp")
    x = torch.randn(5, head.cfg.in_dim, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        torch.testing.assert_close(head(x), x, rtol=1e-4, atol=1e-4)
        assert (head.linear_change(x) - x).abs().max() > 0.5


def test_a_ridge_head_s_linear_change_is_its_response_to_a_difference():
    from heads.modules import HeadConfig, ProjectionHead

    g = torch.Generator().manual_seed(0)
    head = ProjectionHead(HeadConfig(kind="ridge", in_dim=6, out_dim=4))
    with torch.no_grad():
        for t in (head.linear.weight, head.linear.bias, head.in_mean, head.out_mean):
            t.copy_(torch.randn(t.shape, generator=g))
        head.in_std.copy_(torch.rand(6, generator=g) + 0.5)
        head.out_std.copy_(torch.rand(4, generator=g) + 0.5)
        x, d = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
        torch.testing.assert_close(head.linear_change(d), head(x + d) - head(x), rtol=1e-5, atol=1e-5)
        m, k = head.affine()
        torch.testing.assert_close((x.double() @ m.T + k).float(), head(x), rtol=1e-5, atol=1e-5)
