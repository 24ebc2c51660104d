"""`cast distill`: the logit proxy distilled into a plain PEFT LoRA for the target, on tiny
models. tiny-llama onto itself: the proxy is then the source LoRA itself, so the student
must move towards it."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from jobs.cli import main
from pipeline.assemble.packing import packed_batch
from pipeline.cache.models import load_model
from pipeline.lora.adapters import load_adapter
from pipeline.lora.tasks import load_task

IDS = [[5, 17, 42, 99, 3, 150, 7, 8, 61]]

PLAIN_PEFT = """
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
out = sys.argv[1]
base = json.load(open(out + "/adapter_config.json"))["base_model_name_or_path"]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor(%s)).logits
mods = [m for m in sys.modules if m.split(".")[0] in ("pipeline", "heads", "storage", "jobs", "runtime")]
print(json.dumps({"logits": logits.tolist(), "project_modules": mods}))
""" % IDS


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    out = tmp_path_factory.mktemp("student") / "lora"
    assert main(["lora", "train", "--model", "tiny-llama", "--task", "add2", "--steps", "20", "--lr", "1e-2",
                 "--batch-size", "8", "--out", str(out), "--quiet"]) == 0
    return out


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_distilled_lora_is_plain_peft_and_moves_towards_the_teacher(lora, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    train = load_task("add2", split="train", seed=0).train
    prompts.write_text("\n".join(e.prompt for e in train[:12]) + "\n")
    out = tmp_path / "d"
    code, stdout, _ = run(capsys, "distill", "--adapter", lora, "--target", "tiny-llama", "--data", "prompts",
                          "--prompts", prompts, "--out", out, "--steps", "30", "--samples", "2", "--heldout", "0.25",
                          "--lr", "1e-2", "--precision", "bfloat16", "--no-pack", "--batch-size", "8", "--quiet")
    assert code == 0
    info = json.loads((out / "cast_distill.json").read_text())
    assert info["data"]["regime"] == "prompts" and info["data"]["k"] == 12
    assert info["student"]["trained_in"] == "bfloat16"  # and is saved, loaded and measured in float32 below
    assert info["data"]["heldout_samples"] == 6 and info["data"]["train_samples"] == 18
    assert len(info["source"]["adapter_sha256"]) == 64 and info["teacher"]["kind"] == "logit proxy"
    fid = info["fidelity"]
    assert fid["heldout_teacher_samples"]["kl"] < 0.8 * fid["target_base"]["kl"], fid

    # A fresh interpreter with plain transformers + peft, nothing of this project.
    res = subprocess.run([sys.executable, "-I", "-c", PLAIN_PEFT, str(out)], capture_output=True, text=True,
                         cwd=tmp_path, check=True)
    plain = json.loads(res.stdout)
    assert plain["project_modules"] == []
    ours = load_adapter(load_model("tiny-llama").model, out)
    with torch.no_grad():
        want = ours(input_ids=torch.tensor(IDS)).logits
    assert (torch.tensor(plain["logits"]) - want).abs().max().item() <= 1e-4
    base = load_model("tiny-llama").model(input_ids=torch.tensor(IDS)).logits
    assert (want - base).abs().max().item() > 1e-3  # the student is not the bare target


def test_packed_distillation_trains_on_whole_prompts(lora, tmp_path, capsys, monkeypatch):
    import pipeline.assemble.student as student

    rows = []  # what every step packed: its prompts, each with all its samples
    monkeypatch.setattr(student, "packed_batch",
                        lambda groups, pad, *a: rows.append(groups) or packed_batch(groups, pad, *a))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(e.prompt for e in load_task("add2", split="train", seed=0).train[:12]) + "\n")
    out = tmp_path / "p"
    code, _, _ = run(capsys, "distill", "--adapter", lora, "--target", "tiny-llama", "--data", "prompts",
                     "--prompts", prompts, "--out", out, "--steps", "30", "--samples", "2", "--heldout", "0.25",
                     "--lr", "1e-2", "--batch-size", "8", "--quiet")  # packed: the default
    assert code == 0
    info = json.loads((out / "cast_distill.json").read_text())
    assert info["student"]["packed"] is True and info["config"]["pack"] is True
    assert len(rows) == 30 and all(len(groups) == 4 for groups in rows)  # 8 samples a step: 4 prompts x 2
    assert all(len(g) == 2 and len({tuple(x.ids[:x.start]) for x in g}) == 1 for groups in rows for g in groups)
    fid = info["fidelity"]
    assert fid["heldout_teacher_samples"]["kl"] < 0.8 * fid["target_base"]["kl"], fid


def test_teacher_draws_depend_on_the_sampling_batch_not_the_training_batch(lora, tmp_path, capsys, monkeypatch):
    import pipeline.assemble.student as student

    drawn = []  # every run's teacher samples: (ids, where the continuation starts)
    real = student.sample_teacher

    def spy(*a, **k):
        samples = real(*a, **k)
        drawn.append([(tuple(x.ids), x.start) for x in samples])
        return samples
    monkeypatch.setattr(student, "sample_teacher", spy)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(e.prompt for e in load_task("add2", split="train", seed=0).train[:6]) + "\n")
    for name, flags in [("b2", ["--batch-size", "2"]), ("b6", ["--batch-size", "6"]), ("s3", ["--sample-batch", "3"])]:
        code, _, _ = run(capsys, "distill", "--adapter", lora, "--target", "tiny-llama", "--data", "prompts",
                         "--prompts", prompts, "--out", tmp_path / name, "--steps", "1", "--samples", "2",
                         "--max-new-tokens", "6", "--quiet", *flags)
        assert code == 0
    assert drawn[0] == drawn[1]  # the training batch leaves the teacher's draws alone
    assert drawn[0] != drawn[2]  # the sampling batch seeds them


def test_the_teacher_reads_a_prompt_its_samples_share_once(monkeypatch):
    """sample_teacher reads each distinct prompt of a batch once (the samples of a prompt
    share its KV cache) and draws exactly what reading every row gives; tiny-gemma3's
    sliding-window layers included."""
    from peft import LoraConfig, get_peft_model

    from pipeline.assemble import teacher
    from pipeline.assemble.proxy import LogitProxy

    torch.manual_seed(0)
    src, tgt = load_model("tiny-llama"), load_model("tiny-gemma3")
    source = get_peft_model(src.model, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False)).eval()
    prompts = [e.prompt for e in load_task("capital", split="train", seed=0).train[:3]]

    def draw():
        proxy = LogitProxy(source, src.tokenizer, tgt.tokenizer)
        return teacher.sample_teacher(tgt.model, tgt.tokenizer, proxy, prompts, 3, 6, top_k=8, batch_size=9,
                                      progress=False)
    read = []
    hook = tgt.model.register_forward_pre_hook(lambda m, a, kw: read.append(kw["input_ids"].shape[0]),
                                               with_kwargs=True)
    try:
        shared = draw()
    finally:
        hook.remove()
    assert read[0] == 3 and set(read[1:]) == {9}  # the prompts once each, then every row a step
    monkeypatch.setattr(teacher, "shared_prompt_cache", lambda *a: None)
    each = draw()
    assert [(x.ids, x.start) for x in shared] == [(x.ids, x.start) for x in each]
    assert max((a.top_lp - b.top_lp).abs().max().item() for a, b in zip(shared, each)) < 1e-4
    assert len({tuple(x.ids) for x in shared}) > 3  # a prompt's rows were sampled apart


def test_the_teacher_along_a_text_is_the_teacher_that_wrote_it():
    """teacher_along reads a text teacher-forced; along a continuation the teacher sampled,
    it gives the distributions the teacher reported while writing it (target logits plus the
    proxy's shift), at exactly the continuation's columns and the prompt's before them."""
    from peft import LoraConfig, get_peft_model

    from pipeline.assemble import teacher
    from pipeline.assemble.proxy import LogitProxy

    torch.manual_seed(0)
    src, tgt = load_model("tiny-llama"), load_model("tiny-gemma3")
    source = get_peft_model(src.model, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False)).eval()
    prompts = [e.prompt for e in load_task("capital", split="train", seed=0).train[:3]]
    proxy = LogitProxy(source, src.tokenizer, tgt.tokenizer)
    written = teacher.sample_teacher(tgt.model, tgt.tokenizer, proxy, prompts, 2, 6, top_k=8, progress=False)
    along = teacher.teacher_along(tgt.model, tgt.tokenizer, proxy, [x.ids for x in written], top_k=8, progress=False)
    compared = 0
    for x, a in zip(written, along):
        assert 0 not in a.cols and a.cols == sorted(set(a.cols)) and max(a.cols) < len(x.ids) - 1  # <bos>: no text
        for i, c in enumerate(a.cols):
            if c >= x.start - 1:  # a continuation column: the teacher wrote its next token from this
                assert torch.allclose(a.top_lp[i], x.top_lp[c - x.start + 1], atol=1e-4), (c, x.start)
                assert a.top_ids[i, 0] == x.top_ids[c - x.start + 1, 0]
                compared += 1
    assert compared > 0.5 * sum(len(x.top_lp) for x in written)  # most columns are boundaries for both tokenizers
    bare = teacher.teacher_along(tgt.model, tgt.tokenizer, LogitProxy(source, src.tokenizer, tgt.tokenizer),
                                 [written[0].ids], top_k=8, progress=False)[0]
    with source.disable_adapter():
        plain = teacher.teacher_along(tgt.model, tgt.tokenizer, LogitProxy(source, src.tokenizer, tgt.tokenizer),
                                      [written[0].ids], top_k=8, progress=False)[0]
    assert (bare.top_lp - plain.top_lp).abs().max() > 1e-2  # the LoRA's change is in it: without it, none


def test_distill_refuses_test_prompts_and_resumes_its_samples(lora, tmp_path, capsys, monkeypatch):
    test = load_task("add2", split="test", seed=0).test
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": test[3].prompt}) + "\n" + json.dumps({"prompt": "1+1="}) + "\n")
    code, _, err = run(capsys, "distill", "--adapter", lora, "--target", "tiny-llama", "--data", "prompts",
                       "--prompts", bad, "--out", tmp_path / "x")
    assert code == 2 and "1 of 2 prompts are in the test split of add2" in err
    assert not (tmp_path / "x").exists()
    code, _, err = run(capsys, "distill", "--adapter", lora, "--target", "tiny-llama", "--prompts", bad,
                       "--out", tmp_path / "x")
    assert code == 2 and "--prompts FILE goes with --data prompts" in err

    import pipeline.assemble.student as student

    def stop(*a, **k):
        raise KeyboardInterrupt  # as if killed after the teacher's samples were written
    good = tmp_path / "good.txt"
    good.write_text("1+1=\n2+5=\n")
    argv = ["distill", "--adapter", lora, "--target", "tiny-llama", "--data", "prompts", "--prompts", good,
            "--out", tmp_path / "y", "--steps", "2", "--quiet"]
    monkeypatch.setattr(student, "distill", stop)
    assert run(capsys, *argv)[0] != 0
    monkeypatch.undo()
    code, _, err = run(capsys, *argv)
    assert code == 0 and "8 teacher samples from" in err


def test_salient_prefixes_are_where_the_lora_acts_most(lora, corpus_dir, tmp_path, capsys):
    code, _, _ = run(capsys, "distill", "--adapter", lora, "--target", "tiny-llama", "--corpus", corpus_dir,
                     "--candidates", "10", "--prefixes", "2", "--samples", "1", "--steps", "2", "--out",
                     tmp_path / "s", "--quiet")
    assert code == 0
    data = json.loads((tmp_path / "s" / "cast_distill.json").read_text())["data"]
    assert data["regime"] == "salient" and data["prefixes"] == 2
    kl = data["salience"]
    assert kl == sorted(kl, reverse=True) and kl[-1] > data["salience_median_of_candidates"] > 0


def test_random_prefixes_mixed_into_salient_ones(lora, corpus_dir, tmp_path, capsys):
    code, _, _ = run(capsys, "distill", "--adapter", lora, "--target", "tiny-llama", "--corpus", corpus_dir,
                     "--candidates", "10", "--prefixes", "2", "--mix-uniform", "3", "--samples", "1", "--steps", "2",
                     "--out", tmp_path / "s", "--quiet")
    assert code == 0
    data = json.loads((tmp_path / "s" / "cast_distill.json").read_text())["data"]
    assert data["prefixes"] == 5 and data["uniform_prefixes_mixed_in"] == 3
    assert data["train_samples"] + data["heldout_samples"] == 5
    code, _, err = run(capsys, "distill", "--adapter", lora, "--target", "tiny-llama", "--data", "uniform",
                       "--mix-uniform", "3", "--out", tmp_path / "u")
    assert code == 2 and "--mix-uniform adds random prefixes to salient ones" in err


def test_the_prompts_own_tokens_are_trained_at_their_weight(lora, tmp_path, capsys, monkeypatch):
    import pipeline.assemble.student as student

    seen = []  # what every step packed: the teacher along each of its prompts, and the weight
    monkeypatch.setattr(student, "packed_batch",
                        lambda groups, pad, along, w: seen.append((groups, along, w)) or packed_batch(groups, pad, along, w))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(e.prompt for e in load_task("add2", split="train", seed=0).train[:6]) + "\n")
    argv = ["distill", "--adapter", lora, "--target", "tiny-llama", "--data", "prompts", "--prompts", prompts,
            "--samples", "2", "--steps", "3", "--batch-size", "4", "--heldout", "0", "--quiet"]
    code, _, _ = run(capsys, *argv, "--prompt-weight", "0.5", "--out", tmp_path / "w")
    assert code == 0
    data = json.loads((tmp_path / "w" / "cast_distill.json").read_text())["data"]
    assert data["prompt_weight"] == 0.5 and data["prompt_columns"] > 6  # several columns of each of 6 prompts
    assert len(seen) == 3 and all(w == 0.5 and len(along) == len(groups) for groups, along, w in seen)
    for groups, along, _ in seen:
        for g, a in zip(groups, along):
            assert a.cols and max(a.cols) < g[0].start - 1  # the prompt's own columns, not its last
    every = {tuple(g[0].ids[:g[0].start]): a.cols for groups, along, _ in seen for g, a in zip(groups, along)}
    seen.clear()
    assert run(capsys, *argv, "--prompt-weight", "0.5", "--prompt-positions", "2", "--steps", "6",
               "--out", tmp_path / "p2")[0] == 0  # two epochs of the 6 prompts, 2 a step
    drawn = {}
    for groups, along, _ in seen:
        for g, a in zip(groups, along):
            drawn.setdefault(tuple(g[0].ids[:g[0].start]), []).append(tuple(a.cols))
    assert drawn.keys() == every.keys() and all(len(d) == 2 for d in drawn.values())
    assert all(len(c) == min(2, len(every[k])) and set(c) <= set(every[k]) for k, d in drawn.items() for c in d)
    assert any(d[0] != d[1] for d in drawn.values())  # drawn anew each time a prompt comes back
    seen.clear()
    assert run(capsys, *argv, "--out", tmp_path / "z")[0] == 0  # the default: continuations only
    assert all(along is None for _, along, _ in seen)
    code, _, err = run(capsys, *argv, "--prompt-weight", "1", "--no-pack", "--out", tmp_path / "n")
    assert code == 2 and "--prompt-weight 1.0: must be 0 or more, and above 0 only with --pack" in err

    from pipeline.assemble.teacher import Along
    from pipeline.assemble.teacher_files import along_kept

    made = []  # an interrupted run's teacher along its prompts is read back, for its own key only

    def make():
        made.append(1)
        return [Along([1, 3], torch.ones(2, 4, dtype=torch.int32), torch.zeros(2, 4)),
                Along([], torch.zeros(0, 4, dtype=torch.int32), torch.zeros(0, 4))]
    (tmp_path / "k").mkdir()
    first, again = along_kept(tmp_path / "k", "a", make), along_kept(tmp_path / "k", "a", make)
    assert made == [1] and [x.cols for x in again] == [[1, 3], []] and torch.equal(again[0].top_ids, first[0].top_ids)
    along_kept(tmp_path / "k", "b", make)
    assert made == [1, 1]


def test_salience_read_from_the_store_is_what_the_lora_adds(lora, corpus_dir, tmp_path, capsys):
    from pipeline.assemble.teacher import stored_prefixes

    store = tmp_path / "src.zarr"
    assert main(["extract", "--model", "tiny-llama", "--corpus", str(corpus_dir), "--out", str(store),
                 "--sites", "attn_in", "--dtype", "float32", "--workers", "0", "--quiet"]) == 0
    prefixes, scores, median = stored_prefixes(str(store), str(lora), str(corpus_dir), 2, context_chars=10_000)
    assert len(prefixes) == 2 and scores[0] >= scores[1] > median

    # The same number from the model: what the LoRA adds at each adapted module, summed, on
    # the inputs the store holds (those of the base model, as extracted).
    lm = load_model("tiny-llama")
    peft = load_adapter(lm.model, lora)
    norms = []

    def hook(module, args, out):
        x = args[0]
        norms.append((module.lora_B["default"](module.lora_A["default"](x)) * module.scaling["default"]).norm(dim=-1))
    handles = [m.register_forward_hook(hook) for n, m in peft.named_modules() if n.endswith(("q_proj", "v_proj"))
               and hasattr(m, "lora_A")]
    enc = lm.tokenizer(prefixes[0], return_tensors="pt")
    with torch.no_grad(), peft.disable_adapter():
        peft(**enc)
    for h in handles:
        h.remove()
    assert torch.stack(norms).sum(0)[0, -1].item() == pytest.approx(scores[0], rel=1e-3)


def test_more_prompts_keeps_complete_new_items(monkeypatch):
    """The source writes a list; only items it finished (separator after them), new and
    distinct, become prompts."""
    import contextlib

    from pipeline.assemble.teacher import SEPARATOR, more_prompts

    tok = load_model("tiny-llama").tokenizer
    import itertools

    writes = itertools.cycle(["12+5=" + SEPARATOR + "x", "3+4=", "66+79=" + SEPARATOR, "12+5=" + SEPARATOR,
                              "8+8=" + SEPARATOR])

    class Writer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        @contextlib.contextmanager
        def disable_adapter(self):
            yield

        def generate(self, input_ids, **_):
            rows = [tok(next(writes), add_special_tokens=False).input_ids for _ in range(len(input_ids))]
            width = max(map(len, rows))
            new = torch.tensor([r + [tok.eos_token_id] * (width - len(r)) for r in rows])
            return torch.cat([input_ids, new], 1)

    got = more_prompts(Writer(), tok, ["66+79=", "1+2="], n=3, batch_size=5, progress=False)
    assert got == ["12+5=", "8+8="]  # unfinished, a seed and repeats are dropped; 4·n items tried at most


def test_augmented_prompts_never_include_test_prompts(lora, tmp_path, capsys, monkeypatch):
    import pipeline.assemble.student as student

    test = load_task("add2", split="test", seed=0).test
    monkeypatch.setattr(student, "more_prompts", lambda *a, **k: ["1+9=", test[0].prompt, "2+9="])
    good = tmp_path / "good.txt"
    good.write_text("1+1=\n2+5=\n")
    code, _, _ = run(capsys, "distill", "--adapter", lora, "--target", "tiny-llama", "--data", "prompts",
                     "--prompts", good, "--augment", "3", "--samples", "1", "--heldout", "0", "--out", tmp_path / "a",
                     "--steps", "1", "--quiet")
    assert code == 0
    data = json.loads((tmp_path / "a" / "cast_distill.json").read_text())["data"]
    assert data["augmented"] == {"written": 3, "dropped_as_test_prompts": 1}
    assert data["prefixes"] == 4 and data["train_samples"] == 4 and data["k"] == 2


def test_a_cooler_teacher_writes_likelier_text_and_keeps_its_own_targets():
    """--temperature chooses the text only: the tokens drawn at 0.05 are likelier under the
    teacher than those drawn at 1, and every position's targets are still the teacher's own
    log-probabilities (temperature 1), as scoring the sample afresh through the proxy gives."""
    from peft import LoraConfig, get_peft_model

    from pipeline.assemble import teacher
    from pipeline.assemble.proxy import LogitProxy, processors

    torch.manual_seed(0)
    src, tgt = load_model("tiny-llama"), load_model("tiny-gemma3")
    source = get_peft_model(src.model, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False)).eval()
    prompts = [e.prompt for e in load_task("capital", split="train", seed=0).train[:4]]

    def draw(temperature):
        proxy = LogitProxy(source, src.tokenizer, tgt.tokenizer)
        return teacher.sample_teacher(tgt.model, tgt.tokenizer, proxy, prompts, 4, 8, top_k=8, batch_size=8,
                                      progress=False, temperature=temperature)

    def scored(x):  # the teacher's log-probabilities at each continuation position, computed afresh
        with torch.no_grad():
            for j in range(len(x.ids) - x.start):
                prefix = torch.tensor([x.ids[:x.start + j]])
                logits = tgt.model(input_ids=prefix).logits[:, -1].float()
                yield processors(LogitProxy(source, src.tokenizer, tgt.tokenizer))(prefix, logits).log_softmax(-1)[0]

    def written_lp(samples, scores):  # mean teacher log-probability of the tokens it wrote
        lps = [lp[x.ids[x.start + j]].item() for x, lp_x in zip(samples, scores) for j, lp in enumerate(lp_x)]
        return sum(lps) / len(lps)

    hot, cool = draw(1.0), draw(0.05)
    hot_lp, cool_lp = [list(scored(x)) for x in hot], [list(scored(x)) for x in cool]  # each sample scored once
    assert written_lp(cool, cool_lp) > written_lp(hot, hot_lp) + 0.2
    for x, lp_x in zip(cool[:4], cool_lp):
        for j, lp in enumerate(lp_x):
            assert torch.allclose(lp[x.top_ids[j].long()], x.top_lp[j], atol=1e-4)
