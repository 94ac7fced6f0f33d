"""A tiny random-weight Llama and a byte-level tokenizer for it, for fast tests."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from .config import LlamaConfig
from .llama import LlamaModel
from .tokenizer import Tokenizer

#: Ids 0-2 are special; ids 3-258 are the 256 byte-level symbols; a few merges follow.
TINY_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
TINY_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)

TINY_CONFIG = LlamaConfig(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=160,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    max_position_embeddings=2048,
    bos_token_id=1,
    eos_token_ids=(2,),
)


def tiny_config(**overrides: Any) -> LlamaConfig:
    return replace(TINY_CONFIG, **overrides)


def tiny_model(
    config: LlamaConfig | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    layer_start: int = 0,
    layer_end: int | None = None,
) -> LlamaModel:
    """A randomly initialised model; the same seed gives the same weights for any layer range."""
    full = LlamaModel(config or TINY_CONFIG, dtype=dtype).init_random_(seed)
    if layer_start == 0 and layer_end in (None, full.config.num_layers):
        return full.eval()
    part = LlamaModel(full.config, layer_start, layer_end, dtype=dtype)
    part.load_weights(full.checkpoint_items())
    return part.eval()


def tiny_vocab() -> list[str]:
    """The tiny tokenizer's tokens in id order (fits the tiny model's 320-entry vocabulary)."""
    from tokenizers.pre_tokenizers import ByteLevel

    return TINY_SPECIAL_TOKENS + sorted(ByteLevel.alphabet()) + ["".join(m) for m in TINY_MERGES]


def tiny_tokenizer() -> Tokenizer:
    """A byte-level BPE tokenizer with the same layout a GGUF file would describe."""
    tokens = tiny_vocab()
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] * len(TINY_SPECIAL_TOKENS) + [1] * (len(tokens) - 3),
        "tokenizer.ggml.merges": [" ".join(m) for m in TINY_MERGES],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": TINY_CHAT_TEMPLATE,
    }
    return Tokenizer.from_gguf(meta)
