"""The units a plan is built from: GPU pools (nodes of one GPU type, size and zone), the stages of an
instance (a tensor-parallel group in one node of a pool holding a layer range at per-layer bits), the
tensor-parallel degrees a group may take, the scheduler settings of each role, and the weight room of a
stage. The template factory (templates.py), the placements and the baselines share them."""

from __future__ import annotations

from dataclasses import dataclass

from ..costmodel.roofline import RooflineCostModel, ServerShape
from ..specs.clusters import Cluster
from ..specs.gpus import GPUSpec
from ..specs.models import ModelSpec

ROLES = ("mixed", "prefill", "decode")
#: Share of a stage's free memory kept for the KV cache when the planner places weights.
KV_RESERVE = 0.15
SETTINGS = {  # max_batch_size, max_batch_tokens, chunk_size per role
    "mixed": (256, 4096, 2048),
    "prefill": (64, 16384, 8192),
    "decode": (256, 8192, 2048),
}


def batch_limit(max_batch: int, lanes: int, max_seqs: int | None) -> int:
    """An instance's ``max_batch_size`` when the engine runs at most ``max_seqs`` sequences in one batch
    (None: no limit): a plan's ``max_batch_size`` counts the whole instance, so ``max_seqs`` per lane."""
    return max_batch if max_seqs is None else min(max_batch, max_seqs * max(lanes, 1))


def role_settings(role: str, lanes: int = 1, max_seqs: int | None = None) -> tuple[int, int, int]:
    """(max_batch_size, max_batch_tokens, chunk_size) of an instance of ``role`` with ``lanes`` micro-batch
    lanes, its batch held to ``max_seqs`` per lane (``batch_limit``)."""
    max_batch, max_tokens, chunk = SETTINGS[role]
    return batch_limit(max_batch, lanes, max_seqs), max_tokens, chunk


def tp_choices(gpus: int, model: ModelSpec) -> list[int]:
    """Tensor-parallel degrees the planner gives a group of ``gpus`` GPUs: those dividing both the GPU
    count and the model's attention heads, ascending."""
    return [t for t in range(1, gpus + 1) if gpus % t == 0 and model.num_heads % t == 0]


def weight_room(
    cm: RooflineCostModel,
    gpu: GPUSpec,
    tp: int,
    first: bool,
    last: bool,
    role: str,
    stages: int = 1,
    max_seqs: int | None = None,
    long_tokens: float = 0.0,
) -> float:
    """Bytes of layer weights a TP group may hold as one stage of a ``stages``-stage chain, beside the
    activations of its role's batches and room for the KV cache: ``KV_RESERVE`` of the rest or, when the
    engine runs at most ``max_seqs`` sequences per batch, what that many requests of ``long_tokens`` per
    lane need on this stage's share of the layers if that is less (an engine that batches little needs
    little cache)."""
    max_batch, max_tokens, _ = role_settings(role, stages, max_seqs)
    mem = cm.memory(ServerShape(gpu, tp, (), first=first, last=last), max_tokens, max_batch)
    room = mem.usable - mem.weights - mem.activations  # weights here: embedding/head only
    reserve = room * KV_RESERVE
    if max_seqs is not None:
        m = cm.model
        need = (
            max_batch
            * m.kv_slots(long_tokens)
            * m.kv_bytes_per_token_layer(2)
            * (m.num_layers / stages)
            * m.kv_share_per_gpu(tp)
        )
        reserve = min(reserve, need)
    return (room - reserve) * tp


@dataclass(frozen=True)
class Pool:
    key: str
    gpu: GPUSpec
    gpus_per_node: int
    zone: str
    nodes: tuple[str, ...]

    @property
    def total(self) -> int:
        return self.gpus_per_node * len(self.nodes)


@dataclass(frozen=True)
class Stage:
    pool: Pool
    tp: int
    start: int
    end: int
    bits: tuple[int, ...]
    ep: bool = False  # expert parallelism (ServerShape.ep)


def pools_of(cluster: Cluster) -> list[Pool]:
    groups: dict[tuple, list[str]] = {}
    for node in cluster.nodes.values():
        groups.setdefault((node.gpu.name, node.count, node.zone), []).append(node.name)
    return [
        Pool(f"{g}/{c}x@{z}", cluster.gpus[g], c, z, tuple(sorted(nodes)))
        for (g, c, z), nodes in sorted(groups.items())
    ]


def split_even(n: int, parts: int) -> list[tuple[int, int]]:
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append((start, start + size))
        start += size
    return out
