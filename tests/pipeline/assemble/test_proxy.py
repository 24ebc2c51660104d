"""The logit proxy's vocabulary map and shift, on tokenizers built here whose spellings of
the same bytes differ (byte-level BPE vs SentencePiece-style), and on the pair `cast run`
uses (the cached real tokenizers when present, the tiny presets otherwise)."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from pipeline.assemble.proxy import LogitProxy, ProxyError, shared_vocab, token_bytes


def _fast(vocab: list[str], decoder, pre_tokenizer=None) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, merges=[], unk_token="<unk>"))
    tok.decoder = decoder
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="</s>")


# Byte-level BPE spells each byte with a printable stand-in: Ġ space, ĉ tab, Ċ newline,
# "Ã©" the two bytes of é, "Â£" those of £; a lone "Ã" is the partial byte 0xC3.
BYTE_LEVEL = ["<unk>", "</s>", "Ġ", "ĠĠ", "ĉ", "Ċ", "Ã©", "Â£", "1", "12", "Ã", "A", "ĠĠĠ"]
# SentencePiece-style: ▁ is a space, <0xNN> a byte; "Ã" is the character U+00C3 (bytes
# C3 83), a literal "Ċ" is U+010A, and <0x41> duplicates "A".
SENTENCEPIECE = ["<unk>", "</s>", "▁", "▁▁", "\t", "\n", "é", "£", "1", "12", "Ã", "<0x41>", "A", "Ċ",
                 "<0xC3>", "▁▁▁▁"]
EXPECTED = {"Ġ": "▁", "ĠĠ": "▁▁", "ĉ": "\t", "Ċ": "\n", "Ã©": "é", "Â£": "£", "1": "1", "12": "12", "A": "A",
            "Ã": "<0xC3>", "</s>": "</s>"}


@pytest.fixture(scope="module")
def pair():
    from tokenizers import decoders, pre_tokenizers

    src = _fast(BYTE_LEVEL, decoders.ByteLevel(), pre_tokenizers.ByteLevel(add_prefix_space=False))
    tgt = _fast(SENTENCEPIECE, decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                                  decoders.Fuse()]))
    return src, tgt


def test_pairs_are_the_tokens_that_stand_for_the_same_bytes(pair):
    src, tgt = pair
    assert token_bytes(src)[BYTE_LEVEL.index("Ã©")] == "é".encode()
    assert token_bytes(src)[BYTE_LEVEL.index("Ã")] == b"\xc3"      # the lone byte, not the character Ã
    assert token_bytes(tgt)[SENTENCEPIECE.index("<0xC3>")] == b"\xc3"
    assert token_bytes(tgt)[SENTENCEPIECE.index("Ã")] == "Ã".encode()
    ids_s, ids_t = shared_vocab(src, tgt)
    got = {BYTE_LEVEL[a]: SENTENCEPIECE[b] for a, b in zip(ids_s.tolist(), ids_t.tolist())}
    assert got == EXPECTED


class _Source(torch.nn.Module):
    """A source 'model' whose next-token logits at the last position are fixed, one row
    with its LoRA and one without; the proxy reads only those."""

    def __init__(self, with_lora: torch.Tensor, base: torch.Tensor):
        super().__init__()
        self.rows = {True: with_lora, False: base}
        self.on = True
        self.head = torch.nn.Linear(1, len(base), bias=False)

    def get_output_embeddings(self):
        return self.head

    @contextlib.contextmanager
    def disable_adapter(self):
        self.on = False
        try:
            yield
        finally:
            self.on = True

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.rows[self.on].expand(*input_ids.shape, -1))


def test_the_shift_is_the_change_of_the_paired_source_token(pair):
    src, tgt = pair
    with_lora = torch.tensor([0.0, 1.0, 2.0, 0.5, -1.0, 0.0, 3.0, 1.0, 0.0, 2.0, 1.5, -0.5, 0.0])
    base = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 2.0, 0.5, 0.0, 0.0, 0.0, 1.0])
    p_l, p_b = with_lora.softmax(-1).tolist(), base.softmax(-1).tolist()

    def change(token: str) -> float:
        i = BYTE_LEVEL.index(token)
        return math.log(p_l[i] / p_b[i])

    rest = [i for i, t in enumerate(BYTE_LEVEL) if t not in EXPECTED]  # <unk>, ĠĠĠ
    rest_shift = math.log(sum(p_l[i] for i in rest) / sum(p_b[i] for i in rest))
    # Target tokens without a byte-identical partner: "Ã" (C3 83) begins with the source's
    # lone byte C3, and four spaces with one (the test tokenizer has no merges); <unk> is special.
    starts = {"Ã": "Ã", "▁▁▁▁": "Ġ", "<0x41>": "A"}  # and the byte token A spells what "A" does
    for others in ("prefix", "rest", "none"):
        z = LogitProxy(_Source(with_lora, base), src, tgt, others=others, plausible=0.0).shift(
            ["12 £"], len(SENTENCEPIECE))[0]
        for i, t in enumerate(SENTENCEPIECE):
            partner = next((s for s, u in EXPECTED.items() if u == t), None)
            if partner:
                want = change(partner)
            elif others == "prefix" and t in starts:
                want = change(starts[t])
            else:
                want = {"none": 0.0}.get(others, rest_shift)
            assert z[i].item() == pytest.approx(want, abs=1e-5), (others, t)
    with pytest.raises(ProxyError, match="empty"):
        LogitProxy(_Source(with_lora, base), src, tgt).shift([""], len(SENTENCEPIECE))


def test_a_token_the_lora_leaves_implausible_gets_no_rise(pair):
    src, tgt = pair
    with_lora = torch.tensor([0.0, 1.0, 2.0, 0.5, -1.0, 0.0, 3.0, 1.0, 0.0, 2.0, 1.5, -0.5, 0.0])
    base = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 2.0, 0.5, 0.0, 0.0, 0.0, 1.0]) + 4 * (with_lora < 0)
    lp_l, lp_b = with_lora.log_softmax(-1), base.log_softmax(-1)
    alpha = 0.3  # the LoRA's top token is index 6; below 0.3 of it: every index but 2, 6 and 9
    low = lp_l < lp_l.max() + math.log(alpha)
    loose = LogitProxy(_Source(with_lora, base), src, tgt, others="none", plausible=0.0)
    strict = LogitProxy(_Source(with_lora, base), src, tgt, others="none", plausible=alpha)
    (d0, _), (d1, _) = loose.delta(["12 £"]), strict.delta(["12 £"])
    change = (lp_l - lp_b)
    rises, falls = low & (change > 0), low & (change < 0)
    assert rises.any() and falls.any() and (~low).any()  # the test covers all three cases
    assert torch.allclose(d0[0], change, atol=1e-5)
    assert (d1[0][rises] == 0).all()                                        # no rise from a negligible probability
    assert torch.allclose(d1[0][~rises], change[~rises], atol=1e-5)        # falls and plausible tokens: as before
    z = strict.shift(["12 £"], len(SENTENCEPIECE))[0]
    for a, b in zip(*shared_vocab(src, tgt)):
        assert z[b].item() == pytest.approx(d1[0][a].item(), abs=1e-5)
    for bad in (-0.1, 1.0):
        with pytest.raises(ProxyError, match="plausible"):
            LogitProxy(_Source(with_lora, base), src, tgt, plausible=bad)


def cached_or_tiny() -> tuple[str, str]:
    """The real pair when both are in the user cache, else the tiny presets (no download)."""
    from pipeline.cache.models import REGISTRY, _checkpoint_dir

    real = ("smollm2-135m", "gemma3-270m")
    cache = Path.home() / ".cache" / "cast"
    dirs = [cache / "models" / _checkpoint_dir(REGISTRY[n]).name for n in real]
    return tuple(str(d) for d in dirs) if all((d / "config.json").exists() for d in dirs) else ("tiny-llama",
                                                                                              "tiny-gemma3")


def check_pairs_decode_alike(src_name: str, tgt_name: str) -> int:
    """Every shared pair decodes to the same text with its own tokenizer (after a fixed
    prefix, so no decoder strips a leading space); returns the number of pairs."""
    from pipeline.cache.models import load_tokenizer

    src, tgt = load_tokenizer(src_name), load_tokenizer(tgt_name)

    def text(tok, i: int) -> str:
        a = tok("a", add_special_tokens=False).input_ids
        kw = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return tok.decode(a + [i], **kw)[len(tok.decode(a, **kw)):]

    ids_s, ids_t = shared_vocab(src, tgt)
    pairs = list(zip(ids_s.tolist()[:-1], ids_t.tolist()[:-1]))  # the last pair is eos with eos
    bad = [(src.convert_ids_to_tokens(a), tgt.convert_ids_to_tokens(b)) for a, b in pairs
           if text(src, a) != text(tgt, b)]
    assert not bad, f"{len(bad)} pairs decode differently, e.g. {bad[:5]}"
    return len(pairs)


def test_every_shared_pair_of_the_default_pair_decodes_to_the_same_text():
    assert check_pairs_decode_alike(*cached_or_tiny()) > 50


@pytest.fixture(scope="module")
def tiny_proxy():
    """tiny-llama with a random (non-zero) LoRA as the source, tiny-gemma3 as the target."""
    from peft import LoraConfig, get_peft_model

    from pipeline.cache.models import load_model

    torch.manual_seed(0)
    src, tgt = load_model("tiny-llama"), load_model("tiny-gemma3")
    source = get_peft_model(src.model, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False)).eval()
    return source, src.tokenizer, tgt


def test_the_cached_proxy_decodes_exactly_as_the_uncached_one(tiny_proxy):
    from pipeline.lora.evaluate import generate_greedy
    from pipeline.lora.tasks import load_task

    source, src_tok, tgt = tiny_proxy
    from pipeline.lora.tasks import BUILTINS

    prompts = [e.prompt for name in BUILTINS for e in load_task(name, split="test").test[:50]]
    outs = {}
    for cache in (False, True):
        proxy = LogitProxy(source, src_tok, tgt.tokenizer, cache=cache)
        outs[cache] = generate_greedy(tgt.model, tgt.tokenizer, prompts, 8, batch_size=16, logits_processor=proxy)
    plain = generate_greedy(tgt.model, tgt.tokenizer, prompts, 8, batch_size=16)
    assert outs[True] == outs[False]
    assert outs[True] != plain  # the proxy changed what the target writes


def test_one_source_pass_a_step_gives_the_two_passes_logits(tiny_proxy):
    """The cache reads the source with and without its LoRA in one pass (LoRA rows, then
    base rows); the shift it gives at every step equals two separate passes', and a source
    with merged weights falls back to two passes."""
    from pipeline.assemble import proxy_cache
    from pipeline.lora.tasks import load_task

    source, src_tok, tgt = tiny_proxy
    prompts = [e.prompt for e in load_task("reverse", split="test").test[:6]]
    enc = tgt.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    calls = []
    hook = source.register_forward_pre_hook(lambda *_: calls.append(1))
    shifts = {}
    try:
        for one in (True, False):
            proxy, ids, out, calls[:] = LogitProxy(source, src_tok, tgt.tokenizer, one_pass=one), enc.input_ids, [], []
            for _ in range(5):  # the target's greedy steps, the proxy shifting zeros
                z = proxy(ids, torch.zeros(len(prompts), tgt.model.config.vocab_size))
                out.append(z)
                ids = torch.cat([ids, z.argmax(-1, keepdim=True)], 1)
            shifts[one] = torch.stack(out)
            assert len(calls) == (5 if one else 10)
    finally:
        hook.remove()
    assert (shifts[True] - shifts[False]).abs().max() < 1e-4
    assert shifts[True].abs().max() > 0.1  # the LoRA moved something
    assert proxy_cache.mixed_batch_adapter(source) == "default"
    source.merge_adapter()
    try:
        assert proxy_cache.mixed_batch_adapter(source) is None
    finally:
        source.unmerge_adapter()


def test_a_prompt_that_several_rows_share_is_read_once(tiny_proxy):
    """A teacher samples each prompt several times: the cache's first read takes each
    distinct prompt once and copies its KV cache to the rows that share it, and every step
    after (rows part ways) gives the shift a fresh read of each row's whole text gives."""
    from pipeline.lora.tasks import load_task

    source, src_tok, tgt = tiny_proxy
    prompts = [e.prompt for e in load_task("capital", split="test").test[:3]]
    rows = [p for p in prompts for _ in range(3)]
    enc = tgt.tokenizer(rows, return_tensors="pt", padding=True, padding_side="left")
    vocab = tgt.model.config.vocab_size
    read = []
    hook = source.register_forward_pre_hook(lambda m, a, kw: read.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        for one in (True, False):
            cached, fresh = (LogitProxy(source, src_tok, tgt.tokenizer, cache=c, one_pass=one) for c in (True, False))
            ids, read[:] = enc.input_ids, []
            g = torch.Generator().manual_seed(1)
            for step in range(4):
                zeros = torch.zeros(len(rows), vocab)
                got = cached(ids, zeros)
                if step == 0:
                    assert read == ([2 * len(prompts)] if one else [len(prompts)] * 2)
                assert (got - fresh(ids, zeros)).abs().max() < 1e-4, (one, step)
                ids = torch.cat([ids, torch.randint(10, vocab, (len(rows), 1), generator=g)], 1)  # rows part ways
            assert read[-1] == (2 * len(rows) if one else len(rows))
    finally:
        hook.remove()


def test_the_vocabulary_maps_are_computed_once_per_tokenizer_pair(pair, monkeypatch, tmp_path):
    from pipeline.assemble import proxy as proxy_mod

    src, tgt = pair
    monkeypatch.setenv("CAST_CACHE", str(tmp_path))
    monkeypatch.setattr(proxy_mod, "_MAPS", {})
    fresh = proxy_mod.vocab_maps(src, tgt)
    ids_s, ids_t = shared_vocab(src, tgt)
    assert torch.equal(fresh["ids_s"], ids_s) and torch.equal(fresh["ids_t"], ids_t)
    assert torch.equal(fresh["first"], proxy_mod.first_source_tokens(src, tgt, ids_s, ids_t))
    assert len(list((tmp_path / "proxy-vocab").glob("*.safetensors"))) == 1

    def recomputed(*_):
        raise AssertionError("the maps were recomputed, not read from the cache")

    monkeypatch.setattr(proxy_mod, "first_source_tokens", recomputed)
    monkeypatch.setattr(proxy_mod, "_MAPS", {})  # a new process: only the disk holds them
    again = proxy_mod.vocab_maps(src, tgt)
    assert all(torch.equal(again[k], fresh[k]) for k in fresh)
    z = LogitProxy(_Source(torch.zeros(len(BYTE_LEVEL)), torch.zeros(len(BYTE_LEVEL))), src, tgt)
    assert torch.equal(z.map_s, fresh["first"][z.map_t])

    # another tokenizer (one more token) is another key: computed, not read
    other = _fast(SENTENCEPIECE + ["é1"], tgt.backend_tokenizer.decoder)
    with pytest.raises(AssertionError, match="recomputed"):
        proxy_mod.vocab_maps(src, other)
