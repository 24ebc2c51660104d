"""The logit proxy: the target decodes with the source LoRA's change of next-token
log-probabilities added to its own logits, on the tokens both vocabularies spell alike
(docs/design.md#the-logit-proxy).

    z_t(text) + [ log p_src+LoRA(. | text) - log p_src(. | text) ]   on shared tokens
    every other target token: the change of the source token its text begins with
    (others="prefix", the default), or of the source's mass outside the shared tokens ("rest")

A token the source + LoRA gives less than `plausible` times its top token's probability
keeps its change only if the change is a fall.

Both models read the same text; the source's change is taken at the end of that text, so
the two tokenizers never need a common boundary inside it. Nothing here is fitted: the map
between the vocabularies is byte equality (plus eos to eos), and the source LoRA is used
as trained. It needs the source model beside the target at inference, so it is not a LoRA
on the target; `cast distill` turns it into one.
"""
from __future__ import annotations

import hashlib
import json
import math
import re

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from pipeline.assemble import OTHERS, PLAUSIBLE, check_plausible
from pipeline.lora.batching import left_pad
from pipeline.lora.train import causal_lm_logits

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class ProxyError(ValueError):
    """Input the proxy cannot read (said in one line)."""


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's scheme): printable
    Latin-1 bytes stand for themselves, the rest are shifted to 256 + n in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, n = {chr(b): b for b in keep}, 0
    for b in range(256):
        if b not in keep:
            out[chr(256 + n)] = b
            n += 1
    return out


def _decoder_steps(tokenizer) -> list[dict]:
    """The fast tokenizer's decoder, flattened ([] for a slow tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()).get("decoder") if backend is not None else None
    steps, todo = [], [spec]
    while todo:
        d = todo.pop(0)
        if d:
            steps.append(d)
            todo[:0] = d.get("decoders") or []
    return steps


def token_bytes(tokenizer) -> dict[int, bytes]:
    """id -> the bytes it stands for, for every non-special token. Byte-level BPE maps each
    symbol back to its byte; SentencePiece-style vocabularies spell a space `▁` and keep
    `<0xNN>` byte tokens. A lone lead or continuation byte (not whole UTF-8) is kept: it
    pairs only with a token of exactly that byte, never with a character that merely looks
    like its byte-level symbol (SmolLM2's 0xC3 is not Gemma-3's `Ã`, which is C3 83)."""
    steps = _decoder_steps(tokenizer)
    kinds = {d.get("type") for d in steps}
    byte_level = "ByteLevel" in kinds
    alphabet = _byte_level_alphabet() if byte_level else {}
    replace = [(d["pattern"].get("String", ""), d["content"]) for d in steps
               if d.get("type") == "Replace" and d.get("pattern", {}).get("String")]
    replace += [(d.get("replacement", "▁"), " ") for d in steps if d.get("type") == "Metaspace"]
    if not byte_level and not replace:  # a slow SentencePiece tokenizer: its space mark
        replace = [("▁", " ")]
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    out: dict[int, bytes] = {}
    for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if tok is None or i in special:
            continue
        if byte_level:
            if any(c not in alphabet for c in tok):
                continue  # an added token spelled in plain characters: not byte-level text
            raw = bytes(alphabet[c] for c in tok)
        elif (m := _BYTE_TOKEN.fullmatch(tok)) is not None:
            raw = bytes([int(m.group(1), 16)])
        else:
            for mark, text in replace:
                tok = tok.replace(mark, text)
            raw = tok.encode("utf-8")
        if raw:
            out[i] = raw
    return out


def shared_vocab(src_tok, tgt_tok) -> tuple[torch.Tensor, torch.Tensor]:
    """(source ids, target ids) of the tokens that stand for the same bytes in both
    vocabularies, and eos with eos. Where one vocabulary has two tokens for the same bytes
    (a `<0xNN>` byte token beside a plain one), the plain one is paired: it is the one
    its tokenizer produces for that text."""
    def by_bytes(tok) -> dict[bytes, int]:
        first: dict[bytes, int] = {}
        fallback = {i for i, t in enumerate(tok.convert_ids_to_tokens(list(range(len(tok)))))
                    if t and _BYTE_TOKEN.fullmatch(t)}
        for i, raw in sorted(token_bytes(tok).items(), key=lambda kv: (kv[0] in fallback, kv[0])):
            first.setdefault(raw, i)
        return first

    a, b = by_bytes(src_tok), by_bytes(tgt_tok)
    common = sorted(set(a) & set(b))
    pairs = [(a[s], b[s]) for s in common] + [(src_tok.eos_token_id, tgt_tok.eos_token_id)]
    return torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


def first_source_tokens(src_tok, tgt_tok, ids_s: torch.Tensor, ids_t: torch.Tensor) -> torch.Tensor:
    """(len(tgt_tok),) for every target token the source token its text begins with: the
    first of the source's tokenization of its bytes (its byte-identical partner where it
    has one); -1 for specials and lone bytes without a partner."""
    raw = token_bytes(tgt_tok)
    ids, texts = [], []
    for i, b in raw.items():
        try:
            texts.append(b.decode("utf-8"))
            ids.append(i)
        except UnicodeDecodeError:
            continue
    out = torch.full((len(tgt_tok),), -1, dtype=torch.long)
    special = set(src_tok.all_special_ids)  # e.g. <unk> for text the source cannot spell: no evidence
    for i, enc in zip(ids, src_tok(texts, add_special_tokens=False).input_ids if texts else []):
        if enc and enc[0] not in special:
            out[i] = enc[0]
    out[ids_t] = ids_s
    return out


MAPS_VERSION = 1
"""Bump when token_bytes, shared_vocab or first_source_tokens change what they return: the
maps cached on disk under an older version are then never read."""
_MAPS: dict[str, dict[str, torch.Tensor]] = {}


def _fingerprint(tok) -> str | None:
    """What the maps depend on: the fast tokenizer's whole definition and the ids it treats
    as special (None for a slow tokenizer: its maps are not cached)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return None
    h = hashlib.sha256(backend.to_str().encode())
    h.update(json.dumps([len(tok), tok.eos_token_id, sorted(tok.all_special_ids)]).encode())
    return h.hexdigest()


def vocab_maps(src_tok, tgt_tok) -> dict[str, torch.Tensor]:
    """shared_vocab's pairs (ids_s, ids_t) and first_source_tokens (first) for a tokenizer
    pair. They take ~12 s for a 262k vocabulary and depend on the tokenizers alone, while a
    `cast run` builds the proxy eight times (each distillation, each validation), so they
    are kept in memory and in the cache ($CAST_CACHE/proxy-vocab, keyed by both tokenizers'
    fingerprints), written whole or not at all."""
    from safetensors.torch import load_file, save_file

    from pipeline.cache import cache_dir
    from storage.files import atomic_path

    prints = (_fingerprint(src_tok), _fingerprint(tgt_tok))
    key = None if None in prints else hashlib.sha256(f"{MAPS_VERSION}:{prints}".encode()).hexdigest()[:32]
    if key in _MAPS:
        return _MAPS[key]
    path = cache_dir() / "proxy-vocab" / f"{key}.safetensors"
    if key is not None and path.exists():
        try:
            _MAPS[key] = load_file(path)
            return _MAPS[key]
        except Exception:  # unreadable (a disk fault): recomputed and rewritten below
            pass
    ids_s, ids_t = shared_vocab(src_tok, tgt_tok)
    maps = {"ids_s": ids_s, "ids_t": ids_t, "first": first_source_tokens(src_tok, tgt_tok, ids_s, ids_t)}
    if key is not None:
        with atomic_path(path) as tmp:
            save_file(maps, str(tmp))
        _MAPS[key] = maps
    return maps




class LogitProxy(LogitsProcessor):
    """The source LoRA's log-probability change, placed on the target's vocabulary.

    `source` is a PEFT model (the source with its LoRA); its disable_adapter() gives the
    base. Use shift(texts, vocab) for teacher-forced scoring and the instance (or
    `LogitsProcessorList([proxy])`) as a transformers logits processor when the target
    generates. `others` says what the target tokens without a byte-identical source token
    get (docs/design.md#the-logit-proxy): "prefix" (default) the change of the source token
    their text begins with; "rest" the change of the source's mass outside the shared
    tokens; "none" nothing (the first proxy). cache=False re-reads the whole text at every
    generated token (the reference the cache is tested against); one_pass=False makes the
    cache read the source twice a step, LoRA on then off, instead of once over both (the
    reference one pass is measured against)."""

    def __init__(self, source, src_tok, tgt_tok, batch_size: int = 32, others: str = "prefix",
                 cache: bool = True, one_pass: bool = True, plausible: float = PLAUSIBLE):
        if others not in OTHERS:
            raise ProxyError(f"others={others!r}: choose one of {', '.join(OTHERS)}")
        check_plausible("plausible", plausible, ProxyError)
        self.plausible = plausible
        self.source, self.src_tok, self.tgt_tok = source, src_tok, tgt_tok
        maps = vocab_maps(src_tok, tgt_tok)
        self.ids_s, self.ids_t = maps["ids_s"], maps["ids_t"]
        vocab_s = source.get_output_embeddings().weight.shape[0]
        rest = torch.ones(vocab_s, dtype=torch.bool)
        rest[self.ids_s] = False
        self.rest_s = rest.nonzero()[:, 0]
        self.map_s, self.map_t = self.ids_s, self.ids_t  # (source, target) ids whose change is copied
        if others == "prefix":
            first = maps["first"]
            self.map_t = (first >= 0).nonzero()[:, 0]
            self.map_s = first[self.map_t]
        self.batch_size, self.others, self.cache, self._cache = batch_size, others, cache, None
        self.one_pass = one_pass
        self.pad = src_tok.pad_token_id if src_tok.pad_token_id is not None else src_tok.eos_token_id

    def _encode(self, texts: list[str]) -> list[list[int]]:
        enc = [self.src_tok(t, add_special_tokens=True).input_ids for t in texts]
        if any(not e for e in enc):
            raise ProxyError("the logit proxy reads the text before each generated token, and a prompt is "
                             "empty: give every prompt at least one character")
        return enc

    @torch.no_grad()
    def delta(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """At the end of each text: (len(texts), source vocab) change of the source's
        log-probability of each token, and (len(texts),) change of its log-mass outside the
        shared tokens."""
        device = next(self.source.parameters()).device
        enc = self._encode(texts)
        shared, rest = [], []
        for s in range(0, len(enc), self.batch_size):
            ids, mask, pos = (t.to(device) for t in left_pad(enc[s:s + self.batch_size], self.pad))
            last = torch.zeros_like(ids, dtype=torch.bool)
            last[:, -1] = True  # left-padded: every text ends in the last column
            kw = dict(input_ids=ids, attention_mask=mask, position_ids=pos)
            with_lora = causal_lm_logits(self.source, last, **kw).float().log_softmax(-1)
            with self.source.disable_adapter():
                base = causal_lm_logits(self.source, last, **kw).float().log_softmax(-1)
            d, r = self.split(with_lora, base)
            shared.append(d)
            rest.append(r)
        return torch.cat(shared), torch.cat(rest)

    def place(self, d: torch.Tensor, r: torch.Tensor, vocab: int) -> torch.Tensor:
        """(rows, vocab) additive target logits from delta()'s two parts: mapped target tokens
        copy their source token's change, the rest get the rest-mass change (0 with "none")."""
        z = (torch.zeros_like(r) if self.others == "none" else r)[:, None].expand(len(d), vocab).clone()
        keep = self.map_t < vocab  # a tokenizer may name more ids than the model's head has rows
        z[:, self.map_t[keep].to(d.device)] = d[:, self.map_s[keep].to(d.device)]
        return z

    def split(self, with_lora: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """delta()'s two parts from the source's log-probabilities with and without the LoRA.

        With plausible = a > 0, a token the source + LoRA itself gives less than a times its
        top token's probability gets no rise: a ratio between two negligible probabilities
        says nothing about the target, whose own probability of the token may be far from
        negligible (SmolLM2's LoRA raises its eos, <|im_end|>, from 4e-9 to 2e-6 after
        "44+42=": a 650-fold rise that put Gemma's eos, at 2e-3 there, on top)."""
        rest = (with_lora[:, self.rest_s.to(with_lora.device)].logsumexp(-1)
                - base[:, self.rest_s.to(base.device)].logsumexp(-1)) if len(self.rest_s) else base[:, 0] * 0
        d = with_lora - base
        if self.plausible > 0:
            low = with_lora < with_lora.max(-1, keepdim=True).values + math.log(self.plausible)
            d = torch.where(low & (d > 0), torch.zeros_like(d), d)
        return d, rest

    def shift(self, texts: list[str], vocab: int) -> torch.Tensor:
        """(len(texts), vocab) additive target logits (see place())."""
        return self.place(*self.delta(texts), vocab)

    @torch.no_grad()
    def shift_along(self, texts: list[str], vocab: int) -> tuple[list[int], torch.Tensor]:
        """shift() for texts that each begin the last one (a text read token by token), from one
        source pass with and one without the LoRA over the last: the indices of the texts kept and
        their (kept, vocab) shifts. A text is kept where the source reads it as the first tokens of
        the last one; one that ends inside a token the source reads whole (mid-word for the
        source, not for the target) is left out, its source reading being another text's."""
        enc = self._encode(texts)
        keep = [i for i, e in enumerate(enc) if enc[-1][:len(e)] == e]
        at, rows = torch.tensor([len(enc[i]) - 1 for i in keep]).unique(return_inverse=True)  # sorted positions
        device = next(self.source.parameters()).device
        ids = torch.tensor([enc[-1]], device=device)
        select = torch.zeros_like(ids, dtype=torch.bool)
        select[0, at] = True
        with_lora = causal_lm_logits(self.source, select, input_ids=ids).float().log_softmax(-1)
        with self.source.disable_adapter():
            base = causal_lm_logits(self.source, select, input_ids=ids).float().log_softmax(-1)
        d, r = self.split(with_lora[rows], base[rows])
        return keep, self.place(d, r, vocab)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """transformers LogitsProcessor: the target's text so far, decoded, is what the source
        reads. With cache=True (the default) the source keeps its KV caches across the steps
        of one generation and reads only the tokens that changed (pipeline/assemble/proxy_cache.py)."""
        texts = self.tgt_tok.batch_decode(input_ids, skip_special_tokens=True)
        if not self.cache:
            return scores + self.shift(texts, scores.shape[-1]).to(scores.device, scores.dtype)
        from pipeline.assemble.proxy_cache import SourceCache

        if self._cache is None or not self._cache.continues(input_ids):
            self._cache = SourceCache(self)
        d, r = self.split(*self._cache.step(input_ids, texts))
        return scores + self.place(d, r, scores.shape[-1]).to(scores.device, scores.dtype)


def processors(proxy: LogitProxy | LogitsProcessorList | None) -> LogitsProcessorList:
    """What model.generate(logits_processor=...) takes, from a proxy, a list or nothing."""
    if proxy is None:
        return LogitsProcessorList()
    return proxy if isinstance(proxy, LogitsProcessorList) else LogitsProcessorList([proxy])
