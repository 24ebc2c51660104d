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


def _batch(tokenizer, texts):
    from pipeline.lora.batching import left_pad

    seqs = [tokenizer(t).input_ids for t in texts]
    ids, mask, pos = left_pad(seqs, tokenizer.pad_token_id)
    return dict(input_ids=ids, attention_mask=mask, position_ids=pos)


def test_first_token_keep_leaves_each_sequence_s_first_real_token_unchanged(tmp_path):
    # tiny-gemma3 prepends <bos>, as Gemma-3 does: the attention sink the heads never train on.
    from pipeline.lora.train import causal_lm_logits

    targets = ["q_proj", "v_proj"]
    heads = identity_heads(tmp_path / "heads", "tiny-gemma3", "ridge", sites_for(targets))
    adapter = random_adapter(tmp_path / "lora", "tiny-gemma3", targets)
    models = {}
    for first in ("bridge", "keep"):
        run_transfer(TransferConfig(adapter=str(adapter), heads=str(heads), out=str(tmp_path / first), kind="ridge",
                                    carry="mapped", first_token=first))
        assert json.loads((tmp_path / first / "manifest.json").read_text())["first_token"] == first
        models[first] = load_bridged(tmp_path / first).model
    plain = load_model("tiny-gemma3")
    batch = _batch(plain.tokenizer, ["the river ran past the old stone house", "seven green"])  # left-padded
    assert (batch["input_ids"][batch["attention_mask"].argmax(1) == 0, 0] == plain.tokenizer.bos_token_id).all()
    with torch.no_grad():
        out = {k: m(**batch).logits for k, m in (("plain", plain.model), *models.items())}
    rows, first = torch.arange(2), batch["attention_mask"].argmax(1)  # each row's first real column
    torch.testing.assert_close(out["keep"][rows, first], out["plain"][rows, first], rtol=0, atol=0)
    assert (out["bridge"][rows, first] - out["plain"][rows, first]).abs().amax(-1).min() > 1e-3
    later = batch["attention_mask"].bool()
    later[rows, first] = False
    assert (out["keep"][later] - out["plain"][later]).abs().amax(-1).min() > 1e-3  # the change still applies
    # Scoring runs the decoder alone (causal_lm_logits): the same positions are left alone.
    with torch.no_grad():
        sel = batch["attention_mask"].bool()
        torch.testing.assert_close(causal_lm_logits(models["keep"], sel, **batch), out["keep"][sel],
                                   rtol=1e-5, atol=1e-5)
        # A cached step (as in generate) reads the first token from the mask over past and new tokens.
        prefix = models["keep"](**{k: v[:, :-1] for k, v in batch.items()}, use_cache=True)
        step = models["keep"](input_ids=batch["input_ids"][:, -1:], attention_mask=batch["attention_mask"],
                              position_ids=batch["position_ids"][:, -1:], cache=prefix.past_key_values,
                              use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, out["keep"][:, -1], rtol=1e-4, atol=1e-4)
    assert models["keep"].generate(**batch, max_new_tokens=2, do_sample=False).shape[1] == batch["input_ids"].shape[1] + 2
    with pytest.raises(ValueError, match="--first-token 'first': choose 'bridge' or 'keep'"):
        TransferConfig(adapter="a", out="b", kind="ridge", first_token="first")
    with pytest.raises(BridgeError, match="--first-token keep applies to --kind mlp or ridge"):
        run_transfer(TransferConfig(adapter=str(adapter), target="tiny-gemma3", out=str(tmp_path / "p"),
                                    first_token="keep"))


def test_carry_mapped_drops_exactly_the_source_layers_no_target_layer_maps_to(tmp_path):
    from safetensors.torch import load_file, save_file

    from tests.pipeline.assemble.bridge_fixtures import random_heads

    targets = ["q_proj", "v_proj"]
    heads = random_heads(tmp_path / "heads", "tiny-llama", "tiny-gemma3", "ridge", sites_for(targets),
                         {0: 0, 1: 2, 2: 3})  # source layer 1 is no target layer's choice
    adapter = random_adapter(tmp_path / "lora", "tiny-llama", targets)
    without_1 = tmp_path / "without-1"
    shutil.copytree(adapter, without_1)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: torch.zeros_like(v) if ".layers.1." in k and "lora_B" in k else v for k, v in weights.items()},
              str(without_1 / "adapter_model.safetensors"))
    out = {}
    for name, lora, carry in (("mapped", adapter, "mapped"), ("all", adapter, "all"), ("all-1", without_1, "all")):
        m = run_transfer(TransferConfig(adapter=str(lora), heads=str(heads), out=str(tmp_path / name), kind="ridge",
                                        carry=carry))
        assert json.loads((tmp_path / name / "manifest.json").read_text())["carry"] == carry
        out[name] = (m["adapters"][0]["assignment"], logits(load_bridged(tmp_path / name).model))
    assert out["mapped"][0] == {"0": [0], "1": [2], "2": [3]} and out["all"][0] == {"0": [0, 1], "1": [2], "2": [3]}
    assert (out["all"][1] - out["mapped"][1]).abs().max() > 1e-3  # layer 1's change is carried by 'all' only
    torch.testing.assert_close(out["mapped"][1], out["all-1"][1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="--carry 'some': choose 'all' or 'mapped'"):
        TransferConfig(adapter="a", out="b", carry="some")
