import json

import pytest

from pipeline.lora.form_tasks import CAPITALS, PLURALS
from pipeline.lora.tasks import (BUILTINS, Example, Task, TaskError, builtin_task, jsonl_task, load_task,
                                 read_jsonl, task_group)


@pytest.mark.parametrize("name", sorted(n for n, b in BUILTINS.items() if b.group == "skill"))
def test_builtin_split_is_disjoint_deterministic_and_scorable(name):
    t = builtin_task(name, seed=3, n_train=500, n_test=100)
    assert len(t.train) == 500 and len(t.test) == 100
    train_prompts = {e.prompt for e in t.train}
    test_prompts = {e.prompt for e in t.test}
    assert len(train_prompts) == 500 and len(test_prompts) == 100  # no duplicates either
    assert not train_prompts & test_prompts
    again = builtin_task(name, seed=3, n_train=500, n_test=100)
    assert again.train == t.train and again.test == t.test
    assert builtin_task(name, seed=4, n_train=10, n_test=100).test != t.test
    # The test set does not depend on how much training data is asked for.
    assert builtin_task(name, seed=3, n_train=50, n_test=100).test == t.test
    for e in t.test[:20]:
        assert t.is_correct(e.answer, e.answer)
        assert t.is_correct(f" {e.answer}\n", e.answer)
        assert "\n" not in e.answer


@pytest.mark.parametrize("name,table", [("capital", CAPITALS), ("plural", PLURALS)])
def test_form_tasks_split_items_not_prompts(name, table):
    t = builtin_task(name, seed=3, n_train=10_000, n_test=10_000)  # the whole space: it is small
    assert t.group == task_group(name) == "form" and task_group("add2") == "skill" and task_group("x") == "user"

    def item(prompt: str) -> str:
        return next(x for x in table if f" {x} " in f" {prompt.replace(chr(39), ' ')} ")

    train_items, test_items = ({item(e.prompt) for e in split} for split in (t.train, t.test))
    assert not train_items & test_items  # no country or noun is seen in training under any frame
    assert len(test_items) == pytest.approx(0.4 * len(table), abs=1)
    for e in t.train + t.test:
        assert e.answer == table[item(e.prompt)]
        assert t.is_correct(f" {e.answer.upper()}\n", e.answer)
    again = builtin_task(name, seed=3, n_train=10_000, n_test=10_000)
    assert again.test == t.test and again.train == t.train
    other = builtin_task(name, seed=4, n_train=10_000, n_test=10_000)
    assert {item(e.prompt) for e in other.test} != test_items
    assert builtin_task(name, seed=3, n_train=5, n_test=7).test == t.test[:7]


def test_builtin_answers_are_right():
    add = builtin_task("add2", n_train=50, n_test=50)
    for e in add.test:
        a, b = e.prompt.rstrip("=").split("+")
        assert int(e.answer) == int(a) + int(b)
    assert add.continuation(add.test[0]) == add.test[0].answer  # "47+38=85": no space
    code = builtin_task("codebook", n_train=10, n_test=50)
    table = {"zap": "0", "mel": "1", "tor": "2", "kiv": "3", "dun": "4",
             "bex": "5", "sol": "6", "rip": "7", "gan": "8", "wuf": "9"}
    for e in code.test:
        words = e.prompt.split("\n")[0].removeprefix("Decode: ").split()
        assert e.answer == "".join(table[w] for w in words)
    rev = builtin_task("reverse", n_train=10, n_test=50)
    for e in rev.test:
        words = e.prompt.split("\n")[0].removeprefix("Reverse: ").split()
        assert e.answer.split() == words[::-1]
    sent = builtin_task("sentiment", n_train=10, n_test=200)
    labels = {e.answer for e in sent.test}
    assert labels == {"pos", "neg"}
    assert any(" not " in e.prompt and e.answer == "neg" for e in sent.test)
    assert any(" not " in e.prompt and e.answer == "pos" for e in sent.test)


def test_normalisation():
    t = builtin_task("add2", n_train=1, n_test=1)
    assert t.is_correct(" 1,234 ", "1234") and not t.is_correct("1235", "1234")
    r = builtin_task("reverse", n_train=1, n_test=1)
    assert r.is_correct("  Red  Cat. ", "red cat") and not r.is_correct("cat red", "red cat")
    s = builtin_task("sentiment", n_train=1, n_test=1)
    assert s.is_correct(" Pos.", "pos") and not s.is_correct("positive", "pos")
    u = Task("u", [], [], normalise="strip")
    assert u.is_correct(" Paris  France ", "Paris France") and not u.is_correct("paris", "Paris")


def test_continuation_spacing():
    t = Task("u", [], [])
    assert t.continuation(Example("Q: capital of France?\nA:", "Paris")) == " Paris"
    assert t.continuation(Example("A: ", "Paris")) == "Paris"
    assert t.continuation(Example("A:", " Paris")) == " Paris"


def test_unknown_task_and_exactly_one_source():
    with pytest.raises(TaskError, match="unknown task 'nope'.*add2"):
        builtin_task("nope")
    with pytest.raises(TaskError, match="exactly one of --task"):
        load_task(None, None, split="test")
    with pytest.raises(TaskError, match="exactly one of --task"):
        load_task("add2", "x.jsonl", split="test")


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_roundtrip(tmp_path):
    f = write(tmp_path / "caps.jsonl", [json.dumps({"prompt": "France ->", "answer": "Paris"}), "",
                                        json.dumps({"prompt": "Peru ->", "answer": "Lima", "extra": 1})])
    assert read_jsonl(f) == [Example("France ->", "Paris"), Example("Peru ->", "Lima")]
    t = load_task(None, str(f), split="test")
    assert t.name == "caps" and len(t.test) == 2 and t.train == []
    assert t.source["test_sha256"] and t.source["kind"] == "jsonl"
    t = load_task(None, str(f), split="train")
    assert len(t.train) == 2 and t.test == []


@pytest.mark.parametrize("lines, message", [
    ([], "no records"),
    (["", "   "], "no records"),
    (['{"prompt": "a", "answer": "b"}', '{"prompt": "a"'], r":2: not valid JSON"),
    (['["a", "b"]'], r":1: expected a JSON object, got list"),
    (['{"prompt": "a"}'], r":1: missing field 'answer' \(fields present: prompt\)"),
    (['{"question": "a", "answer": "b"}'], r":1: missing field 'prompt'"),
    (['{"prompt": "a", "answer": 4}'], r":1: field 'answer' must be a string, got int"),
    (['{"prompt": " ", "answer": "4"}'], r":1: empty prompt or answer"),
])
def test_jsonl_errors(tmp_path, lines, message):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(TaskError, match=message) as e:
        read_jsonl(f)
    assert "bad.jsonl" in str(e.value)


def test_jsonl_missing_file_and_overlap(tmp_path):
    with pytest.raises(TaskError, match="not found"):
        read_jsonl(tmp_path / "missing.jsonl")
    tr = write(tmp_path / "train.jsonl", [json.dumps({"prompt": p, "answer": "x"}) for p in "abc"])
    te = write(tmp_path / "test.jsonl", [json.dumps({"prompt": p, "answer": "x"}) for p in "cd"])
    with pytest.raises(TaskError, match="1 test prompt.*'c'"):
        jsonl_task(tr, te)
    with pytest.raises(TaskError, match="--normalise 'fuzzy'"):
        jsonl_task(tr, normalise="fuzzy")
