"""The distillation trainer on its own: any teacher, any loss, and a killed run resumes to
exactly where an uninterrupted one ends."""
from __future__ import annotations

import pytest
import torch

from pipeline.assemble.distill import DistillConfig, agreement, corpus_sequences, distill, kl_loss, model_logits
from pipeline.cache.models import load_model
from pipeline.lora.adapters import load_adapter
from tests.pipeline.assemble.bridge_fixtures import random_adapter

TGT = "tiny-gemma3"
CFG = DistillConfig(steps=6, batch_size=2, positions=3, lr=2e-2, checkpoint_every=2, seq_len=8)
IDS = torch.randint(3, 300, (5, 8), generator=torch.Generator().manual_seed(1))


def student():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(load_model(TGT).model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))


def lora_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class Stop(Exception):
    pass


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    teacher = model_logits(load_adapter(load_model(TGT).model, random_adapter(tmp_path / "t", TGT, ["q_proj", "v_proj"])))
    whole = student()
    run = distill(whole, teacher, IDS, CFG, tmp_path / "ck-whole", progress=False)
    assert run["resumed_from"] == 0 and len(run["losses"]) == 6 and run["final_loss"] < run["first_loss"]

    def stop_at_5(step, loss):
        if step == 5:
            raise Stop

    with pytest.raises(Stop):
        distill(student(), teacher, IDS, CFG, tmp_path / "ck", progress=False, on_step=stop_at_5)
    resumed = student()
    again = distill(resumed, teacher, IDS, CFG, tmp_path / "ck", progress=False)
    assert again["resumed_from"] == 4 and again["losses"] == run["losses"]
    for name, value in lora_state(whole).items():
        torch.testing.assert_close(lora_state(resumed)[name], value, rtol=0, atol=0)
    # Other settings: the checkpoint is not resumed.
    other = distill(student(), teacher, IDS, DistillConfig(**{**CFG.__dict__, "lr": 1e-2}), tmp_path / "ck",
                    progress=False)
    assert other["resumed_from"] == 0


def test_the_loss_and_teacher_are_pluggable(tmp_path):
    calls = []

    def teacher(ids, select):  # any callable giving logits at the selected positions
        calls.append(int(select.sum()))
        return torch.zeros(int(select.sum()), 300)

    def mse(s, t):
        return ((s - t) ** 2).mean()

    model = student()
    distill(model, teacher, IDS, DistillConfig(steps=3, batch_size=2, positions=3, seq_len=8), tmp_path / "ck",
            loss_fn=mse, progress=False)
    assert calls == [6, 6, 6]  # 3 positions in each of 2 sequences: the LM head runs there only
    stats = agreement({"a": model_logits(model), "b": model_logits(model)}, [("a", "b")], IDS, 2)["a vs b"]
    assert stats == {"kl": pytest.approx(0, abs=1e-6), "top1_agreement": 1.0, "max_abs_logit_diff": 0.0,
                     "mean_abs_logit_diff": 0.0, "tokens": 40}
    assert kl_loss(torch.zeros(2, 5), torch.zeros(2, 5)).item() == pytest.approx(0)


def test_text_skips_what_the_stores_read(corpus_dir):
    from pipeline.cache.corpus import load_corpus, segment

    tok = load_model(TGT).tokenizer
    corpus = load_corpus(str(corpus_dir))
    segments = segment(corpus, 64)
    # A store that read the first 5 segments (its token count, as store identities record it).
    n_tokens = sum(len(tok(s.text).input_ids) for s in segments[:5])
    store = {"model": TGT, "corpus_hash": corpus.hash, "max_chars": 64, "n_tokens": n_tokens}
    cfg = DistillConfig(corpus=str(corpus_dir), seq_len=6, eval_sequences=2)
    train, held, info = corpus_sequences(cfg, tok, [store], n_train=4)
    assert info["store_segments_skipped"] == 5 and info["train"]["segments"][0] >= 5
    assert train.shape == (4, 6) and held.shape == (2, 6)
    assert info["heldout"]["segments"] == [len(segments) - 2, len(segments) - 1]
    # Another corpus than the stores': nothing to skip.
    _, _, info = corpus_sequences(cfg, tok, [{**store, "corpus_hash": "other"}], n_train=1)
    assert info["store_segments_skipped"] == 0
