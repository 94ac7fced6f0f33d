"""Model specs: an architecture read from a Hugging Face ``config.json``.

Only the architecture is typed in (it comes from the config); everything else — parameters, weight bytes
at a bit-width, FLOPs, KV bytes — is derived here. Families: Llama (Llama 2/3, Mistral, Qwen2/2.5/3,
SmolLM, Gemma 2/3 with their sliding-window layers), Mixtral-style MoE (Qwen-MoE, DeepSeek), OPT and
BLOOM.
"""

from __future__ import annotations

import math
import re
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import HetserveError, allowed, suggest
from ..scheduling.kv_window import KVWindow
from .hf_config import LLAMA_FAMILY_TYPES, MAX_SIZES, config_int, read_llama_family
from .loading import read_mapping, show_value, validate

Family = Literal["llama", "mixtral", "opt", "bloom"]  # mixtral: any MoE (Mixtral, Qwen-MoE, DeepSeek)

#: Bits per weight the planner and cost model know, and the group size of group-wise quantisation.
WEIGHT_BITS = (16, 8, 4, 3)
QUANT_GROUP_SIZE = 128
#: Bytes of metadata per quantisation group: a 16-bit scale and a 16-bit zero point.
QUANT_GROUP_META_BYTES = 4


def tp_supported(num_heads: int, num_kv_heads: int, tp: int) -> bool:
    """Whether ``tp`` ranks can each hold whole GQA groups or a whole part of one.

    Up to one rank per KV head, the KV heads are split (unevenly if need be) and each rank takes the
    query heads of its KV heads; beyond that, each KV head is replicated on ``tp / num_kv_heads`` ranks
    that split its group's query heads evenly.
    """
    if tp < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        return False
    if tp <= num_kv_heads:
        return True
    return num_heads % tp == 0 and tp % num_kv_heads == 0


def tp_degrees(num_heads: int, num_kv_heads: int) -> list[int]:
    """Every tensor-parallel degree ``tp_supported`` accepts."""
    return [tp for tp in range(1, num_heads + 1) if tp_supported(num_heads, num_kv_heads, tp)]


class ModelSpec(BaseModel):
    """A decoder-only transformer, as far as serving cost is concerned."""

    model_config = ConfigDict(frozen=True)

    name: str
    family: Family
    num_layers: int = Field(gt=0, le=MAX_SIZES["num_hidden_layers"])
    hidden_size: int = Field(gt=0, le=MAX_SIZES["hidden_size"])
    num_heads: int = Field(gt=0, le=MAX_SIZES["num_attention_heads"])
    num_kv_heads: int = Field(gt=0, le=MAX_SIZES["num_key_value_heads"])
    head_dim: int = Field(gt=0, le=MAX_SIZES["head_dim"])
    intermediate_size: int = Field(gt=0, le=MAX_SIZES["intermediate_size"])
    vocab_size: int = Field(gt=0, le=MAX_SIZES["vocab_size"])
    max_position_embeddings: int = Field(gt=0, le=MAX_SIZES["max_position_embeddings"])
    tie_word_embeddings: bool = False
    num_experts: int = Field(default=1, ge=1, le=MAX_SIZES["num_local_experts"])
    experts_per_token: int = Field(default=1, ge=1, le=MAX_SIZES["num_experts_per_tok"])
    gated_mlp: bool = True  # SwiGLU (3 matrices) vs plain (2 matrices)
    linear_bias: bool = False  # biases on every projection (OPT, BLOOM)
    qkv_bias: bool = False  # biases on q/k/v only (Qwen2)
    layer_norm_bias: bool = False  # LayerNorm (weight+bias) vs RMSNorm (weight)
    learned_positions: bool = False  # OPT's learned positional embedding table
    #: Multi-head latent attention (DeepSeek-V2/V3): K and V are cached as one compressed latent of
    #: ``kv_lora_rank`` plus a shared rotary key of ``qk_rope_head_dim`` per token and layer, the same on
    #: every tensor-parallel rank (each rank expands it for its own heads). 0: ordinary (GQA) attention.
    kv_lora_rank: int = Field(default=0, ge=0, le=MAX_SIZES["hidden_size"])
    q_lora_rank: int = Field(default=0, ge=0, le=MAX_SIZES["hidden_size"])  # 0: a full query projection
    qk_rope_head_dim: int = Field(default=0, ge=0, le=MAX_SIZES["head_dim"])
    qk_nope_head_dim: int = Field(default=0, ge=0, le=MAX_SIZES["head_dim"])
    v_head_dim: int = Field(default=0, ge=0, le=MAX_SIZES["head_dim"])
    #: Experts every token goes through besides its routed ones (DeepSeek's shared experts), each the
    #: size of a routed expert.
    shared_experts: int = Field(default=0, ge=0, le=64)
    #: The first ``dense_layers`` layers of an MoE model have one dense MLP of ``dense_intermediate_size``
    #: instead of experts (DeepSeek's first_k_dense_replace). The per-layer figures below are the average
    #: over all layers: a pipeline stage's share of the weights and FLOPs is exact in total, spread evenly.
    dense_layers: int = Field(default=0, ge=0, le=MAX_SIZES["num_hidden_layers"])
    dense_intermediate_size: int = Field(default=0, ge=0, le=MAX_SIZES["intermediate_size"])
    #: Sliding-window attention (Gemma 2/3): ``sliding_layers`` of the layers attend only to the last
    #: ``sliding_window`` tokens and keep only their KV (``kv_window``). 0: every layer is global.
    sliding_window: int = Field(default=0, ge=0, le=MAX_SIZES["max_position_embeddings"])
    sliding_layers: int = Field(default=0, ge=0, le=MAX_SIZES["num_hidden_layers"])
    #: Bits of the released checkpoint's weight matrices: 8 for an FP8 checkpoint (DeepSeek-V3/R1's
    #: ``quantization_config``), else 16. Serving it as released is lossless.
    checkpoint_bits: Literal[16, 8] = 16
    norms_per_layer: int = Field(default=2, ge=1, le=8)  # Gemma 2/3: four (before and after each block)
    qk_norm: bool = False  # a norm of head_dim on queries and keys (Gemma 3)
    source: str = ""
    #: Per-layer weights of how much quantising each layer hurts quality (mean 1), measured and read from a
    #: sensitivity file (specs/sensitivity.py); None: the planner's assumed curve (planner/quality.py).
    layer_sensitivity: tuple[float, ...] | None = None
    sensitivity_source: str = ""  # the file the weights were read from

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.layer_sensitivity is not None and (
            len(self.layer_sensitivity) != self.num_layers
            or not all(math.isfinite(w) and w > 0 for w in self.layer_sensitivity)
        ):
            raise ValueError(f"layer_sensitivity: give {self.num_layers} positive weights, one per layer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_key_value_heads ({self.num_kv_heads}) must divide "
                f"num_attention_heads ({self.num_heads})"
            )
        if self.experts_per_token > self.num_experts:
            raise ValueError("num_experts_per_tok exceeds num_local_experts")
        if self.sliding_layers > self.num_layers:
            raise ValueError(f"{self.sliding_layers} sliding-window layers exceed num_hidden_layers")
        if bool(self.sliding_layers) != bool(self.sliding_window):
            raise ValueError("sliding-window layers need a sliding_window, and a window needs its layers")
        if self.dense_layers > self.num_layers:
            raise ValueError(f"first_k_dense_replace ({self.dense_layers}) exceeds num_hidden_layers")
        if self.kv_lora_rank and not (self.qk_rope_head_dim and self.qk_nope_head_dim and self.v_head_dim):
            raise ValueError(
                "multi-head latent attention needs qk_rope_head_dim, qk_nope_head_dim, v_head_dim"
            )
        return self

    @property
    def mla(self) -> bool:
        """Whether attention is multi-head latent attention (a compressed KV cache)."""
        return self.kv_lora_rank > 0

    @cached_property
    def kv_window(self) -> KVWindow | None:
        """The sliding-window layers' effect on the KV a sequence holds and reads; None without them."""
        if not self.sliding_layers:
            return None
        return KVWindow(self.sliding_window, self.sliding_layers, self.num_layers)

    def kv_slots(self, tokens: int) -> int:
        """KV slots (one token's K and V in every layer) a sequence of ``tokens`` tokens holds."""
        window = self.kv_window
        return tokens if window is None else window.held(tokens)

    def attention_pairs(self, new_tokens: float, context_before: float) -> float:
        """(query, key) pairs per layer, averaged over the layers, of ``new_tokens`` appended after
        ``context_before`` (causal; sliding layers see at most their window)."""
        window = self.kv_window
        if window is None:
            return new_tokens * context_before + new_tokens * (new_tokens + 1) / 2
        return window.pairs(new_tokens, context_before)

    def kv_read(self, context: float) -> float:
        """KV slots one step of a sequence over ``context`` tokens reads, averaged over the layers."""
        window = self.kv_window
        return context if window is None else window.read(context)

    @cached_property
    def moe_share(self) -> float:
        """Share of the layers that have experts (1 for a dense model: its one MLP is its 'expert')."""
        return (self.num_layers - self.dense_layers) / self.num_layers if self.dense_layers else 1.0

    # ---- parameters ---------------------------------------------------------------------------
    @cached_property
    def attention_params(self) -> int:
        if self.mla:  # projections plus the RMSNorms of the two latents
            return self.attention_matrix_params + self.kv_lora_rank + self.q_lora_rank
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        weights = self.hidden_size * (q + 2 * kv) + q * self.hidden_size
        bias = 0
        if self.linear_bias:
            bias = q + 2 * kv + self.hidden_size
        elif self.qkv_bias:
            bias = q + 2 * kv
        return weights + bias

    @cached_property
    def expert_params(self) -> int:
        """Parameters of one MLP (one expert for MoE)."""
        mats = 3 if self.gated_mlp else 2
        bias = (self.intermediate_size + self.hidden_size) if self.linear_bias else 0
        return mats * self.hidden_size * self.intermediate_size + bias

    @cached_property
    def router_params(self) -> int:
        return self.hidden_size * self.num_experts if self.num_experts > 1 else 0

    @cached_property
    def norm_params(self) -> int:
        qk = 2 * self.head_dim if self.qk_norm else 0
        return self.norms_per_layer * self.hidden_size * (2 if self.layer_norm_bias else 1) + qk

    @cached_property
    def dense_mlp_params(self) -> int:
        """The MLP of one of the first ``dense_layers`` layers of an MoE model."""
        return 3 * self.hidden_size * self.dense_intermediate_size if self.dense_layers else 0

    def _mlp(self, experts: int, per_expert: int, router: int, dense: int) -> int:
        """Per-layer MLP figure averaged over the layers: ``experts`` (routed + shared) of ``per_expert``
        plus the router where there are experts, ``dense`` in the dense layers."""
        if not self.dense_layers:
            return experts * per_expert + router
        share = self.moe_share
        return round(share * (experts * per_expert + router) + (1 - share) * dense)

    @cached_property
    def params_per_layer(self) -> int:
        return (
            self.attention_params
            + self._mlp(
                self.num_experts + self.shared_experts,
                self.expert_params,
                self.router_params,
                self.dense_mlp_params,
            )
            + self.norm_params
        )

    @cached_property
    def active_params_per_layer(self) -> int:
        """Parameters one token multiplies through (MoE: only its routed and shared experts)."""
        return (
            self.attention_params
            + self._mlp(
                self.experts_per_token + self.shared_experts,
                self.expert_params,
                self.router_params,
                self.dense_mlp_params,
            )
            + self.norm_params
        )

    @cached_property
    def attention_matrix_params(self) -> int:
        """Weights of the q, k, v and output projections (no biases). MLA: the query's down and up
        projections (or one full one), the latent's down projection (with the rotary key), its up
        projection to every head's key and value, and the output projection."""
        if self.mla:
            h, heads = self.hidden_size, self.num_heads
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = h * self.q_lora_rank + self.q_lora_rank * heads * qk if self.q_lora_rank else h * heads * qk
            kv_down = h * (self.kv_lora_rank + self.qk_rope_head_dim)
            kv_up = self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim)
            return q + kv_down + kv_up + heads * self.v_head_dim * h
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return self.hidden_size * (q + 2 * kv) + q * self.hidden_size

    @cached_property
    def expert_matrix_params(self) -> int:
        """Weights of one MLP's matrices (no biases)."""
        return (3 if self.gated_mlp else 2) * self.hidden_size * self.intermediate_size

    @cached_property
    def matmul_params_per_layer(self) -> int:
        """Parameters in weight matrices (the part that quantisation shrinks)."""
        return self.attention_matrix_params + self._mlp(
            self.num_experts + self.shared_experts, self.expert_matrix_params, 0, self.dense_mlp_params
        )

    @cached_property
    def embedding_params(self) -> int:
        """Input embedding (+ learned positions) and, if untied, the LM head; final norm included."""
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else emb
        pos = self.max_position_embeddings * self.hidden_size if self.learned_positions else 0
        extra_norm = 2 * self.hidden_size if self.family == "bloom" else 0  # BLOOM's embedding LayerNorm
        final_norm = self.hidden_size * (2 if self.layer_norm_bias else 1)
        return emb + head + pos + extra_norm + final_norm

    @cached_property
    def total_params(self) -> int:
        return self.num_layers * self.params_per_layer + self.embedding_params

    # ---- bytes ------------------------------------------------------------------------------------
    def layer_weight_bytes(self, bits: int = 16) -> float:
        """Bytes of one layer's weights with matrices at ``bits`` (group-wise scales and zeros for
        < 16 bits); norms and biases stay 16-bit."""
        matrix = self.matmul_params_per_layer
        other = self.params_per_layer - matrix
        if bits >= 16:
            return 2.0 * (matrix + other)
        groups = math.ceil(matrix / QUANT_GROUP_SIZE)
        return matrix * bits / 8 + groups * QUANT_GROUP_META_BYTES + 2.0 * other

    def embedding_bytes(self) -> float:
        """Embedding and LM head stay 16-bit (as common weight-only quantisers leave them)."""
        return 2.0 * self.embedding_params

    def weight_bytes(self, bits: int = 16) -> float:
        return self.num_layers * self.layer_weight_bytes(bits) + self.embedding_bytes()

    def kv_bytes_per_token_layer(self, dtype_bytes: float = 2) -> float:
        """K and V of one token in one layer (GQA: only the KV heads are stored; MLA: the latent and the
        rotary key)."""
        if self.mla:
            return (self.kv_lora_rank + self.qk_rope_head_dim) * dtype_bytes
        return 2 * self.num_kv_heads * self.head_dim * dtype_bytes

    def kv_share_per_gpu(self, tp: int) -> float:
        """Share of a token's KV one of ``tp`` tensor-parallel ranks stores: its KV heads (a KV head
        replicated on several ranks is stored on each); MLA's latent is stored whole on every rank."""
        if self.mla:
            return 1.0
        return math.ceil(self.num_kv_heads / tp) / self.num_kv_heads

    @cached_property
    def attention_flops_per_pair(self) -> float:
        """FLOPs of one query token attending to one cached token in one layer, over all heads: Q.K and
        the weighted sum of V (MLA: keys of nope + rope dims, values of v_head_dim)."""
        if self.mla:
            return 2.0 * self.num_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim)
        return 4.0 * self.num_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: float = 2) -> float:
        return self.num_layers * self.kv_bytes_per_token_layer(dtype_bytes)

    # ---- FLOPs --------------------------------------------------------------------------------------
    @cached_property
    def linear_flops_per_token_layer(self) -> int:
        """2 FLOPs per multiply-add through every weight a token uses in one layer."""
        return 2 * (
            self.attention_matrix_params
            + self._mlp(
                self.experts_per_token + self.shared_experts,
                self.expert_matrix_params,
                self.router_params,
                self.dense_mlp_params,
            )
        )

    def attention_flops_layer(self, new_tokens: float, context_before: float) -> float:
        """QK^T and softmax(QK^T)V FLOPs in one layer for ``new_tokens`` appended to a sequence that
        already holds ``context_before`` tokens (causal: token i attends to all before it and itself)."""
        return self.attention_flops_per_pair * self.attention_pairs(new_tokens, context_before)

    def prefill_flops_layer(self, prompt_len: int) -> float:
        """FLOPs per layer to prefill one prompt (linear + quadratic attention)."""
        return prompt_len * self.linear_flops_per_token_layer + self.attention_flops_layer(prompt_len, 0)

    def prefill_flops_per_token_layer(self, prompt_len: int) -> float:
        return self.prefill_flops_layer(prompt_len) / prompt_len

    def decode_flops_per_token_layer(self, context: int) -> float:
        """FLOPs per layer for one decode token with ``context`` tokens before it."""
        return self.linear_flops_per_token_layer + self.attention_flops_layer(1, context)

    def experts_touched(self, tokens: float) -> float:
        """Expected distinct experts a batch of ``tokens`` routes to (uniform routing)."""
        if self.num_experts == 1:
            return 1.0
        miss = (1 - self.experts_per_token / self.num_experts) ** tokens
        return self.num_experts * (1 - miss)

    def layer_weight_bytes_read(self, bits: int, tokens: float) -> float:
        """Weight bytes a batch of ``tokens`` reads from memory in one layer (MoE: touched experts)."""
        full = self.layer_weight_bytes(bits)
        if self.num_experts == 1:
            return full
        one_expert = full * (self.expert_params / self.params_per_layer)
        return full - (self.num_experts - self.experts_touched(tokens)) * one_expert * self.moe_share

    def check_tp(self, tp: int, field: str = "tp") -> None:
        """Raise a clear error if tensor parallelism of degree ``tp`` cannot split this model's heads
        (see ``tp_supported``)."""
        if not tp_supported(self.num_heads, self.num_kv_heads, tp):
            raise HetserveError(
                f"{field}={tp} cannot split the {self.num_heads} attention heads "
                f"({self.num_kv_heads} KV heads) of {self.name}: tp must be at most the KV "
                f"heads, or a multiple of them that divides the attention heads; use one of "
                f"{tp_degrees(self.num_heads, self.num_kv_heads)}"
            )

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "layers": self.num_layers,
            "hidden": self.hidden_size,
            "heads": self.num_heads,
            "kv_heads": self.num_kv_heads,
            "intermediate": self.intermediate_size,
            "vocab": self.vocab_size,
            "experts": self.num_experts,
            "params_b": round(self.total_params / 1e9, 3),
            "weights_gb_16bit": round(self.weight_bytes(16) / 1e9, 2),
            "weights_gb_4bit": round(self.weight_bytes(4) / 1e9, 2),
            "kv_kb_per_token": round(self.kv_bytes_per_token(2) / 1e3, 1),
            "sliding_window": f"{self.sliding_layers}/{self.num_layers} layers, {self.sliding_window} tokens"
            if self.sliding_layers
            else "none",
            "source": self.source,
        }


def _get(cfg: dict, *keys, default=None, where: str | None = None, limit: str | None = None) -> int:
    """The first of ``keys`` the config gives, checked as a size (``config_int``), else ``default``."""
    for k in keys:
        if k in cfg and cfg[k] is not None:
            return config_int(cfg, k, where, limit=limit or k)
    if default is not None:
        return default
    raise HetserveError(f"config.json lacks '{keys[0]}'", source=where)


def _deepseek(cfg: dict[str, Any], where: str | None) -> dict[str, Any]:
    """DeepSeek-V2/V3: multi-head latent attention, routed plus shared experts, dense first layers.
    The multi-token-prediction module (``num_nextn_predict_layers``) is not served and not counted."""
    get = lambda key, default=None, limit=None: config_int(cfg, key, where, default, limit=limit)
    heads = get("num_attention_heads")
    rope, nope = get("qk_rope_head_dim", limit="head_dim"), get("qk_nope_head_dim", limit="head_dim")
    routed = get("n_routed_experts", 1, limit="num_local_experts")
    layers = get("num_hidden_layers")
    dense = cfg.get("first_k_dense_replace", 0) or 0
    if not isinstance(dense, int) or isinstance(dense, bool) or not 0 <= dense <= layers:
        raise HetserveError(
            f"'first_k_dense_replace' must be a whole number from 0 to {layers}", source=where
        )
    q_lora = cfg.get("q_lora_rank") or 0
    return dict(
        family="mixtral" if routed > 1 else "llama",
        num_layers=layers,
        hidden_size=get("hidden_size"),
        num_heads=heads,
        num_kv_heads=heads,  # every head has its own key and value, expanded from the shared latent
        head_dim=rope + nope,
        intermediate_size=get("moe_intermediate_size", limit="intermediate_size")
        if routed > 1
        else get("intermediate_size"),
        vocab_size=get("vocab_size"),
        max_position_embeddings=get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        num_experts=routed,
        experts_per_token=get("num_experts_per_tok", 1, limit="num_experts_per_tok"),
        kv_lora_rank=get("kv_lora_rank", limit="hidden_size"),
        q_lora_rank=config_int(cfg, "q_lora_rank", where, limit="hidden_size") if q_lora else 0,
        qk_rope_head_dim=rope,
        qk_nope_head_dim=nope,
        v_head_dim=get("v_head_dim", limit="head_dim"),
        shared_experts=(cfg.get("n_shared_experts") or 0) if routed > 1 else 0,
        dense_layers=dense if routed > 1 else 0,
        dense_intermediate_size=get("intermediate_size") if routed > 1 and dense else 0,
    )


#: Defaults of Hugging Face's Gemma3TextConfig for fields a Gemma 3 config.json may leave out (its
#: multimodal configs give only some of the text model's fields).
_GEMMA3_DEFAULTS = {"vocab_size": 262208, "max_position_embeddings": 131072, "sliding_window": 4096}
GEMMA_TYPES = ("gemma2", "gemma3", "gemma3_text")


def _gemma(cfg: dict[str, Any], mtype: str, where: str | None) -> dict[str, Any]:
    """Gemma 2 and 3: gated-GELU MLPs, four RMSNorms per layer (Gemma 3 also normalises queries and
    keys), tied embeddings, and sliding-window layers. Which layers slide: ``layer_types`` when the
    config lists them, else Gemma 2's even layers, else all but every ``sliding_window_pattern``-th
    layer (Gemma 3). A multimodal Gemma 3 config is read from its ``text_config`` (the vision tower is
    not served and not counted)."""
    text = cfg.get("text_config") if mtype == "gemma3" else None
    if mtype == "gemma3" and not isinstance(text, dict):
        raise HetserveError("a gemma3 config.json needs its 'text_config' mapping", source=where)
    if text is not None:
        cfg = {**_GEMMA3_DEFAULTS, **text}
    elif mtype == "gemma3_text":
        cfg = {**_GEMMA3_DEFAULTS, **cfg}
    get = lambda key, default=None, limit=None: config_int(cfg, key, where, default, limit=limit)
    layers = get("num_hidden_layers")
    heads = get("num_attention_heads")
    hidden = get("hidden_size")
    kinds = cfg.get("layer_types")
    if kinds is not None:
        if not (isinstance(kinds, list) and len(kinds) == layers):
            raise HetserveError(
                f"'layer_types' must list one type for each of the {layers} layers", source=where
            )
        sliding = sum(1 for k in kinds if k == "sliding_attention")
    elif mtype == "gemma2":
        sliding = (layers + 1) // 2  # layers 0, 2, 4, ... slide
    else:
        pattern = get("sliding_window_pattern", 6, limit="num_hidden_layers")
        sliding = layers - layers // pattern  # every pattern-th layer is global
    window = get("sliding_window", limit="max_position_embeddings") if sliding else 0
    return dict(
        family="llama",
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=get("num_key_value_heads", heads, limit="num_key_value_heads"),
        head_dim=get("head_dim", hidden // heads),
        intermediate_size=get("intermediate_size"),
        vocab_size=get("vocab_size"),
        max_position_embeddings=get("max_position_embeddings", 8192),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        sliding_window=window,
        sliding_layers=sliding if window else 0,
        norms_per_layer=4,
        qk_norm=mtype != "gemma2",
    )


def model_from_hf_config(cfg: dict[str, Any], name: str, source: str = "") -> ModelSpec:
    """Build a ModelSpec from a Hugging Face ``config.json`` dict."""
    mtype = str(cfg.get("model_type", "")).lower()
    if mtype in LLAMA_FAMILY_TYPES:
        arch = read_llama_family(cfg, source or None)
        spec = dict(
            family="mixtral" if mtype == "mixtral" or arch.num_experts > 1 else "llama",
            num_layers=arch.num_layers,
            hidden_size=arch.hidden_size,
            num_heads=arch.num_heads,
            num_kv_heads=arch.num_kv_heads,
            head_dim=arch.head_dim,
            intermediate_size=arch.intermediate_size,
            vocab_size=arch.vocab_size,
            max_position_embeddings=arch.max_position_embeddings,
            tie_word_embeddings=arch.tie_word_embeddings,
            num_experts=arch.num_experts,
            experts_per_token=arch.experts_per_token,
            qkv_bias=arch.qkv_bias,
        )
    elif mtype in ("deepseek_v2", "deepseek_v3"):
        spec = _deepseek(cfg, source or None)
    elif mtype in GEMMA_TYPES:
        spec = _gemma(cfg, mtype, source or None)
    elif mtype in ("opt", "bloom"):
        where = source or None
        opt = mtype == "opt"
        hidden = _get(cfg, "hidden_size", "n_embed", where=where, limit="hidden_size")
        heads = _get(cfg, "num_attention_heads", "n_head", where=where, limit="num_attention_heads")
        if heads > hidden:
            raise HetserveError(
                f"the {heads} attention heads exceed hidden_size ({hidden}): each head needs at least one "
                "dimension",
                source=where,
            )
        spec = dict(
            family=mtype,
            num_layers=_get(cfg, "num_hidden_layers", "n_layer", where=where, limit="num_hidden_layers"),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            intermediate_size=_get(cfg, "ffn_dim", where=where, limit="intermediate_size")
            if opt
            else 4 * hidden,
            vocab_size=_get(cfg, "vocab_size", where=where),
            max_position_embeddings=_get(
                cfg,
                "max_position_embeddings" if opt else "seq_length",
                default=2048,
                where=where,
                limit="max_position_embeddings",
            ),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)) if opt else True,
            gated_mlp=False,
            linear_bias=bool(cfg.get("enable_bias", True)) if opt else True,
            layer_norm_bias=True,
            learned_positions=opt,
        )
    else:
        raise HetserveError(
            f"model_type {show_value(mtype)} is not supported; supported: llama, mistral, qwen2, qwen3, "
            "qwen2_moe, qwen3_moe, mixtral, deepseek_v2, deepseek_v3, gemma2, gemma3, gemma3_text, opt, bloom"
        )
    quant = cfg.get("quantization_config")
    if isinstance(quant, dict) and str(quant.get("quant_method", "")).lower() == "fp8":
        spec["checkpoint_bits"] = 8
    return validate(ModelSpec, dict(name=name, source=source, **spec), source or None)


_MODEL_DIR = "data/models"


@lru_cache(maxsize=1)
def builtin_model_names() -> tuple[str, ...]:
    root = resources.files("hetserve.specs").joinpath(_MODEL_DIR)
    return tuple(sorted(p.name.removesuffix(".json") for p in root.iterdir() if p.name.endswith(".json")))


@lru_cache(maxsize=64)
def _builtin(name: str) -> ModelSpec:
    path = resources.files("hetserve.specs").joinpath(f"{_MODEL_DIR}/{name}.json")
    cfg = read_mapping(path, "model config")
    return model_from_hf_config(cfg, name, source=cfg.get("_source", ""))


#: Suffixes of a Hugging Face repository name that do not change the architecture (fine-tunes, formats,
#: releases): stripped before an id is matched to a built-in model.
_HF_VARIANT = re.compile(r"(-(instruct|chat|hf|it|base|v\d+(\.\d+)*|\d{4}))+$")


def _hf_key(repo: str) -> str:
    return _HF_VARIANT.sub("", repo.strip().lower())


#: Hugging Face repositories of the same architecture as a built-in under another name (their
#: config.json files match the built-in's in every field the cost model reads).
_SAME_ARCHITECTURE = {"deepseek-r1": "deepseek-v3", "llama-3.3-70b": "llama-3.3-70b"}


@lru_cache(maxsize=1)
def _hf_aliases() -> dict[str, str]:
    """Hugging Face repository names (variants stripped) -> built-in model, from each built-in's source."""
    out = dict(_SAME_ARCHITECTURE)
    for name in builtin_model_names():
        source = _builtin(name).source
        m = re.match(r"https://huggingface\.co/([^/]+)/([^/]+)/", source)
        if m:
            out[_hf_key(m.group(2))] = name
        out[_hf_key(name)] = name
    return out


def builtin_for_hf_id(model_id: str) -> str | None:
    """The built-in model a Hugging Face id names ('meta-llama/Llama-3.1-8B-Instruct' -> 'llama-3.1-8b'):
    the same architecture, whatever the fine-tune or release suffix; None if none is built in."""
    repo = model_id.strip().split("/")[-1]
    return _hf_aliases().get(_hf_key(repo))


def load_model(name_or_path: str) -> ModelSpec:
    """A built-in model by name or Hugging Face id, or a ``config.json`` (or a directory holding one) by
    path. Nothing is downloaded: an id that is not built in needs its config.json on disk."""
    key = str(name_or_path).strip()
    if key.lower() in builtin_model_names():
        return _builtin(key.lower())
    path = Path(key)
    if not path.exists() and key.count("/") == 1 and not key.endswith(".json"):
        builtin = builtin_for_hf_id(key)
        if builtin is not None:
            return _builtin(builtin)
        raise HetserveError(
            f"model '{key}': no built-in model has this Hugging Face id's architecture, and nothing is "
            f"downloaded; fetch its config.json (e.g. 'huggingface-cli download {key} config.json "
            f"--local-dir DIR') and pass DIR or DIR/config.json; built in: {allowed(builtin_model_names())}"
        )
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" and path.exists():
        cfg = read_mapping(path, "model config")
        name = path.parent.name if path.name == "config.json" else path.stem
        try:
            return model_from_hf_config(cfg, name or path.stem, source=str(path))
        except HetserveError as exc:
            if str(exc).startswith(str(path)):
                raise
            raise HetserveError(str(exc), source=str(path)) from None
    raise HetserveError(
        f"unknown model '{key}'{suggest(key, builtin_model_names())}; use a built-in name "
        f"({allowed(builtin_model_names())}) or the path of a Hugging Face config.json"
    )
