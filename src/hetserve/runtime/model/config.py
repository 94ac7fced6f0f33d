"""The architecture of a Llama-family model (Llama 2/3, Mistral, Qwen2, SmolLM), from either source.

``LlamaConfig.from_hf`` reads a Hugging Face ``config.json`` dict; ``LlamaConfig.from_gguf`` reads the
metadata of a GGUF file (as a plain ``{key: value}`` dict) plus the names of its tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ...errors import HetserveError
from ...specs.hf_config import read_llama_family
from ...specs.loading import read_json_object

_HF_TYPES = {"llama", "mistral", "qwen2", "smollm", "smollm2"}
_GGUF_ARCHS = {"llama", "qwen2"}


@dataclass(frozen=True)
class RopeScaling:
    """Stretching of rotary frequencies for longer contexts (``linear`` or Llama 3's ``llama3``)."""

    kind: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> RopeScaling | None:
        if not d:
            return None
        kind = d.get("rope_type", d.get("type", "default"))
        if kind in (None, "default"):
            return None
        if kind == "linear":
            return cls("linear", float(d["factor"]))
        if kind == "llama3":
            return cls(
                "llama3",
                float(d["factor"]),
                float(d.get("low_freq_factor", 1.0)),
                float(d.get("high_freq_factor", 4.0)),
                int(d.get("original_max_position_embeddings", 8192)),
            )
        raise ValueError(f"rope scaling type {kind!r} is not supported (supported: linear, llama3)")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: biases on the q/k/v projections
    o_bias: bool = False  # Llama's attention_bias also puts one on the output projection
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    architecture: str = "llama"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for rotary embeddings")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_file(cls, path: str | Path) -> LlamaConfig:
        """From a ``config.json`` file (or the directory holding one): a missing, oversized, undecodable
        or non-object file is one HetserveError naming it."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        d = read_json_object(path, "model config (config.json)")
        try:
            return cls.from_hf(d)
        except ValueError as exc:
            raise HetserveError(str(exc), source=str(path)) from None

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> LlamaConfig:
        """From a Hugging Face ``config.json`` (as a dict)."""
        model_type = str(d.get("model_type", "llama")).lower()
        if model_type not in _HF_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not a Llama-family model the engine runs "
                f"(supported: {', '.join(sorted(_HF_TYPES))})"
            )
        if d.get("mlp_bias"):
            raise ValueError("mlp_bias=true is not supported")
        arch = read_llama_family(d)
        # Newer configs keep rope settings under "rope_parameters", older ones under "rope_scaling".
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            vocab_size=arch.vocab_size,
            hidden_size=arch.hidden_size,
            intermediate_size=arch.intermediate_size,
            num_layers=arch.num_layers,
            num_heads=arch.num_heads,
            num_kv_heads=arch.num_kv_heads,
            head_dim=arch.head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            rope_scaling=RopeScaling.from_dict(rope),
            tie_word_embeddings=arch.tie_word_embeddings,
            qkv_bias=arch.qkv_bias,
            o_bias=arch.o_bias,
            max_position_embeddings=arch.max_position_embeddings,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            architecture="qwen2" if model_type == "qwen2" else "llama",
        )

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], tensor_names: set[str]) -> LlamaConfig:
        """From GGUF metadata (key -> value) and the file's tensor names."""
        arch = meta.get("general.architecture")
        if arch not in _GGUF_ARCHS:
            raise ValueError(
                f"GGUF architecture {arch!r} is not supported (supported: {', '.join(sorted(_GGUF_ARCHS))})"
            )

        def get(key: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{key}", default)

        hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
        vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
        if not vocab:
            raise ValueError("GGUF metadata gives no vocabulary size")
        rope = None
        if get("rope.scaling.type") == "linear":
            rope = RopeScaling("linear", float(get("rope.scaling.factor")))
        elif get("rope.scaling.type") not in (None, "none"):
            raise ValueError(f"GGUF rope scaling {get('rope.scaling.type')!r} is not supported")
        eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
        return cls(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=int(get("attention.key_length", get("rope.dimension_count", hidden // heads))),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=rope,
            tie_word_embeddings="output.weight" not in tensor_names,
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            o_bias="blk.0.attn_output.bias" in tensor_names,
            max_position_embeddings=int(get("context_length", 4096)),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos)),
            architecture=arch,
        )
