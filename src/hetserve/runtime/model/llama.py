"""A Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) in plain PyTorch.

A ``LlamaModel`` holds the decoder layers ``[layer_start, layer_end)`` of a model, so one process (or
one pipeline stage) can own a slice: the slice starting at layer 0 owns the token embedding, the
slice ending at the last layer owns the final norm and the LM head. Parameters are named like the
Hugging Face checkpoints (``layers.N.self_attn.q_proj.weight`` with N the *global* layer index);
q/k/v and gate/up are stored fused, and ``load_weights`` places each checkpoint tensor.

Tensor parallelism (``tp_size > 1``): each rank holds a shard of every layer (``tp.py``): its query
and KV heads in ``qkv_proj`` and ``o_proj``, its intermediate columns in ``gate_up_proj`` and
``down_proj``. The output and down projections then hold partial sums, completed by one
``torch.distributed.all_reduce`` each. Embedding, norms and LM head are replicated on every rank.

The forward pass takes one flat batch of tokens (all sequences of a step together) plus attention
metadata for the paged KV cache; see ``attention.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import AttentionMetadata, StepSegments, paged_attention, segmented_attention
from .config import LlamaConfig
from .linear import project, project_halves
from .tp import TPShard, tp_shards


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # one fused kernel, the same arithmetic
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(config: LlamaConfig) -> Tensor:
    """Rotary inverse frequencies (fp32), with linear or Llama 3 frequency scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    if rs.kind == "linear":
        return inv_freq / rs.factor
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    blend = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    blended = (1 - blend) * scaled / rs.factor + blend * scaled
    in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.inv_freq = rope_inv_freq(config)  # kept fp32 whatever the model's dtype: not a buffer

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin, [T, 1, head_dim], for the given absolute positions."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the two halves of each head (Hugging Face layout). x: [T, heads, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Self-attention over ``shard``'s heads (all heads when None)."""

    def __init__(self, config: LlamaConfig, shard: TPShard | None = None):
        super().__init__()
        heads = config.num_heads if shard is None else shard.num_heads
        kv_heads = config.num_kv_heads if shard is None else shard.num_kv_heads
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, config.head_dim
        self.split = (heads * config.head_dim, kv_heads * config.head_dim, kv_heads * config.head_dim)
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.split), bias=config.qkv_bias)
        # The output bias is added once: by rank 0, before its partial sum enters the all-reduce.
        o_bias = config.o_bias and (shard is None or shard.rank == 0)
        self.o_proj = nn.Linear(self.split[0], config.hidden_size, bias=o_bias)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, meta: AttentionMetadata, kv_cache: tuple[Tensor, ...]
    ) -> Tensor:
        t = x.shape[0]
        qkv = project(self.qkv_proj, x)
        qk_size = self.split[0] + self.split[1]
        qk = apply_rope(qkv[:, :qk_size].view(t, self.num_heads + self.num_kv_heads, self.head_dim), cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]  # queries and keys rotated together
        v = qkv[:, qk_size:].view(t, self.num_kv_heads, self.head_dim)
        if isinstance(meta, StepSegments):  # kv_cache: one cache tuple per step
            o = segmented_attention(q, k, v, kv_cache, meta)
        else:
            o = paged_attention(
                q, k, v, kv_cache[0], kv_cache[1], meta, kv_cache[2] if len(kv_cache) > 2 else None
            )
        return project(self.o_proj, o.reshape(t, -1))


class MLP(nn.Module):
    """SwiGLU over ``shard``'s intermediate columns (all when None)."""

    def __init__(self, config: LlamaConfig, shard: TPShard | None = None):
        super().__init__()
        n = config.intermediate_size if shard is None else shard.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * n, bias=False)
        self.down_proj = nn.Linear(n, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = project_halves(self.gate_up_proj, x)
        return project(self.down_proj, F.silu(gate) * up)


class ShardedAttention(Attention):
    """One rank's heads; the partial output projections of all ranks are summed in place."""

    def __init__(self, config: LlamaConfig, shard: TPShard, group: dist.ProcessGroup | None):
        super().__init__(config, shard)
        self.group = group

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, meta: AttentionMetadata, kv_cache: tuple[Tensor, ...]
    ) -> Tensor:
        out = super().forward(x, cos, sin, meta, kv_cache).contiguous()
        dist.all_reduce(out, group=self.group)
        return out


class ShardedMLP(MLP):
    """One rank's intermediate columns; the partial down projections of all ranks are summed in place."""

    def __init__(self, config: LlamaConfig, shard: TPShard, group: dist.ProcessGroup | None):
        super().__init__(config, shard)
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x).contiguous()
        dist.all_reduce(out, group=self.group)
        return out


class DecoderLayer(nn.Module):
    """A whole layer (``shard`` None) or one tensor-parallel rank's shard of it."""

    def __init__(
        self, config: LlamaConfig, shard: TPShard | None = None, group: dist.ProcessGroup | None = None
    ):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config) if shard is None else ShardedAttention(config, shard, group)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config) if shard is None else ShardedMLP(config, shard, group)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, meta: AttentionMetadata, kv_cache: tuple[Tensor, ...]
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class WeightTarget(NamedTuple):
    """Where one checkpoint tensor goes: ``param`` (a parameter or a view into a fused one) receives
    ``tensor[index]`` (the whole tensor when ``index`` is None) of a checkpoint tensor of ``shape``."""

    param: Tensor
    index: tuple[slice, ...] | None
    shape: tuple[int, ...]


class LlamaModel(nn.Module):
    """Decoder layers ``[layer_start, layer_end)``, whole or as tensor-parallel rank ``tp_rank`` of
    ``tp_size`` (summing partial results over ``tp_group``, the default group when None); parameters
    are allocated but not initialised."""

    def __init__(
        self,
        config: LlamaConfig,
        layer_start: int = 0,
        layer_end: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        tp_rank: int = 0,
        tp_size: int = 1,
        tp_group: dist.ProcessGroup | None = None,
    ):
        super().__init__()
        layer_end = config.num_layers if layer_end is None else layer_end
        if not 0 <= layer_start < layer_end <= config.num_layers:
            raise ValueError(
                f"layer range [{layer_start}, {layer_end}) is not within the model's "
                f"{config.num_layers} layers"
            )
        if tp_size < 1 or not 0 <= tp_rank < tp_size:
            raise ValueError(f"tensor-parallel rank {tp_rank} is not one of {tp_size} ranks")
        self.config, self.layer_start, self.layer_end = config, layer_start, layer_end
        self.is_first, self.is_last = layer_start == 0, layer_end == config.num_layers
        shards = tp_shards(config.num_heads, config.num_kv_heads, config.intermediate_size, tp_size)
        self.tp: TPShard = shards[tp_rank]
        self.tp_group = tp_group
        shard = self.tp if tp_size > 1 else None  # tp_size 1: the plain modules, no all-reduce
        with torch.device("meta"):
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if self.is_first else None
            self.layers = nn.ModuleList(
                DecoderLayer(config, shard, tp_group) for _ in range(layer_start, layer_end)
            )
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if self.is_last else None
            self.lm_head = (
                nn.Linear(config.hidden_size, config.vocab_size, bias=False) if self.is_last else None
            )
        self.to(dtype)  # still on the meta device: no memory yet
        self.to_empty(device=device)  # allocate, uninitialised, directly in the run dtype
        for layer in self.layers if dtype == torch.float32 else ():
            # fp32: the two wide projections are stored input-major (an [out, in] view of [in, out] memory);
            # CPU BLAS streams that layout ~1.2-1.6x faster in the single-token products of decoding, and
            # ``project`` computes a decode batch's products about as fast from it as from [out, in]. (Not
            # for 16-bit weights: their CPU kernels take another path whose rounding differs for that layout.)
            for linear in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj):
                linear.weight = nn.Parameter(
                    torch.empty(linear.in_features, linear.out_features, dtype=dtype, device=device).t()
                )
        if self.is_first and self.is_last and config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(config)

    @property
    def num_local_kv_heads(self) -> int:
        """KV heads this rank attends with and caches (all of them without tensor parallelism)."""
        return self.tp.num_kv_heads

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].input_layernorm.weight.dtype  # projections may be quantised

    @property
    def device(self) -> torch.device:
        return self.layers[0].input_layernorm.weight.device

    # ---- forward ------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        meta: AttentionMetadata | StepSegments,
        kv_caches: Sequence[tuple[Tensor, ...]],
        after_layer: Callable[[int], None] | None = None,
        part: tuple[int, int] | None = None,
    ) -> Tensor:
        """x: token ids [T] on the first slice, else hidden states [T, hidden] from the slice before.

        Returns hidden states [T, hidden] (after the final norm on the last slice).
        ``kv_caches[i]`` is the (K, V) cache of this slice's i-th layer, optionally followed by the layer's
        dense decode copy (see ``paged_attention``); with ``StepSegments`` (several steps run as one), one
        such tuple per step. ``after_layer(i)`` runs once
        layer ``i`` of the slice has written its KV (a prefill worker streams it out from there).
        ``part``: run only the slice's layers [lo, hi) (partial inference: a chain that uses part of
        this slice); the embedding only where ``lo`` is the model's first layer, the final norm only where
        ``hi`` is its last. ``kv_caches`` still has one entry per layer of the slice.
        """
        n = len(self.layers)
        if isinstance(meta, StepSegments) and meta.parts is not None:
            return self._forward_parts(x, positions, meta, kv_caches, after_layer)
        lo, hi = part if part is not None else (0, n)
        if not 0 <= lo < hi <= n:
            raise ValueError(f"part [{lo}, {hi}) is not within this slice's {n} layers")
        if len(kv_caches) != n:
            raise ValueError(f"{len(kv_caches)} KV caches for a slice of {n} layers")
        h = self.embed_tokens(x) if self.is_first and lo == 0 else x
        cos, sin = self.rotary(positions, h.dtype)
        for i in range(lo, hi):
            h = self.layers[i](h, cos, sin, meta, kv_caches[i])
            if after_layer is not None:
                after_layer(i)
        return self.norm(h) if self.is_last and hi == n else h

    def _forward_parts(
        self,
        x: Tensor,
        positions: Tensor,
        steps: StepSegments,
        kv_caches: Sequence[tuple[Tensor, ...]],
        after_layer: Callable[[int], None] | None,
    ) -> Tensor:
        """Several steps run as one where each runs its own part of the slice (``steps.parts``): each
        layer runs over the rows of the steps whose part holds it (all rows at once where every step's
        does); the embedding where every part starts at the model's first layer (the inputs are then
        token ids), the final norm on the rows of the steps whose part ends at its last."""
        n = len(self.layers)
        parts = steps.parts
        if any(not 0 <= lo < hi <= n for lo, hi in parts):
            raise ValueError(f"parts {parts} are not all within this slice's {n} layers")
        embed = x.dtype == torch.long
        if embed and not (self.is_first and all(lo == 0 for lo, _ in parts)):
            raise ValueError("token ids as input, but not every part starts at the model's first layer")
        h = self.embed_tokens(x) if embed else x
        cos, sin = self.rotary(positions, h.dtype)
        everyone = list(range(len(parts)))
        subsets: dict[tuple[int, ...], tuple[StepSegments, Tensor]] = {}
        for i in range(min(lo for lo, _ in parts), max(hi for _, hi in parts)):
            active = tuple(j for j in everyone if parts[j][0] <= i < parts[j][1])
            if not active:
                continue
            caches = tuple(kv_caches[i][j] for j in active)
            if len(active) == len(parts):
                h = self.layers[i](h, cos, sin, steps, caches)
            else:
                if active not in subsets:
                    sub, rows = steps.subset(list(active))
                    subsets[active] = sub, rows.to(h.device)
                sub, rows = subsets[active]
                h = h.index_copy(0, rows, self.layers[i](h[rows], cos[rows], sin[rows], sub, caches))
            if after_layer is not None:
                after_layer(i)
        if self.is_last:
            ending = [j for j in everyone if parts[j][1] == n]
            if len(ending) == len(parts):
                h = self.norm(h)
            elif ending:
                _, rows = steps.subset(ending)
                rows = rows.to(h.device)
                h = h.index_copy(0, rows, self.norm(h[rows]))
        return h

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """fp32 logits [N, vocab] for the given rows of final hidden states (last slice only)."""
        if not self.is_last:
            raise RuntimeError("only the slice holding the last layer computes logits")
        return project(self.lm_head, hidden).float()

    # ---- weights ------------------------------------------------------------------------------
    def _weight_targets(self) -> tuple[dict[str, WeightTarget], set[str]]:
        """Checkpoint tensor name -> where (and which part of it) it goes, and the optional names.

        A tensor-parallel shard takes rows of q/k/v (and their biases) and gate/up, columns of o and down;
        the o_proj bias only on rank 0 (the other ranks hold none).
        """
        c, tp = self.config, self.tp
        hd, hidden, n = c.head_dim, c.hidden_size, c.intermediate_size
        targets: dict[str, WeightTarget] = {}
        optional: set[str] = set()

        def whole(param: Tensor) -> WeightTarget:
            return WeightTarget(param, None, tuple(param.shape))

        def part(param: Tensor, index: tuple[slice, ...], shape: tuple[int, ...]) -> WeightTarget:
            return WeightTarget(param, index if tp.size > 1 else None, shape)

        if self.is_first:
            targets["embed_tokens.weight"] = whole(self.embed_tokens.weight.data)
        if self.is_last:
            targets["norm.weight"] = whole(self.norm.weight.data)
            if c.tie_word_embeddings and self.is_first:
                optional.add("lm_head.weight")  # the same tensor as the embedding
                targets["lm_head.weight"] = whole(self.lm_head.weight.data)
            elif c.tie_word_embeddings:
                targets["embed_tokens.weight"] = whole(self.lm_head.weight.data)
                optional.add("lm_head.weight")
                targets["lm_head.weight"] = whole(self.lm_head.weight.data)
            else:
                targets["lm_head.weight"] = whole(self.lm_head.weight.data)
        q_rows, kv_rows = slice(tp.q_start * hd, tp.q_end * hd), slice(tp.kv_start * hd, tp.kv_end * hd)
        mlp_rows = slice(tp.mlp_start, tp.mlp_end)
        sources = {
            "q_proj": (q_rows, c.q_size),
            "k_proj": (kv_rows, c.kv_size),
            "v_proj": (kv_rows, c.kv_size),
        }
        for i, layer in enumerate(self.layers):
            p = f"layers.{self.layer_start + i}."
            attn, mlp = layer.self_attn, layer.mlp
            offset = 0
            for name, (rows, full) in sources.items():
                local = rows.stop - rows.start
                w = attn.qkv_proj.weight.data[offset : offset + local]
                targets[f"{p}self_attn.{name}.weight"] = part(w, (rows,), (full, hidden))
                if c.qkv_bias:
                    b = attn.qkv_proj.bias.data[offset : offset + local]
                    targets[f"{p}self_attn.{name}.bias"] = part(b, (rows,), (full,))
                offset += local
            targets[f"{p}self_attn.o_proj.weight"] = part(
                attn.o_proj.weight.data, (slice(None), q_rows), (hidden, c.q_size)
            )
            if attn.o_proj.bias is not None:
                targets[f"{p}self_attn.o_proj.bias"] = whole(attn.o_proj.bias.data)
            local = mlp_rows.stop - mlp_rows.start
            gate_up = mlp.gate_up_proj.weight.data
            targets[f"{p}mlp.gate_proj.weight"] = part(gate_up[:local], (mlp_rows,), (n, hidden))
            targets[f"{p}mlp.up_proj.weight"] = part(gate_up[local:], (mlp_rows,), (n, hidden))
            targets[f"{p}mlp.down_proj.weight"] = part(
                mlp.down_proj.weight.data, (slice(None), mlp_rows), (hidden, n)
            )
            targets[f"{p}input_layernorm.weight"] = whole(layer.input_layernorm.weight.data)
            targets[f"{p}post_attention_layernorm.weight"] = whole(layer.post_attention_layernorm.weight.data)
        return targets, optional

    def checkpoint_items(self) -> Iterable[tuple[str, Tensor]]:
        """This slice's weights under checkpoint names (fused tensors split back), as loaders yield them.

        A tensor-parallel shard yields its own parts (q/k/v/gate/up rows, o/down columns, o bias on rank 0
        only), so they do not have the checkpoint's shapes: a shard loads from a whole model's items.
        """
        targets, optional = self._weight_targets()
        return ((name, target.param) for name, target in targets.items() if name not in optional)

    def wants(self, name: str) -> bool:
        """Whether checkpoint tensor ``name`` belongs to this slice (lets loaders skip the rest)."""
        if name.startswith("layers."):
            return self.layer_start <= int(name.split(".", 2)[1]) < self.layer_end
        if name == "embed_tokens.weight":
            return self.is_first or (self.is_last and self.config.tie_word_embeddings)
        if name in ("norm.weight", "lm_head.weight"):
            return self.is_last
        return name == "rope_freqs"

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Fill parameters from (Hugging Face style name, tensor) pairs; other slices' names are ignored.

        Tensors are whole checkpoint tensors; a tensor-parallel shard copies its part of each.
        ``rope_freqs`` (GGUF's per-frequency divisors for long-context scaling) adjusts the rotary
        frequencies. Raises ValueError on a shape mismatch or when a parameter is left unfilled.
        """
        targets, optional = self._weight_targets()
        seen: set[str] = set()
        for name, tensor in weights:
            if name == "rope_freqs":
                self.rotary.inv_freq = self.rotary.inv_freq / tensor.float().to(self.rotary.inv_freq.device)
                continue
            target = targets.get(name)
            if target is None:
                continue
            if tuple(tensor.shape) != target.shape:
                raise ValueError(
                    f"weight {name}: checkpoint shape {tuple(tensor.shape)} != model shape {target.shape}"
                )
            target.param.copy_(tensor if target.index is None else tensor[target.index])
            seen.add(name)
        missing = set(targets) - optional - seen
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {sorted(missing)[:3]}")

    @torch.no_grad()
    def init_random_(self, seed: int = 0) -> LlamaModel:
        """Random weights with unit-scale activations, for tests that need no checkpoint."""
        gen = torch.Generator().manual_seed(seed)
        for name, param in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                values = 1.0 + 0.1 * torch.randn(param.shape, generator=gen)
            elif name == "embed_tokens.weight":
                values = torch.randn(param.shape, generator=gen)
            elif name.endswith("bias"):
                values = 0.1 * torch.randn(param.shape, generator=gen)
            else:
                values = torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[-1])
            param.copy_(values)
        return self
