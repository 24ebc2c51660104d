"""Text for distilling the logit proxy into a target LoRA, and the proxy's distributions on it.

    prompts   where the continuations start: k unlabelled task prompts (--prompts), or
              prefixes of generic corpus text, chosen by how much the source LoRA acts
              there (salient) or at random (uniform)
    samples   continuations drawn from the teacher itself (the target decoding through the
              proxy; temperature 1 unless asked), so the student learns on text the teacher
              would write
    targets   at every continuation position, the teacher's top-k log-probabilities: the
              sampling step computes them anyway, so scoring costs nothing more

The proxy's distribution is already on the target's vocabulary and tokenization, so the
student (the target with a LoRA) compares with it token for token (docs/design.md#distilling-the-proxy).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from pipeline.lora.batching import left_pad
from pipeline.lora.train import causal_lm_logits


@dataclass
class Sample:
    """One prompt and one continuation the teacher wrote, in the target's token ids."""

    ids: list[int]
    """Prompt (with the tokenizer's specials) + continuation (ending in eos unless cut at the length cap)."""
    start: int
    """Index of the first continuation token: column start-1+j predicts continuation token j."""
    top_ids: torch.Tensor
    """(continuation length, k) the teacher's k likeliest next tokens at each continuation position."""
    top_lp: torch.Tensor
    """(continuation length, k) their log-probabilities under the teacher (the rest of the mass is 1 − Σ exp)."""


@torch.no_grad()
def sample_teacher(model, tokenizer, proxy, prompts: list[str], per_prompt: int, max_new_tokens: int,
                   top_k: int = 64, seed: int = 0, batch_size: int = 8, progress: bool = True,
                   temperature: float = 1.0) -> list[Sample]:
    """per_prompt continuations of each prompt, sampled from the target decoding through
    the proxy (LogitsProcessorList or LogitProxy) at `temperature`, with the teacher's own
    (temperature 1) top-k at every step."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig, TemperatureLogitsWarper

    from pipeline.assemble.proxy import processors

    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # No top-k/top-p, and the temperature applied after the proxy (generate() runs the processors
    # passed to it after its own, in order): the scores it reports are the teacher's logits / temperature.
    gen = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                           pad_token_id=pad, eos_token_id=eos, output_scores=True, return_dict_in_generate=True)
    procs = processors(proxy)
    if temperature != 1.0:
        procs = type(procs)([*procs, TemperatureLogitsWarper(temperature)])
    rows = [p for p in prompts for _ in range(per_prompt)]
    out: list[Sample] = []
    bar = tqdm(total=len(rows), desc="teacher samples", disable=not progress, file=sys.stderr)
    for s in range(0, len(rows), batch_size):
        torch.manual_seed(seed * 1_000_003 + s)  # a batch's draws depend on the seed and its place alone
        enc = [tokenizer(p, add_special_tokens=True).input_ids for p in rows[s:s + batch_size]]
        ids, mask, pos = (t.to(device) for t in left_pad(enc, pad))
        res = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen,
                             logits_processor=procs, **(shared_prompt_cache(model, ids, mask, pos) or {}))
        width = ids.shape[1]
        lp = (torch.stack(res.scores, 1).float() * temperature).log_softmax(-1)  # (batch, steps, vocab)
        for r, prompt_ids in enumerate(enc):
            cont = res.sequences[r, width:].tolist()
            n = cont.index(eos) + 1 if eos in cont else len(cont)
            top = lp[r, :n].topk(top_k, -1)
            out.append(Sample(prompt_ids + cont[:n], len(prompt_ids), top.indices.cpu().to(torch.int32),
                              top.values.cpu()))
        bar.update(len(enc))
    bar.close()
    return out


@dataclass
class Along:
    """The teacher's distribution at a prompt's own tokens, read teacher-forced (the prompt is
    the text the teacher continues; here it predicts the prompt's next token at each place)."""

    cols: list[int]
    """Columns of the prompt's ids whose next token is predicted: those after some text (the proxy reads
    the text decoded so far) that the source reads as the first tokens of the whole prompt (LogitProxy.shift_along)."""
    top_ids: torch.Tensor
    """(len(cols), k) the teacher's k likeliest next tokens there."""
    top_lp: torch.Tensor
    """(len(cols), k) their log-probabilities under the teacher."""

    def some(self, n: int, generator: torch.Generator) -> "Along":
        """n of its columns drawn at random (all of them when n is 0 or at least their number), in order."""
        if not 0 < n < len(self.cols):
            return self
        i = torch.randperm(len(self.cols), generator=generator)[:n].sort().values
        return Along([self.cols[j] for j in i.tolist()], self.top_ids[i], self.top_lp[i])


@torch.no_grad()
def teacher_along(model, tokenizer, proxy, prompts: list[list[int]], top_k: int = 64,
                  progress: bool = True) -> list[Along]:
    """For each prompt (target ids, with the tokenizer's specials), the teacher at its columns
    but the last (which predicts the continuation, sample_teacher's first position): the
    target's logits there plus the proxy's shift for the text decoded up to it, what the
    proxy adds when the target generates that text. One target pass and two source passes a
    prompt (re-reading every prefix would take 45 times that); columns where the source would
    read the text so far otherwise than as the start of the whole are left out."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    out = []
    for ids in tqdm(prompts, desc="teacher along prompts", disable=not progress, file=sys.stderr):
        texts = [tokenizer.decode(ids[:c + 1], skip_special_tokens=True) for c in range(len(ids) - 1)]
        cols = [c for c, t in enumerate(texts) if t]
        if cols:
            kept, shift = proxy.shift_along([texts[c] for c in cols], model.get_output_embeddings().weight.shape[0])
            cols = [cols[i] for i in kept]
        if not cols:
            out.append(Along([], torch.zeros(0, top_k, dtype=torch.int32), torch.zeros(0, top_k)))
            continue
        x = torch.tensor([ids[:-1]], device=device)
        select = torch.zeros_like(x, dtype=torch.bool)
        select[0, cols] = True
        z = causal_lm_logits(model, select, input_ids=x).float()  # (len(cols), vocab)
        lp = (z + shift.to(z.device)).log_softmax(-1)
        top = lp.topk(top_k, -1)
        out.append(Along(cols, top.indices.cpu().to(torch.int32), top.values.cpu()))
    return out


@torch.no_grad()
def shared_prompt_cache(model, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor):
    """The target's KV cache of every left-padded row (left_pad's ids, mask, positions) but its
    last column, each distinct row read once and copied to the rows that share it (a teacher
    samples each prompt several times in a batch), as the keyword generate() goes on from;
    None when no two rows are alike."""
    from pipeline.assemble.proxy_cache import cache_arg, distinct_rows, logits_to_keep, returned_cache

    shared = distinct_rows(ids.tolist())
    if shared is None or ids.shape[1] < 2:
        return None
    one, copies = shared
    cache = returned_cache(model(input_ids=ids[one, :-1], attention_mask=mask[one, :-1], position_ids=pos[one, :-1],
                                 use_cache=True, **logits_to_keep(model)))
    cache.reorder_cache(copies.to(ids.device))
    return {cache_arg(model): cache}


@torch.no_grad()
def salient_prefixes(source, src_tok, texts: list[str], n: int, context_chars: int = 200,
                     batch_size: int = 8, progress: bool = True) -> tuple[list[str], list[float], float]:
    """The n texts where the source LoRA changes the source's next-token distribution most:
    per text, the position of largest KL(source + LoRA || source); the text up to that
    token (its last context_chars, from a word start) is the prefix. Returns the prefixes,
    their KLs (largest first) and the median KL over all texts (what a random pick gets).
    `source` is a PEFT model (disable_adapter() is the base)."""
    from tqdm.auto import tqdm

    device = next(source.parameters()).device
    pad = src_tok.pad_token_id if src_tok.pad_token_id is not None else src_tok.eos_token_id
    best: list[tuple[float, int, int]] = []  # (kl, text index, end character)
    for s in tqdm(range(0, len(texts), batch_size), desc="salience", disable=not progress, file=sys.stderr):
        enc = [src_tok(t, add_special_tokens=True, return_offsets_mapping=True) for t in texts[s:s + batch_size]]
        ids, mask, pos = (t.to(device) for t in left_pad([e.input_ids for e in enc], pad))
        kw = dict(input_ids=ids, attention_mask=mask, position_ids=pos)
        sel = mask.bool()
        lp = causal_lm_logits(source, sel, **kw).log_softmax(-1)
        with source.disable_adapter():
            lb = causal_lm_logits(source, sel, **kw).log_softmax(-1)
        kl = (lp.exp() * (lp - lb)).sum(-1)
        at = 0
        for i, e in enumerate(enc):  # rows of `sel` in row-major order: text i's tokens in order
            k = kl[at:at + len(e.input_ids)]
            at += len(e.input_ids)
            j = int(k.argmax())
            best.append((float(k[j]), s + i, e.offset_mapping[j][1]))
    best.sort(reverse=True)
    prefixes, scores = [], []
    for kl_value, i, end in best[:n]:
        cut = _trim(texts[i][:end], context_chars)
        if cut.strip():
            prefixes.append(cut)
            scores.append(kl_value)
    return prefixes, scores, best[len(best) // 2][0] if best else 0.0


def _trim(text: str, context_chars: int) -> str:
    """The last context_chars of text, from a word start."""
    cut = text[-context_chars:]
    return cut[cut.index(" ") + 1:] if len(text) > context_chars and " " in cut else cut


def stored_prefixes(store_path: str, adapter: str, corpus: str, n: int,
                    context_chars: int = 200) -> tuple[list[str], list[float], float]:
    """salient_prefixes without running a model: per token of the source store, the norm of
    what the LoRA adds at every module it adapts, scale·‖B·A·x‖ summed over them, with x
    the module's input as the store holds it. Per segment the largest such token ends the
    prefix; the n segments where it is largest are kept. Returns prefixes, their scores
    and the median over all segments."""
    import dask.array as da
    import numpy as np

    from pipeline.assemble.bridge import read_lora
    from pipeline.cache.corpus import load_corpus, segment
    from pipeline.cache.hooks import IN_SITE
    from storage import open_store

    store, lw = open_store(store_path), read_lora(adapter)
    need = sorted({(layer, IN_SITE[m]) for layer, m in lw.layers})
    missing = [f"layer {layer} {site}" for layer, site in need if layer not in store.layers or site not in store.sites]
    if missing:
        raise ValueError(f"--store {store_path} lacks what the adapter reads: {', '.join(missing[:4])}; extract the "
                         f"adapter's base model with --sites {','.join(sorted({s for _, s in need}))} at every layer")
    # ‖scale·B·A·x‖² = aᵀ·G·a with a = A·x (r numbers) and G = scale²·BᵀB (r × r): the
    # modules that read one (layer, site) share one pass over it, and the pass costs r
    # columns per module instead of out (on the default pair 10-14 s per adapter instead of
    # 15-21 s, the same 48 prefixes). float64: the ranking does not hinge on float32 rounding.
    total, by_input = 0, {}
    for (layer, module), (a, b) in sorted(lw.layers.items()):
        b = b.double()
        by_input.setdefault((layer, IN_SITE[module]), []).append((a.double(), lw.scale ** 2 * (b.T @ b)))
    for (layer, site), mods in by_input.items():
        a_all = torch.cat([a for a, _ in mods]).T.numpy()  # (in, Σr)
        xa = store.array(layer, site).astype(np.float64) @ a_all  # (tokens, Σr)
        at = 0
        for a, g in mods:
            part = xa[:, at:at + len(a)]
            at += len(a)
            total = total + da.sqrt(da.maximum((part @ g.numpy() * part).sum(axis=1), 0.0))
    meta = store.tokens()
    score, seg, end = da.compute(total, meta["segment_id"], meta["char_end"])
    best: dict[int, tuple[float, int]] = {}
    for v, g, e in zip(score.tolist(), seg.tolist(), end.tolist()):
        if v > best.get(g, (-1.0, 0))[0]:
            best[g] = (v, e)
    info = store.meta["corpus"]
    text = load_corpus(corpus)
    if text.hash != info["hash"]:
        raise ValueError(f"--corpus {corpus} is not the text --store {store_path} read (corpus hash "
                         f"{text.hash[:12]} vs {info['hash'][:12]}); pass the corpus the store was extracted from")
    segments = segment(text, info["max_chars"])
    ranked = sorted(((v, g, e) for g, (v, e) in best.items()), reverse=True)
    chosen = [(v, _trim(segments[g].text[:e], context_chars)) for v, g, e in ranked[:n]]
    chosen = [(v, p) for v, p in chosen if p.strip()]
    return [p for _, p in chosen], [v for v, _ in chosen], ranked[len(ranked) // 2][0] if ranked else 0.0


SEPARATOR = "\n###\n"


@torch.no_grad()
def more_prompts(source, tokenizer, seeds: list[str], n: int, seed: int = 0, batch_size: int = 8,
                 shown: int = 8, max_new_tokens: int = 48, progress: bool = True) -> list[str]:
    """n new prompts in the manner of the seeds, written by the source without its LoRA
    (a PEFT model; the LoRA was trained to answer, not to ask): shown `shown` seeds at a
    time as a list, it writes the next item (temperature 1). Items equal to a seed or to
    each other are dropped; at most 4·n items are tried."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    device = next(source.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    gen = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                           pad_token_id=pad, eos_token_id=eos)
    g = torch.Generator().manual_seed(seed)
    out, seen, tried = [], set(seeds), 0
    bar = tqdm(total=n, desc="more prompts", disable=not progress, file=sys.stderr)
    while len(out) < n and tried < 4 * n:
        contexts = [SEPARATOR.join(seeds[i] for i in torch.randperm(len(seeds), generator=g)[:shown].tolist())
                    + SEPARATOR for _ in range(batch_size)]
        ids, mask, _ = left_pad([tokenizer(c, add_special_tokens=True).input_ids for c in contexts], pad)
        torch.manual_seed(seed * 1_000_003 + tried)
        with source.disable_adapter():
            res = source.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen)
        for row in res[:, ids.shape[1]:].tolist():
            text = tokenizer.decode(row, skip_special_tokens=True)
            item = text.split(SEPARATOR)[0]
            if SEPARATOR in text and item.strip() and item not in seen and len(out) < n:  # complete, new
                out.append(item)
                seen.add(item)
                bar.update(1)
        tried += batch_size
    bar.close()
    return out


def uniform_prefixes(texts: list[str], n: int, seed: int, context_chars: int = 200) -> list[str]:
    """n prefixes of the texts cut at a random word end (the control for salience)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in torch.randperm(len(texts), generator=g)[:n].tolist():
        words = texts[i].split(" ")
        k = int(torch.randint(1, len(words) + 1, (1,), generator=g))
        out.append(" ".join(words[:k])[-context_chars:].lstrip())
    return [p for p in out if p.strip()]


def sparse_kl(student_logits: torch.Tensor, top_ids: torch.Tensor, top_lp: torch.Tensor,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) on the teacher's top-k tokens plus one
    bucket for the rest of the vocabulary: exact for the distributions coarsened that way.
    With `weight` (one per position), the weighted sum instead of the mean."""
    s = student_logits.log_softmax(-1)
    s_top = s.gather(-1, top_ids.long())
    t_rest = torch.log1p(-top_lp.exp().sum(-1).clamp(max=1 - 1e-6))
    s_rest = torch.log1p(-s_top.exp().sum(-1).clamp(max=1 - 1e-6))
    kl = (top_lp.exp() * (top_lp - s_top)).sum(-1) + t_rest.exp() * (t_rest - s_rest)
    return kl.mean() if weight is None else (kl * weight).sum()


def batch_of(samples: list[Sample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Right-padded ids, the positions that predict continuation tokens, and the teacher's
    top-k there in the same row-major order (for sparse_kl)."""
    width = max(len(x.ids) for x in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    select = torch.zeros_like(ids, dtype=torch.bool)
    for r, x in enumerate(samples):
        ids[r, :len(x.ids)] = torch.tensor(x.ids)
        select[r, x.start - 1:len(x.ids) - 1] = True
    return ids, select, (torch.cat([x.top_ids for x in samples]), torch.cat([x.top_lp for x in samples]))
