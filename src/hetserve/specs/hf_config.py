"""One reader of a Hugging Face ``config.json`` for the Llama family (Llama 2/3, Mistral, Qwen2/3, SmolLM,
Mixtral- and Qwen-style MoE): the field names, defaults and derived sizes that the planner's ``ModelSpec`` and the
engine's ``LlamaConfig`` both build from, so the two never read the same file differently."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import HetserveError

#: ``model_type`` values whose config.json has the Llama layout.
LLAMA_FAMILY_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "smollm", "smollm2", "qwen2_moe", "qwen3_moe", "mixtral"}
)
#: MoE configs that name their experts ``num_experts`` and size them by ``moe_intermediate_size`` (Qwen's
#: layout) rather than Mixtral's ``num_local_experts`` and ``intermediate_size``.
QWEN_MOE_TYPES = frozenset({"qwen2_moe", "qwen3_moe"})

#: Largest value of each architecture size a config.json may give (several times the largest published
#: models); beyond them a size is a mistake, and would make the derived sizes and searches unbounded.
MAX_SIZES = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 1 << 14,
    "max_position_embeddings": 1 << 24,
    "num_local_experts": 1024,
    "num_experts_per_tok": 1024,
}


@dataclass(frozen=True)
class LlamaFamilyConfig:
    """The architecture fields of a Llama-family config.json, under Hugging Face's own names."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # biases on q/k/v: Qwen2 always, Llama with attention_bias
    o_bias: bool  # attention_bias also puts one on the output projection
    num_experts: int
    experts_per_token: int


def config_int(
    cfg: Mapping[str, Any],
    key: str,
    where: str | None,
    default: int | None = None,
    *,
    limit: str | None = None,
) -> int:
    """``cfg[key]`` (or ``default`` when absent): a whole number from 1 to the ``MAX_SIZES`` bound of
    ``limit`` (default: of ``key``), else one HetserveError naming the key."""
    value = cfg.get(key)
    if value is None:
        if default is None:
            raise HetserveError(f"config.json lacks '{key}'", source=where)
        return default
    top = MAX_SIZES.get(limit or key, 1 << 24)
    whole = isinstance(value, int) or (
        isinstance(value, float) and math.isfinite(value) and value.is_integer()
    )
    if isinstance(value, bool) or not whole or not 1 <= value <= top:
        shown = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a huge number"
        raise HetserveError(
            f"'{key}' must be a whole number from 1 to {top:,}, not {shown[:40]}", source=where
        )
    return int(value)


def read_llama_family(cfg: Mapping[str, Any], where: str | None = None) -> LlamaFamilyConfig:
    """The architecture of a Llama-family ``config.json`` dict; a missing or malformed field is one
    ``HetserveError`` naming it (and ``where``, the file)."""
    model_type = str(cfg.get("model_type", "llama")).lower()
    if model_type not in LLAMA_FAMILY_TYPES:
        raise HetserveError(
            f"model_type '{model_type}' is not a Llama-family model "
            f"(supported: {', '.join(sorted(LLAMA_FAMILY_TYPES))})",
            source=where,
        )
    hidden = config_int(cfg, "hidden_size", where)
    heads = config_int(cfg, "num_attention_heads", where)
    if heads > hidden and "head_dim" not in cfg:
        raise HetserveError(
            f"num_attention_heads ({heads}) exceeds hidden_size ({hidden}): each head needs at least one "
            "dimension (or give head_dim)",
            source=where,
        )
    attention_bias = bool(cfg.get("attention_bias", False))
    qwen_moe = model_type in QWEN_MOE_TYPES
    experts_key = "num_experts" if qwen_moe else "num_local_experts"
    ffn_key = "moe_intermediate_size" if qwen_moe else "intermediate_size"
    return LlamaFamilyConfig(
        model_type=model_type,
        vocab_size=config_int(cfg, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=config_int(cfg, ffn_key, where, limit="intermediate_size"),
        num_layers=config_int(cfg, "num_hidden_layers", where),
        num_heads=heads,
        num_kv_heads=config_int(cfg, "num_key_value_heads", where, default=heads),
        head_dim=config_int(cfg, "head_dim", where, default=hidden // heads),
        max_position_embeddings=config_int(cfg, "max_position_embeddings", where, default=4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type.startswith("qwen2") or attention_bias,
        o_bias=attention_bias,
        num_experts=config_int(cfg, experts_key, where, default=1, limit="num_local_experts"),
        experts_per_token=config_int(cfg, "num_experts_per_tok", where, default=1),
    )
