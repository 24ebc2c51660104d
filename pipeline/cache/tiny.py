"""Tiny random presets for tests: two architectures with two *different* tokenizers,
so cross-tokenizer alignment is exercised exactly as with the real pair.

Everything is built from code (configs, a synthetic training text for the tokenizers,
seeded random weights): no download, and the same bytes on every machine.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from pipeline.cache import cache_dir
from pipeline.cache.checkpoint import INFO_FILE, write_info
from storage.files import atomic_path, sha256_file

# Bumped whenever a preset's construction changes, so stale cached builds are not reused.
TINY_VERSION = 1

_WORDS = (
    "the a of and to in is was for on that with as by it at from his her they we you this "
    "be are or an not have had which one all were when there can more been if no their "
    "time would some into could two other new first after years water people number long "
    "small city house river light stone green quickly slowly seven eleven forty hundred "
    "running jumped between under above morning evening market letter garden window"
).split()


def _training_text(n_lines: int = 400) -> list[str]:
    rng = random.Random(1234)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 9999)))
        lines.append(" ".join(words).capitalize() + rng.choice([".", ",", "!", "?", ";"]))
    return lines


def _alphabet() -> list[str]:
    return [chr(c) for c in range(32, 127)]


def _bytelevel_bpe(vocab_size: int):
    """SmolLM2-like: byte-level BPE, no BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    return tok, dict(eos_token="<|endoftext|>", pad_token="<|pad|>")


def _metaspace_bpe(vocab_size: int):
    """Gemma-like: SentencePiece-style metaspace BPE that prepends <bos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=_alphabet() + ["▁"], show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    return tok, dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def _tiny_llama(vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, eos_token_id=0, pad_token_id=1, bos_token_id=None,
    )


def _tiny_gemma3(vocab: int):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=24, max_position_embeddings=512,
        sliding_window=16, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=24, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )


TINY_PRESETS = {
    # name: (tokenizer builder, vocab size, config builder, seed)
    "tiny-llama": (_bytelevel_bpe, 400, _tiny_llama, 0),
    "tiny-gemma3": (_metaspace_bpe, 300, _tiny_gemma3, 1),
}


def build_tiny(name: str) -> Path:
    """Build (once per TINY_VERSION) and return the checkpoint dir of a tiny preset."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    final = cache_dir() / "models" / f"{name}-v{TINY_VERSION}"
    if (final / INFO_FILE).exists():
        return final
    tok_builder, vocab, cfg_builder, seed = TINY_PRESETS[name]
    raw, special = tok_builder(vocab)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, **special)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg_builder(raw.get_vocab_size()), dtype=torch.float32)
    with atomic_path(final, keep=INFO_FILE) as staged:  # two test processes may build it at once
        model.save_pretrained(staged, safe_serialization=True)
        tok.save_pretrained(staged)
        write_info(staged, name=name, weights_hash=sha256_file(staged / "model.safetensors"))
    return final
