"""The logit proxy: the target decodes with the source LoRA's change of next-token
log-probabilities added to its own logits, on the tokens both vocabularies spell alike
(docs/design.md#the-logit-proxy).

    z_t(text) + [ log p_src+LoRA(. | text) - log p_src(. | text) ]   on shared tokens

Both models read the same text; the source's change is taken at the end of that text, so
the two tokenizers never need a common boundary inside it. Nothing here is fitted: the map
between the vocabularies is string equality (plus eos to eos), and the source LoRA is used
as trained. It needs the source model beside the target at inference, so it is not a LoRA
on the target; `cast validate` reports it as its own row, as a measure of how much of the
LoRA's behaviour survives at the output when no activation map is involved.
"""
from __future__ import annotations

import torch

from pipeline.lora.train import causal_lm_logits

_SPACE_MARKS = {"Ġ": " ", "▁": " ", "Ċ": "\n"}  # byte-level BPE and SentencePiece spellings


def token_strings(tokenizer) -> dict[str, int]:
    """Surface string -> first id, for every non-special token."""
    out: dict[str, int] = {}
    special = set(tokenizer.all_special_ids)
    for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if tok is None or i in special or (tok.startswith("<") and tok.endswith(">")):
            continue
        out.setdefault("".join(_SPACE_MARKS.get(c, c) for c in tok), i)
    return out


def shared_vocab(src_tok, tgt_tok) -> tuple[torch.Tensor, torch.Tensor]:
    """(source ids, target ids) of the tokens both vocabularies spell alike, and eos."""
    a, b = token_strings(src_tok), token_strings(tgt_tok)
    common = sorted(set(a) & set(b))
    pairs = [(a[s], b[s]) for s in common] + [(src_tok.eos_token_id, tgt_tok.eos_token_id)]
    return torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


class LogitProxy:
    """The source LoRA's log-probability change, placed on the target's vocabulary.

    `source` is a PEFT model (the source with its LoRA); its disable_adapter() gives the
    base. Use shift(texts) for teacher-forced scoring and the instance itself as a
    transformers LogitsProcessor for generation with the target."""

    def __init__(self, source, src_tok, tgt_tok, batch_size: int = 32):
        self.source, self.src_tok, self.tgt_tok = source, src_tok, tgt_tok
        self.ids_s, self.ids_t = shared_vocab(src_tok, tgt_tok)
        self.batch_size = batch_size
        self.pad = src_tok.pad_token_id if src_tok.pad_token_id is not None else src_tok.eos_token_id

    @torch.no_grad()
    def delta(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), shared) source log-probability change at the end of each text."""
        device = next(self.source.parameters()).device
        out = []
        for s in range(0, len(texts), self.batch_size):
            enc = [self.src_tok(t, add_special_tokens=True).input_ids for t in texts[s:s + self.batch_size]]
            width = max(map(len, enc))
            ids = torch.full((len(enc), width), self.pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, e in enumerate(enc):  # left-padded: every text ends in the last column
                ids[i, width - len(e):], mask[i, width - len(e):] = torch.tensor(e), 1
            kw = dict(input_ids=ids.to(device), attention_mask=mask.to(device),
                      position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device))
            last = torch.zeros_like(ids, dtype=torch.bool)
            last[:, -1] = True
            last = last.to(device)
            with_lora = causal_lm_logits(self.source, last, **kw).log_softmax(-1)
            with self.source.disable_adapter():
                base = causal_lm_logits(self.source, last, **kw).log_softmax(-1)
            out.append((with_lora - base)[:, self.ids_s.to(device)])
        return torch.cat(out)

    def shift(self, texts: list[str], vocab: int) -> torch.Tensor:
        """(len(texts), vocab) additive target logits: the change on shared tokens, 0 elsewhere."""
        d = self.delta(texts)
        z = torch.zeros(len(texts), vocab, device=d.device)
        z[:, self.ids_t.to(d.device)] = d
        return z

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """transformers LogitsProcessor: the target's text so far, decoded, is what the source reads."""
        texts = self.tgt_tok.batch_decode(input_ids, skip_special_tokens=True)
        return scores + self.shift(texts, scores.shape[-1]).to(scores.device, scores.dtype)
