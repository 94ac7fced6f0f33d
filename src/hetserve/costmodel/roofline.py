"""Roofline cost model: spec-sheet peaks times correction factors, per layer and per phase.

A batch on a server is summarised by four numbers (``BatchShape``): new tokens computed, sequences,
attention (query, key) pairs and KV tokens read. Each layer is two kernel groups, timed separately:
the weight GEMMs, bound by FLOPs or by weight bytes, and attention, bound by FLOPs or by KV bytes.
The GPU's ``CostFactors`` for the format the server computes in (``efficiency:`` in the catalogue,
or its ``efficiency_by_run_dtype`` entry for that format) shape each term: GEMM efficiency that
grows with the rows of the product, how far compute and memory traffic overlap, attention's own
efficiencies, fixed per-layer and per-step times, and the all-reduce algorithm. Low-bit weights
without a native kernel path pay a dequantisation pass; tensor parallelism adds two all-reduces per
layer. ``ServerTimer`` folds all constants once so a call is a few float operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..specs.clusters import Link
from ..specs.gpus import CostFactors, GPUSpec
from ..specs.models import ModelSpec
from ..vocabulary import DTYPE_BYTES, RunDType
from .links import all_to_all_time, allreduce_time

#: Operations per weight for a standalone dequantisation pass (unpack, scale, zero, store).
DEQUANT_OPS_PER_WEIGHT = 4.0
#: Fraction of device memory the runtime may use (the rest is the framework's and the driver's).
MEMORY_UTILISATION = 0.9
#: Fraction of a fabric's per-direction bandwidth that collectives achieve when the GPU's factors
#: give none. PCIe cards in cloud machines usually lack peer-to-peer access, so NCCL stages through
#: host memory.
COLLECTIVE_EFFICIENCY = {
    "nvlink": 0.8,
    "xgmi": 0.7,
    "infinity-fabric": 0.7,
    "hccs": 0.7,
    "roce": 0.7,
    "pcie": 0.25,
    "none": 0.25,
}
#: Bytes of activations live per batch token per unit of hidden size (residual, norms, QKV, MLP).
ACTIVATION_BYTES_PER_TOKEN_HIDDEN = 2 * 8


def collective_link(gpu: GPUSpec, k: CostFactors) -> Link:
    """The path a tensor-parallel collective sees inside one node of ``gpu`` with factors ``k``."""
    f = gpu.fabric
    share = k.collective if k.collective is not None else COLLECTIVE_EFFICIENCY[f.kind]
    latency_us = k.allreduce_latency_us if k.allreduce_latency_us is not None else f.latency_us
    return Link(f.gb_per_s * 1e9 * share, latency_us * 1e-6)


def max_load(balls: float, bins: int) -> float:
    """Expected most balls in one of ``bins`` bins when ``balls`` fall uniformly at random: the mean
    plus ``sqrt(2 * mean * ln bins)`` (Raab and Steger, "Balls into bins", RANDOM 1998, tight for
    ``balls >= bins ln bins``; an approximation below), at least one ball and at most all of them."""
    if bins <= 1 or balls <= 0:
        return max(balls, 0.0)
    mean = balls / bins
    return min(balls, max(1.0, mean + math.sqrt(2.0 * mean * math.log(bins))))


def runs_expert_parallel(shape: ServerShape, model: ModelSpec) -> bool:
    """Whether ``shape`` spreads ``model``'s experts over its GPUs (``ServerShape.ep`` on an MoE model
    over several GPUs; elsewhere the flag changes nothing)."""
    return shape.ep and model.num_experts > 1 and shape.tp > 1


def ep_layer_shares(model: ModelSpec) -> tuple[float, float]:
    """(attention, one routed expert) shares of a layer's parameters: under expert parallelism the
    first is whole on every GPU, the experts are spread whole, the rest of the layer is split by TP."""
    layer = model.params_per_layer
    return model.attention_params / layer, model.expert_params * model.moe_share / layer


def ep_kv_share(shape: ServerShape, model: ModelSpec) -> float:
    """Share of a token's KV one GPU of ``shape`` stores: under expert parallelism each sequence lives
    on one GPU with all its heads (1/tp on average), else tensor parallelism's rule."""
    return 1.0 / shape.tp if runs_expert_parallel(shape, model) else model.kv_share_per_gpu(shape.tp)


def roof(compute: float, memory: float, overlap: float) -> float:
    """Time of work bound by ``compute`` and ``memory`` seconds that overlap to the degree ``overlap``
    (1: the slower of the two; 0: their sum)."""
    if compute > memory:
        return compute + (1.0 - overlap) * memory
    return memory + (1.0 - overlap) * compute


@dataclass(frozen=True)
class ServerShape:
    """What the cost model needs of a server: GPU, TP degree and the bits of each layer it holds.

    ``run_dtype`` is the format the engine computes 16-bit layers in (``vocabulary.run_dtype_for_kv``:
    hetserve's engine runs a server in its KV's format, so fp32 KV means fp32 weights read at 4 bytes);
    the server is timed with the GPU's peak and cost factors for that format (``GPUSpec.run_tflops``,
    ``GPUSpec.factors_for``). The default, fp16, is the 16-bit compute of a GPU serving stack."""

    gpu: GPUSpec
    tp: int
    layer_bits: tuple[int, ...]
    first: bool = True  # holds the embedding
    last: bool = True  # holds the final norm and LM head
    kv_dtype_bytes: float = 2.0
    run_dtype: RunDType = "fp16"
    #: Expert parallelism with data-parallel attention (an MoE model's server only): each of the ``tp``
    #: GPUs runs attention for its own share of the sequences with the whole attention weights and
    #: keeps those sequences' KV, and holds ``1/tp`` of the routed experts whole; tokens go to their
    #: experts' GPUs and back (two all-to-alls per layer). Shared experts and dense MLPs stay split.
    ep: bool = False

    @property
    def num_layers(self) -> int:
        return len(self.layer_bits)

    @property
    def run_bytes(self) -> float:
        """Bytes per element of ``run_dtype``: the width 16-bit weights are held and read at."""
        return float(DTYPE_BYTES[self.run_dtype])

    @property
    def factors(self) -> CostFactors:
        """The GPU's cost factors for this server's ``run_dtype``."""
        return self.gpu.factors_for(self.run_dtype)

    def bits_counts(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for b in self.layer_bits:
            out[b] = out.get(b, 0) + 1
        return out


@dataclass(frozen=True)
class BatchShape:
    new_tokens: float
    seqs: float
    attn_pairs: float
    kv_read_tokens: float

    @staticmethod
    def prefill(prompt_lens, cached: int = 0) -> BatchShape:
        n = float(sum(prompt_lens))
        pairs = sum(p * cached + p * (p + 1) / 2 for p in prompt_lens)
        return BatchShape(n, float(len(prompt_lens)), pairs, n + cached * len(prompt_lens))

    @staticmethod
    def decode(batch: float, total_context: float) -> BatchShape:
        """``batch`` sequences decoding one token each over ``total_context`` tokens in all."""
        return BatchShape(batch, batch, total_context + batch, total_context + batch)


@dataclass
class MemoryBreakdown:
    """Per-GPU memory of a server, bytes."""

    capacity: float
    usable: float
    weights: float
    activations: float
    kv_bytes_per_token: float  # per GPU, for one token across the server's layers

    @property
    def kv_room(self) -> float:
        return self.usable - self.weights - self.activations

    @property
    def fits(self) -> bool:
        return self.kv_room > 0

    @property
    def kv_capacity_tokens(self) -> int:
        return max(0, int(self.kv_room / self.kv_bytes_per_token)) if self.kv_bytes_per_token else 0


@dataclass
class ServerTimer:
    """Compiled timing of one server: ``time(new_tokens, seqs, pairs, kv_read)`` in seconds."""

    shape: ServerShape
    model: ModelSpec
    _groups: list[tuple[int, float, float, float, int]] = field(default_factory=list)
    _moe: bool = False

    def __post_init__(self) -> None:
        s, m, g = self.shape, self.model, self.shape.gpu
        k = s.factors
        bw = g.memory_bw_gb_per_s * 1e9
        peak = g.run_tflops(s.run_dtype) * 1e12  # 16-bit-weight layers, computed in the run format
        tp = s.tp
        self._moe = m.num_experts > 1
        self._overlap = k.overlap
        self._half_rows = k.gemm_half_rows
        self._rows_exponent = k.gemm_rows_exponent
        self._groups = []
        for bits, count in s.bits_counts().items():
            rate = peak if bits >= 16 else g.tflops_for_bits(bits) * 1e12
            flops_per_token = m.linear_flops_per_token_layer / tp / (rate * k.compute)
            weight_bytes = m.layer_weight_bytes(bits) * (s.run_bytes / 2.0 if bits >= 16 else 1.0)
            weight_read = weight_bytes / tp / (bw * k.memory)
            dequant = 0.0
            if not g.has_native_weight_path(bits):
                vector = g.tflops.get("fp32", g.half_tflops / 8) * 1e12 * k.compute
                dequant = m.matmul_params_per_layer / tp * DEQUANT_OPS_PER_WEIGHT / vector
            self._groups.append((count, flops_per_token, weight_read, dequant, bits))
        self._kv_read = (
            m.kv_bytes_per_token_layer(s.kv_dtype_bytes)
            * ep_kv_share(s, m)
            / (bw * k.attention_memory_or_default)
        )
        self._ep = runs_expert_parallel(s, m)
        if self._ep:
            self._compile_ep(peak, bw)
        self._attn_flop = m.attention_flops_per_pair / tp / (peak * k.attention_compute_or_default)
        self._layers = s.num_layers
        # the engine's time per step (scheduling, input preparation, the serving runtime) is paid once
        # per step of a chain: by the server that starts it (holding the embedding), not by every stage
        self._overhead = k.layer_overhead_us * 1e-6 * s.num_layers + (
            k.step_overhead_ms * 1e-3 if s.first else 0.0
        )
        self._ar_bytes_per_token = m.hidden_size * s.run_bytes  # activations, per all-reduce
        self._allreduce = k.allreduce
        self._link = collective_link(g, k)
        head_params = m.vocab_size * m.hidden_size / tp
        self._head_flop = 2 * head_params / (peak * k.compute) if s.last else 0.0
        self._head_read = s.run_bytes * head_params / (bw * k.memory) if s.last else 0.0

    def _compile_ep(self, peak: float, bw: float) -> None:
        """Per-layer constants of an expert-parallel server (``ServerShape.ep``), per group of bits:
        attention (whole weights, its GPU's share of the tokens), routed experts (the busiest GPU's
        tokens and experts), the rest of the MLP (shared experts, dense layers, router: split by TP)."""
        s, m, g = self.shape, self.model, self.shape.gpu
        k, tp = s.factors, s.tp
        attn_share, expert_share = ep_layer_shares(m)
        routed_flops = 2.0 * m.experts_per_token * m.expert_matrix_params * m.moe_share
        attn_flops = 2.0 * m.attention_matrix_params
        rest_flops = m.linear_flops_per_token_layer - attn_flops - routed_flops
        self._ep_groups = []
        for bits, count in s.bits_counts().items():
            rate = (peak if bits >= 16 else g.tflops_for_bits(bits) * 1e12) * k.compute
            layer = m.layer_weight_bytes(bits) * (s.run_bytes / 2.0 if bits >= 16 else 1.0) / (bw * k.memory)
            expert = layer * expert_share
            rest = layer - layer * attn_share - expert * m.num_experts
            self._ep_groups.append(
                (
                    count,
                    attn_flops / rate,
                    routed_flops / rate,
                    rest_flops / tp / rate,
                    layer * attn_share,
                    expert,
                    rest / tp,
                )
            )
        self._ep_experts_per_gpu = math.ceil(m.num_experts / tp)
        self._ep_dense = rest_flops > 0  # a split MLP part: one all-reduce per layer

    def _fixed_ep(self, new_tokens: float) -> float:
        """The weight GEMMs and collectives of an expert-parallel step of ``new_tokens`` tokens."""
        m, tp, ov = self.model, self.shape.tp, self._overlap
        share = new_tokens / tp  # tokens per GPU through attention
        routed = max_load(new_tokens * m.experts_per_token, tp)  # (token, expert) pairs on the busiest GPU
        touched = min(float(self._ep_experts_per_gpu), max_load(m.experts_touched(new_tokens), tp))
        t = 0.0
        for count, attn_f, routed_f, rest_f, attn_read, expert_read, rest_read in self._ep_groups:
            t += count * (
                roof(attn_f * self._rows(share), attn_read, ov)
                + roof(routed_f / m.experts_per_token * self._rows(routed), expert_read * touched, ov)
                + roof(rest_f * self._rows(new_tokens), rest_read, ov)
            )
        wire = self._ar_bytes_per_token * share * m.experts_per_token  # each GPU's tokens to their experts
        t += 2 * self._layers * all_to_all_time(wire, tp, self._link)
        if self._ep_dense:
            t += self._layers * allreduce_time(
                self._ar_bytes_per_token * new_tokens, tp, self._link, self._allreduce
            )
        return t

    def _rows(self, n: float) -> float:
        """``n`` rows of a product with the GEMM efficiency folded into the row count: efficiency
        ``compute x (rows / (rows + gemm_half_rows)) ** gemm_rows_exponent``."""
        rows = n + self._half_rows
        if self._rows_exponent != 1.0 and self._half_rows and n > 0:
            rows = n * (rows / n) ** self._rows_exponent
        return rows

    def time(self, new_tokens: float, seqs: float, attn_pairs: float, kv_read_tokens: float) -> float:
        if new_tokens <= 0:
            return 0.0
        c, m = self._attn_flop * attn_pairs, self._kv_read * kv_read_tokens
        if self._overlap == 1.0:  # the plain roofline: the hot path of the default factors
            return self._fixed(new_tokens, seqs) + self._layers * (c if c > m else m)
        return self._fixed(new_tokens, seqs) + self._layers * roof(c, m, self._overlap)

    def decode_affine(self, batch: float) -> tuple[float, float]:
        """``(a, b)`` with ``time(batch, batch, kv, kv) == a + b * kv``: a decode step of ``batch``
        sequences is affine in the KV tokens it reads (attention pairs equal KV reads in decode)."""
        return self._fixed(batch, batch), self._layers * roof(self._attn_flop, self._kv_read, self._overlap)

    def _fixed(self, new_tokens: float, seqs: float) -> float:
        """Everything but attention: weight GEMMs, dequantisation, overheads, all-reduces, LM head."""
        t = self._overhead
        if self._ep:
            t += self._fixed_ep(new_tokens)
            return t + self._head(seqs)
        rows = self._rows(new_tokens)
        for count, per_token, weight_read, dequant, bits in self._groups:
            if self._moe:
                weight_read *= self.model.layer_weight_bytes_read(
                    bits, new_tokens
                ) / self.model.layer_weight_bytes(bits)
            c = per_token * rows
            if self._overlap == 1.0:
                t += count * ((c if c > weight_read else weight_read) + dequant)
            else:
                t += count * (roof(c, weight_read, self._overlap) + dequant)
        if self.shape.tp > 1:
            # two all-reduces per layer: after attention and after the MLP
            t += (
                2
                * self._layers
                * allreduce_time(
                    self._ar_bytes_per_token * new_tokens, self.shape.tp, self._link, self._allreduce
                )
            )
        return t + self._head(seqs)

    def _head(self, seqs: float) -> float:
        """The LM head on the last stage: one row per sequence sampling."""
        if not self.shape.last:
            return 0.0
        return roof(self._head_flop * self._rows(seqs), self._head_read, self._overlap)

    def batch_time(self, batch: BatchShape) -> float:
        return self.time(batch.new_tokens, batch.seqs, batch.attn_pairs, batch.kv_read_tokens)


class RooflineCostModel:
    """The roofline backend of the cost model for one model."""

    name = "roofline"

    def __init__(self, model: ModelSpec, memory_utilisation: float = MEMORY_UTILISATION):
        self.model = model
        self.memory_utilisation = memory_utilisation
        self._timers: dict[ServerShape, ServerTimer] = {}

    def timer(self, shape: ServerShape) -> ServerTimer:
        t = self._timers.get(shape)
        if t is None:
            t = self._timers[shape] = ServerTimer(shape, self.model)
        return t

    def batch_time(self, shape: ServerShape, batch: BatchShape) -> float:
        return self.timer(shape).batch_time(batch)

    def prefill_time(self, shape: ServerShape, prompt_lens, cached: int = 0) -> float:
        m = self.model
        if m.kv_window is None:
            return self.batch_time(shape, BatchShape.prefill(prompt_lens, cached))
        pairs = sum(m.attention_pairs(p, cached) for p in prompt_lens)
        read = sum(m.kv_read(p + cached) for p in prompt_lens)
        return self.timer(shape).time(float(sum(prompt_lens)), float(len(prompt_lens)), pairs, read)

    def decode_time(self, shape: ServerShape, batch: int, total_context: float) -> float:
        """``batch`` sequences decoding one token each over ``total_context`` tokens in all (with
        sliding-window layers, each sequence is taken at the mean context)."""
        if self.model.kv_window is None:
            return self.batch_time(shape, BatchShape.decode(batch, total_context))
        read = batch * self.model.kv_read(total_context / batch + 1)
        return self.timer(shape).time(batch, batch, read, read)

    def activation_bytes(self, shape: ServerShape, max_batch_tokens: int, max_batch_size: int) -> float:
        m = self.model
        per_token = ACTIVATION_BYTES_PER_TOKEN_HIDDEN * m.hidden_size + 2 * 2 * m.intermediate_size / shape.tp
        logits = 4.0 * m.vocab_size * max_batch_size / shape.tp if shape.last else 0.0
        return per_token * max_batch_tokens + logits

    def memory(
        self, shape: ServerShape, max_batch_tokens: int = 8192, max_batch_size: int = 256
    ) -> MemoryBreakdown:
        m, tp = self.model, shape.tp
        wide = shape.run_bytes / 2.0  # 16-bit tensors held at the run width
        weights = sum(m.layer_weight_bytes(b) * (wide if b >= 16 else 1.0) for b in shape.layer_bits) / tp
        if runs_expert_parallel(shape, m):
            # attention whole on every GPU, ceil(E / tp) routed experts, the rest of the layer split
            attn, expert = ep_layer_shares(m)
            per_gpu = attn + expert * math.ceil(m.num_experts / tp) + (1 - attn - expert * m.num_experts) / tp
            weights *= per_gpu * tp
        emb = m.vocab_size * m.hidden_size * shape.run_bytes
        if shape.first:
            weights += (
                emb
                + (m.embedding_params - m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2))
                * shape.run_bytes
            ) / tp
        if shape.last and (not m.tie_word_embeddings or not shape.first):
            weights += emb / tp
        kv_per_token = (
            m.kv_bytes_per_token_layer(shape.kv_dtype_bytes) * ep_kv_share(shape, m) * shape.num_layers
        )
        cap = shape.gpu.memory_gb * 1e9
        return MemoryBreakdown(
            capacity=cap,
            usable=cap * self.memory_utilisation,
            weights=weights,
            activations=self.activation_bytes(shape, max_batch_tokens, max_batch_size),
            kv_bytes_per_token=kv_per_token,
        )
