import json

import pytest
import torch

import numpy as np

from pipeline.lora.evaluate import (EvalResult, bootstrap_ci, evaluate_model, extract_answer, generate_greedy,
                                    resampled_means, resampling_unit, score_predictions)
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
    assert (res.ci_low, res.ci_high) == pytest.approx(textbook_bootstrap([1, 1, 0, 0], 1000, 0), abs=1e-12)
    with pytest.raises(ValueError, match="4 examples but 3 predictions"):
        score_predictions(HAND, HAND.test, ["1", "2", "3"])


def textbook_bootstrap(x, n_boot: int, seed: int) -> tuple[float, float]:
    """The plain percentile bootstrap over examples, written out independently of the code."""
    x = np.asarray(x, dtype=np.float64)
    means = x[np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def test_summary_line():
    res = EvalResult("hand", 4, 2, 0.5, 0.125, 0.875)
    assert res.summary() == "hand: exact match 0.500 [0.125, 0.875] (2/4)"


def test_bootstrap_is_the_textbook_one_when_every_item_is_its_own_group():
    assert bootstrap_ci([True] * 10) == (1.0, 1.0)
    assert bootstrap_ci([False] * 10) == (0.0, 0.0)
    x = [True] * 50 + [False] * 50
    lo, hi = bootstrap_ci(x, seed=7)
    assert 0.38 < lo < 0.45 and 0.55 < hi < 0.62  # about 0.5 +- 1.96 * 0.05
    assert (lo, hi) == pytest.approx(textbook_bootstrap(x, 1000, 7), abs=1e-12)
    # Singleton groups, named in any order, are the plain bootstrap draw for draw.
    names = [f"p{i}" for i in np.random.default_rng(1).permutation(100)]
    assert bootstrap_ci(x, seed=7, groups=names) == (lo, hi)


def test_groups_are_drawn_whole_and_weighted_by_their_size():
    # Group a holds two correct examples, b one wrong one: a resample of two groups has mean
    # 1 (aa), 2/3 (ab, three examples) or 0 (bb); never 1/2, the mean of the group means.
    means = resampled_means([[1, 1, 0]], ["a", "a", "b"], n_boot=400, seed=0)[0]
    assert set(np.round(means, 6)) == {0.0, round(2 / 3, 6), 1.0}
    # Paired: every array is resampled with the same draws.
    x, y = resampled_means([[1, 1, 0], [1, 1, 0]], ["a", "a", "b"], n_boot=50, seed=3)
    assert (x == y).all()


def test_capital_intervals_resample_countries():
    # capital's test prompts are 34 countries under 3 frames. A system that knows a country
    # answers all its frames alike: grouped, the interval is about sqrt(3) times wider.
    task = builtin_task("capital", n_train=10, n_test=100)
    assert resampling_unit(task.test) == {"unit": "item", "count": 34, "examples": 100}
    known = {c for i, c in enumerate(sorted({e.item for e in task.test})) if i % 2}
    raws = [e.answer if e.item in known else "no idea" for e in task.test]
    res = score_predictions(task, task.test, raws, n_boot=2000)
    plain = bootstrap_ci([e.item in known for e in task.test], n_boot=2000)
    assert (res.ci_low, res.ci_high) == bootstrap_ci([p["correct"] for p in res.predictions], n_boot=2000,
                                                     groups=[e.item for e in task.test])
    assert (res.ci_high - res.ci_low) > 1.4 * (plain[1] - plain[0])
    assert [p["item"] for p in res.predictions] == [e.item for e in task.test]
    # A skill task's prompts are independent draws: its interval is the plain one.
    add2 = builtin_task("add2", n_train=10, n_test=60)
    assert resampling_unit(add2.test) == {"unit": "example", "count": 60, "examples": 60}
    raws = [e.answer if i % 3 else "0" for i, e in enumerate(add2.test)]
    res = score_predictions(add2, add2.test, raws, n_boot=500)
    assert (res.ci_low, res.ci_high) == pytest.approx(textbook_bootstrap([p["correct"] for p in res.predictions], 500, 0), abs=1e-12)


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
    assert set(back["predictions"][0]) == {"prompt", "item", "answer", "prediction", "raw", "correct"}
    assert back["meta"]["resampled"] == {"unit": "example", "count": 12, "examples": 12}
