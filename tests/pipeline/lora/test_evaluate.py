import json

import pytest
import torch

from pipeline.lora.evaluate import (bootstrap_ci, evaluate_model, extract_answer, generate_greedy,
                               score_predictions)
from pipeline.cache.models import load_model
from pipeline.lora.tasks import Example, Task, builtin_task


@pytest.fixture(scope="module", autouse=True)
def cast_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAST_CACHE", str(tmp_path_factory.getbasetemp() / "cast-cache"))
        yield


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


HAND = Task("hand", [], [Example("12+30=", "42"), Example("1+1=", "2"),
                         Example("5+5=", "10"), Example("9+9=", "18")], normalise="number")


def test_hand_made_set_scores_exactly():
    # Right after normalisation, right up to the newline, wrong, wrong.
    res = score_predictions(HAND, HAND.test, [" 42 ", "2\n3+3=6", "11", "1 9"])
    assert (res.correct, res.n, res.exact_match) == (2, 4, 0.5)
    assert [p["correct"] for p in res.predictions] == [True, True, False, False]
    assert res.predictions[1]["prediction"] == "2" and res.predictions[1]["raw"] == "2\n3+3=6"
    assert 0.0 <= res.ci_low <= 0.5 <= res.ci_high <= 1.0
    assert res.summary() == "hand: exact match 0.500 [%.3f, %.3f] (2/4)" % (res.ci_low, res.ci_high)
    with pytest.raises(ValueError, match="4 examples but 3 predictions"):
        score_predictions(HAND, HAND.test, ["1", "2", "3"])


def test_bootstrap():
    assert bootstrap_ci([True] * 10) == (1.0, 1.0)
    assert bootstrap_ci([False] * 10) == (0.0, 0.0)
    x = [True] * 50 + [False] * 50
    lo, hi = bootstrap_ci(x, seed=7)
    assert (lo, hi) == bootstrap_ci(x, seed=7)  # seeded
    assert 0.38 < lo < 0.45 and 0.55 < hi < 0.62  # about 0.5 +- 1.96 * 0.05


def test_extract_answer():
    assert extract_answer(" 42\nmore text", "42") == " 42"
    assert extract_answer("\n42\n", "42") == "42"  # a leading blank line is not the answer
    assert extract_answer("a\nb\nc", "a\nb") == "a\nb\nc"  # multi-line references keep it all


class CannedModel(torch.nn.Module):
    """Answers each prompt with a fixed string, through the real `generate` interface."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.answers, self.batches = tokenizer, answers, []

    def generate(self, input_ids, attention_mask, generation_config):
        self.batches.append((input_ids.clone(), attention_mask.clone()))
        assert attention_mask[:, -1].all(), "prompts must be left-padded"
        rows = []
        for ids, m in zip(input_ids, attention_mask):
            prompt = self.tok.decode(ids[m.bool()], skip_special_tokens=True)
            new = self.tok(self.answers[prompt], add_special_tokens=False).input_ids
            rows.append(torch.cat([ids, torch.tensor(new + [self.tok.eos_token_id])]))
        width = max(len(r) for r in rows)
        return torch.stack([torch.nn.functional.pad(r, (0, width - len(r)), value=self.tok.pad_token_id)
                            for r in rows])


def test_evaluate_model_on_a_canned_model(tiny):
    canned = CannedModel(tiny.tokenizer, {"12+30=": "42", "1+1=": "2\nand so on", "5+5=": "55", "9+9=": "eighteen"})
    res = evaluate_model(canned, tiny.tokenizer, HAND, batch_size=3, progress=False)
    assert (res.correct, res.n, res.exact_match) == (2, 4, 0.5)
    assert [p["prompt"] for p in res.predictions] == [e.prompt for e in HAND.test]  # input order kept
    assert [p["correct"] for p in res.predictions] == [True, True, False, False]
    assert len(canned.batches) == 2
    assert res.meta["max_new_tokens"] >= 4
    assert evaluate_model(canned, tiny.tokenizer, HAND, limit=1, progress=False).n == 1


def test_batched_greedy_equals_one_by_one(tiny):
    prompts = ["the", "the river was green and", "a", "47+38=", "they were at the market in the"]
    one = generate_greedy(tiny.model, tiny.tokenizer, prompts, max_new_tokens=6, batch_size=1)
    many = generate_greedy(tiny.model, tiny.tokenizer, prompts, max_new_tokens=6, batch_size=5)
    assert one == many and len(set(one)) > 1


def test_gemma_batched_greedy_equals_one_by_one():
    g = load_model("tiny-gemma3")
    prompts = ["the", "the river was green and the house", "a", "47+38="]
    one = generate_greedy(g.model, g.tokenizer, prompts, max_new_tokens=5, batch_size=1)
    many = generate_greedy(g.model, g.tokenizer, prompts, max_new_tokens=5, batch_size=4)
    assert one == many


def test_real_task_on_tiny_model_writes_json(tiny, tmp_path):
    task = builtin_task("add2", n_train=10, n_test=20)
    res = evaluate_model(tiny.model, tiny.tokenizer, task, limit=12, batch_size=5, progress=False)
    assert res.n == 12 and len(res.predictions) == 12 and res.seconds > 0
    res.to_json(tmp_path / "r.json")
    back = json.loads((tmp_path / "r.json").read_text())
    assert back["n"] == 12 and back["meta"]["task"]["name"] == "add2"
    assert set(back["predictions"][0]) == {"prompt", "answer", "prediction", "raw", "correct"}
