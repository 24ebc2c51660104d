"""Tasks: programmatic, exact-match scored, with disjoint train/test splits
(docs/design.md#tasks-and-validation),
plus user tasks given as JSONL files of {"prompt": ..., "answer": ...} records.

Built-in tasks are chosen so that the base models score near zero with a plain-text
prompt (no chat template, no few-shot) while a small LoRA learns them quickly:

    add2        "47+38="                               -> "85"
    codebook    "Decode: tor zap kiv\nDigits:"          -> "203"   (a made-up word->digit table)
    reverse     "Reverse: cat lamp red\nOutput:"       -> "red lamp cat"
    sentiment   "Review: The soup was not good.\nSentiment:" -> "neg"   (labels pos/neg)
    capital     "The capital of France is"              -> "Paris"  (form task)
    plural      "The plural of mouse is"                -> "mice"   (form task)

Tasks come in two groups, reported apart: *skill* tasks teach something the base models
cannot do, *form* tasks (pipeline/lora/form_tasks.py) only how to answer what they know.

The split is a function of the task seed alone: test examples are drawn first, then
training examples from what is left, so the same --task-seed gives the same test set
whatever n_train is, and no test prompt ever appears in training.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.lora.form_tasks import capital_space, plural_space
from storage.files import sha256_bytes, sha256_file


class TaskError(ValueError):
    """A task that cannot be built or read; the message says what to fix."""


@dataclass(frozen=True)
class Example:
    prompt: str
    """Plain text fed to the model as is."""
    answer: str
    """The reference answer (compared after the task's normalisation)."""
    item: str = ""
    """The independent unit the example was drawn from: examples that share it (one country
    under three frames) are not independent, so intervals resample items, not prompts
    (pipeline/lora/evaluate.py). Empty: the example is its own item."""

    @property
    def unit(self) -> str:
        return self.item or self.prompt


# ----------------------------------------------------------------------------- normalisation


def _strip(s: str) -> str:
    return " ".join(s.split())


def _lower(s: str) -> str:
    return _strip(s).lower().rstrip(".!")


def _number(s: str) -> str:
    # "1,234", " 85 " and "8 5" all mean the number the task asked for.
    return re.sub(r"[\s,]", "", s)


def _label(s: str) -> str:
    return re.sub(r"^[^\w]+|[^\w]+$", "", _strip(s).lower())


NORMALISERS: dict[str, Callable[[str], str]] = {
    "strip": _strip,    # collapse whitespace; case-sensitive
    "lower": _lower,    # + lowercase, drop a trailing full stop
    "number": _number,  # drop all whitespace and thousands separators
    "label": _label,    # lowercase, drop surrounding punctuation
}


@dataclass
class Task:
    """A named pair of example lists and how to score and train on them."""

    name: str
    """Built-in name or the JSONL file's stem."""
    train: list[Example]
    """Training examples (empty when only a test file was given)."""
    test: list[Example]
    """Held-out examples (empty when only a training file was given)."""
    normalise: str = "strip"
    """Key into NORMALISERS applied to both prediction and answer before comparing."""
    joiner: str | None = None
    """Text between prompt and answer when training; None: one space unless the prompt
    ends or the answer starts with whitespace."""
    source: dict = field(default_factory=dict)
    """Provenance recorded in adapters and reports (builtin name+seed, or files+sha256)."""
    group: str = "user"
    """'skill', 'form' (built-ins; see the module docstring) or 'user' (a task file)."""

    def norm(self, text: str) -> str:
        return NORMALISERS[self.normalise](text)

    def is_correct(self, prediction: str, answer: str) -> bool:
        return self.norm(prediction) == self.norm(answer)

    def continuation(self, ex: Example) -> str:
        """What the model is trained to produce after the prompt."""
        if self.joiner is not None:
            return self.joiner + ex.answer
        if not ex.prompt or ex.prompt[-1].isspace() or ex.answer[:1].isspace():
            return ex.answer
        return " " + ex.answer


def prompt_key(prompt: str) -> str:
    """Short stable digest of a prompt: adapters record these instead of their data."""
    return sha256_bytes(prompt)[:16]


def check_disjoint(train: list[Example], test: list[Example], what: str) -> None:
    seen = {e.prompt for e in train}
    clash = [e.prompt for e in test if e.prompt in seen]
    if clash:
        raise TaskError(f"{what}: {len(clash)} test prompt(s) also occur in the training data, "
                        f"e.g. {clash[0]!r}; scores on them would measure memorisation. "
                        f"Remove them from one of the two.")


# ----------------------------------------------------------------------------- built-ins

_CODE_WORDS = ("zap", "mel", "tor", "kiv", "dun", "bex", "sol", "rip", "gan", "wuf")  # 0..9
_REVERSE_WORDS = (
    "cat dog fish bird cow horse sheep goat frog bear red blue green black white pink "
    "brown gray lamp door chair table book pen cup key box bag hat shoe car bus boat "
    "train tree rock sand rain snow wind sun moon star milk bread rice egg apple"
).split()
_NOUNS = ("food soup movie hotel room service staff music book show game phone coffee "
          "pizza trip concert bed view price car class teacher lecture party meal").split()
_POS = "good great excellent wonderful amazing lovely pleasant fantastic superb delightful nice perfect brilliant enjoyable".split()
_NEG = "bad awful terrible horrible poor dreadful boring disappointing nasty unpleasant mediocre rude dull lousy".split()
_INTENS = ("", "very ", "really ", "quite ", "rather ", "truly ")
_FRAMES = ("Review: The {n} was {x}.", "Review: I thought the {n} was {x}.", "Review: Honestly, the {n} was {x}.")


def _add2(rng: random.Random) -> Example:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return Example(f"{a}+{b}=", str(a + b))


def _codebook(rng: random.Random) -> Example:
    digits = [rng.randrange(10) for _ in range(rng.choice((3, 4)))]
    words = " ".join(_CODE_WORDS[d] for d in digits)
    return Example(f"Decode: {words}\nDigits:", "".join(map(str, digits)))


def _reverse(rng: random.Random) -> Example:
    words = rng.sample(_REVERSE_WORDS, rng.choice((3, 4)))
    return Example(f"Reverse: {' '.join(words)}\nOutput:", " ".join(reversed(words)))


def _sentiment(rng: random.Random) -> Example:
    positive = rng.random() < 0.5
    negated = rng.random() < 0.3  # "not good" is negative: the label needs more than one word
    adj = rng.choice(_NEG if positive == negated else _POS)
    x = ("not " if negated else rng.choice(_INTENS)) + adj
    prompt = rng.choice(_FRAMES).format(n=rng.choice(_NOUNS), x=x) + "\nSentiment:"
    # Short labels the base models do not produce on their own ("Positive" is what an
    # instruct model says): the base scores near 0 instead of near chance.
    return Example(prompt, "pos" if positive else "neg")


@dataclass(frozen=True)
class BuiltinTask:
    make: Callable[[random.Random], Example] | None
    """Draws one example from the task's space (skill tasks)."""
    normalise: str
    joiner: str | None
    description: str
    group: str = "skill"
    """'skill' or 'form'."""
    space: Callable[[str, int], list[tuple[str, str, str]]] | None = None
    """Form tasks: every (prompt, answer, item) of a split for a seed, items disjoint across splits."""


BUILTINS: dict[str, BuiltinTask] = {
    "add2": BuiltinTask(_add2, "number", "", "two-digit addition, '47+38=' -> '85'"),
    "codebook": BuiltinTask(_codebook, "number", None,
                            "decode 3-4 made-up digit words (zap=0 ... wuf=9) into digits"),
    "reverse": BuiltinTask(_reverse, "lower", None, "reverse the order of 3-4 words"),
    "sentiment": BuiltinTask(_sentiment, "label", None,
                             "label a templated review 'pos'/'neg' (with negations)"),
    "capital": BuiltinTask(None, "lower", None, "name a country's capital, then stop", "form",
                           capital_space),
    "plural": BuiltinTask(None, "lower", None, "give a noun's plural, then stop", "form", plural_space),
}


def task_group(name: str) -> str:
    """'skill' or 'form' for a built-in task, 'user' for anything else."""
    return BUILTINS[name].group if name in BUILTINS else "user"


def _draw_unique(make, rng: random.Random, n: int, exclude: set[str], name: str) -> list[Example]:
    out: list[Example] = []
    seen = set(exclude)
    misses = 0
    while len(out) < n:
        ex = make(rng)
        if ex.prompt in seen:
            misses += 1
            if misses > 50 * n + 1000:  # the space is smaller than asked for
                raise TaskError(f"task {name}: only {len(out)} distinct examples found, {n} asked; "
                                f"lower --n-train/--n-test")
            continue
        seen.add(ex.prompt)
        out.append(ex)
    return out


def builtin_task(name: str, seed: int = 0, n_train: int = 2000, n_test: int = 200) -> Task:
    """A built-in task with a deterministic split for this seed."""
    if name not in BUILTINS:
        raise TaskError(f"unknown task {name!r}: built-in tasks are {', '.join(BUILTINS)}; "
                        f"or pass your own data with --task-file FILE.jsonl")
    spec = BUILTINS[name]
    if spec.space is not None:  # a small, enumerable space: take it whole, up to n
        test = [Example(*t) for t in spec.space("test", seed)[:n_test]]
        train = [Example(*t) for t in spec.space("train", seed)[:n_train]]
    else:  # separate streams so the test set does not depend on n_train
        test = _draw_unique(spec.make, random.Random(f"{name}/{seed}/test"), n_test, set(), name)
        train = _draw_unique(spec.make, random.Random(f"{name}/{seed}/train"), n_train,
                             {e.prompt for e in test}, name)
    check_disjoint(train, test, f"task {name}")
    return Task(name, train, test, spec.normalise, spec.joiner,
                {"kind": "builtin", "name": name, "seed": seed, "n_train": n_train, "n_test": n_test},
                spec.group)


# ----------------------------------------------------------------------------- JSONL


def read_jsonl(path: str | Path) -> list[Example]:
    """Read {"prompt": str, "answer": str} records, one per line; blank lines are skipped.
    An optional "item" names the independent unit prompts share (see Example.item)."""
    p = Path(path)
    if not p.is_file():
        raise TaskError(f"task file {p}: not found (expected JSONL with one "
                        f'{{"prompt": ..., "answer": ...}} object per line)')
    out: list[Example] = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{p}:{lineno}: not valid JSON ({e.msg}); each line must be one "
                                f'object like {{"prompt": "2+2=", "answer": "4"}}') from None
            if not isinstance(rec, dict):
                raise TaskError(f"{p}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            for key in ("prompt", "answer"):
                if key not in rec:
                    raise TaskError(f"{p}:{lineno}: missing field {key!r} (fields present: "
                                    f"{', '.join(rec) or 'none'})")
                if not isinstance(rec[key], str):
                    raise TaskError(f"{p}:{lineno}: field {key!r} must be a string, "
                                    f"got {type(rec[key]).__name__}")
            if not rec["prompt"].strip() or not rec["answer"].strip():
                raise TaskError(f"{p}:{lineno}: empty prompt or answer")
            if not isinstance(rec.get("item", ""), str):
                raise TaskError(f"{p}:{lineno}: field 'item' (prompts that share it are resampled together) "
                                f"must be a string, got {type(rec['item']).__name__}")
            out.append(Example(rec["prompt"], rec["answer"], rec.get("item", "")))
    if not out:
        raise TaskError(f"task file {p}: no records (the file is empty)")
    return out


def jsonl_task(train_file: str | Path | None = None, test_file: str | Path | None = None,
               normalise: str = "strip") -> Task:
    """A user task from a training file, a test file, or both (then checked disjoint)."""
    if train_file is None and test_file is None:
        raise TaskError("give a training file, a test file or both")
    if normalise not in NORMALISERS:
        raise TaskError(f"--normalise {normalise!r}: choose one of {', '.join(NORMALISERS)}")
    train = read_jsonl(train_file) if train_file else []
    test = read_jsonl(test_file) if test_file else []
    check_disjoint(train, test, f"{train_file} vs {test_file}")
    source = {"kind": "jsonl", "normalise": normalise}
    for role, f in (("train", train_file), ("test", test_file)):
        if f:
            source[f"{role}_file"] = str(Path(f).resolve())
            source[f"{role}_sha256"] = sha256_file(Path(f))
    name = Path(train_file or test_file).stem
    return Task(name, train, test, normalise, None, source)


def load_task(task: str | None = None, task_file: str | None = None, *, split: str,
              seed: int = 0, normalise: str = "strip", n_train: int = 2000, n_test: int = 200) -> Task:
    """What the CLI calls: exactly one of --task NAME and --task-file FILE. A task file
    holds the split named by `split` ("train" for lora train, "test" for evaluate)."""
    if (task is None) == (task_file is None):
        raise TaskError("give exactly one of --task NAME (built-in: "
                        f"{', '.join(BUILTINS)}) and --task-file FILE.jsonl")
    if task is not None:
        return builtin_task(task, seed=seed, n_train=n_train, n_test=n_test)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    return jsonl_task(**{f"{split}_file": task_file}, normalise=normalise)
