"""The logit proxy's source at constant cost per generated token.

At every step the proxy must read the target's whole text with the source (with and
without its LoRA). Re-reading it costs a pass over all of it, so a 512-token generation
costs hundreds of times a cached one. Here each row keeps the source token ids it has
read and its KV cache (LoRA on, LoRA off); a step re-tokenizes the text, keeps the
longest prefix of ids that did not change, and reads only the rest. Byte-level BPE can
merge a new piece of text with the last token (" Kual" + "a" -> " Kuala"), so a few
tokens at the tail may be re-read: their old cache slots are masked out, never reused,
and the new ones are appended, with position ids that count real tokens only. A masked
slot has no weight in attention, so the logits equal a fresh read of the text up to
float rounding (tests/pipeline/assemble/test_proxy.py compares greedy outputs).

Both reads (LoRA on, LoRA off) are one forward pass over the rows twice, the first half
with the adapter and the second half without (PEFT's mixed-adapter batch): a decoding
step reads one token per row, where a pass costs mostly the reading of the weights, so two
rows cost less than two single rows do (cast bench part g measures both). A source that
is not a PEFT model with one active, unmerged adapter is read in two passes.

A teacher (`cast distill`) samples each prompt several times in one batch, and reading
the prompts is most of its source work (its continuations are a few tokens): the first
read takes each distinct row once and copies its KV cache to the rows that share it. The
vocabulary head runs on the last column only (`logits_to_keep`), the one the proxy reads.
"""
from __future__ import annotations

import contextlib

import torch


class SourceCache:
    """One generation's source state: per row the (slot, id) pairs read so far, the
    attention mask over every slot written, and the KV caches."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.rows: list[list[tuple[int, int]]] = []
        self.mask: torch.Tensor | None = None
        self.caches: dict[str, object] = {}
        """KV caches by pass: "both" (one pass, LoRA rows then base rows), or "lora" and "base"."""
        self.seen: torch.Tensor | None = None
        self.adapter = mixed_batch_adapter(proxy.source) if proxy.one_pass else None
        """The adapter's name when both reads share one pass; None: two passes."""
        self.keep = logits_to_keep(proxy.source)
        self.kv = cache_arg(proxy.source)

    def continues(self, input_ids: torch.Tensor) -> bool:
        """Whether input_ids is the last step's batch plus one token per row."""
        s = self.seen
        return (s is not None and input_ids.shape[0] == s.shape[0] and input_ids.shape[1] == s.shape[1] + 1
                and bool((input_ids[:, :-1].cpu() == s).all()))

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The source's next-token log-probabilities at the end of each text, (rows, vocab)
        with the LoRA and without."""
        self.seen = input_ids.cpu()
        enc = self.proxy._encode(texts)
        if not self.rows:
            self.rows = [[] for _ in enc]
        device = next(self.proxy.source.parameters()).device
        plan = []
        for i, ids in enumerate(enc):
            old = [t for _, t in self.rows[i]]
            keep = next((j for j, (a, b) in enumerate(zip(old, ids)) if a != b), min(len(old), len(ids)))
            keep = min(keep, len(ids) - 1)  # at least the last token is read: its logits are the answer
            for slot, _ in self.rows[i][keep:]:
                self.mask[i, slot] = 0
            self.rows[i] = self.rows[i][:keep]
            plan.append(ids[keep:])
        width, start = max(map(len, plan)), 0 if self.mask is None else self.mask.shape[1]
        pad = self.proxy.pad
        chunk = torch.full((len(plan), width), pad, dtype=torch.long)
        cmask = torch.zeros_like(chunk)
        pos = torch.zeros_like(chunk)
        for i, new in enumerate(plan):  # right-aligned: every row's last token is in the last column
            off = width - len(new)
            chunk[i, off:], cmask[i, off:] = torch.tensor(new), 1
            pos[i, off:] = torch.arange(len(self.rows[i]), len(self.rows[i]) + len(new))
            pos[i, :off] = len(self.rows[i])  # masked slots: any position, nothing reads them
            self.rows[i] += [(start + off + j, t) for j, t in enumerate(new)]
        first = self.mask is None
        self.mask = cmask if first else torch.cat([self.mask, cmask], 1)
        # The first read is the prompts', and a teacher samples each prompt several times:
        # rows with the same ids are read once and their caches copied (`copies`).
        copies, mask = None, self.mask
        shared = distinct_rows(plan) if first else None
        if shared is not None:
            one, copies = shared
            chunk, mask, pos, copies = chunk[one], mask[one], pos[one], copies.to(device)
        chunk, mask, pos = chunk.to(device), mask.to(device), pos.to(device)
        if self.adapter is not None:
            return self._one_pass(chunk, mask, pos, copies)
        out = {}
        for lora, key in ((True, "lora"), (False, "base")):
            ctx = contextlib.nullcontext() if lora else self.proxy.source.disable_adapter()
            with ctx:
                res = self.proxy.source(input_ids=chunk, attention_mask=mask, position_ids=pos,
                                        **{self.kv: self.caches.get(key)}, use_cache=True, **self.keep)
            self.caches[key] = _copied(returned_cache(res), copies)
            logp = res.logits[:, -1].float().log_softmax(-1)
            out[lora] = logp if copies is None else logp[copies]
        return out[True], out[False]

    def _one_pass(self, chunk: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                  copies: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """step()'s two reads as one pass over (2·rows, width): LoRA rows first."""
        n = chunk.shape[0]
        res = self.proxy.source(input_ids=chunk.repeat(2, 1), attention_mask=mask.repeat(2, 1),
                                position_ids=pos.repeat(2, 1), **{self.kv: self.caches.get("both")}, use_cache=True,
                                adapter_names=[self.adapter] * n + ["__base__"] * n, **self.keep)
        logp = res.logits[:, -1].float().log_softmax(-1)
        if copies is not None:
            logp = torch.cat([logp[:n][copies], logp[n:][copies]])
            copies = torch.cat([copies, copies + n])
        self.caches["both"] = _copied(returned_cache(res), copies)
        return logp.chunk(2)


def distinct_rows(rows: list) -> tuple[list[int], torch.Tensor] | None:
    """(where each distinct row first occurs, for every row the index of its distinct row
    among those), or None when no two rows are alike."""
    where: dict[tuple, int] = {}
    copies = [where.setdefault(tuple(r), len(where)) for r in rows]
    if len(where) == len(rows):
        return None
    return [copies.index(j) for j in range(len(where))], torch.tensor(copies)


def _copied(cache, rows: torch.Tensor | None):
    """The KV cache with its batch rows taken in the order `rows` gives (repeats allowed)."""
    if rows is not None:
        cache.reorder_cache(rows)
    return cache


def _forward_args(model) -> set[str]:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def logits_to_keep(model) -> dict:
    """{"logits_to_keep": 1} when the model's forward takes it (the source's vocabulary
    head then runs on the last column only, the one the proxy reads), else {}."""
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_args(model) else {}


def cache_arg(model) -> str:
    """The name the model's forward (and generate) takes a KV cache by: `cache` where
    transformers has renamed it, else the old `past_key_values` (which its deprecation
    warning says goes in 5.40; pyproject allows any 5.x)."""
    return "cache" if "cache" in _forward_args(model) else "past_key_values"


def returned_cache(output):
    """The KV cache a forward returned, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def mixed_batch_adapter(source) -> str | None:
    """The one active LoRA adapter of a PEFT model in eval mode that can serve a batch whose
    rows choose it or the base, or None (not a PEFT model, several active adapters, merged
    weights, training mode): then the two reads are two passes."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(source, PeftModel) or source.training:
        return None
    active = source.active_adapters
    layers = [m for m in source.modules() if isinstance(m, LoraLayer)]
    if len(active) != 1 or not layers or any(m.merged for m in layers):
        return None
    return active[0]
