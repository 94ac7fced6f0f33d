"""Communication costs: tensor-parallel collectives, pipeline hand-offs and KV transfers (alpha-beta)."""

from __future__ import annotations

from ..specs.clusters import Link


def allreduce_time(nbytes: float, ranks: int, link: Link, algorithm: str = "ring") -> float:
    """All-reduce of ``nbytes`` over ``ranks`` GPUs.

    ring: 2(n-1) steps, each moving nbytes/n (bandwidth-optimal, latency grows with n);
    one-shot: one step in which every rank reads the n-1 other buffers (latency-optimal, as custom
    all-reduce kernels over NVLink/NVSwitch do for small messages); auto: the faster of the two.
    """
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    steps = 2 * (ranks - 1)
    ring = steps * link.latency + steps / ranks * nbytes / link.bandwidth
    if algorithm == "ring":
        return ring
    one_shot = link.latency + (ranks - 1) * nbytes / link.bandwidth
    if algorithm == "one-shot":
        return one_shot
    return min(ring, one_shot)


def all_to_all_time(nbytes: float, ranks: int, link: Link) -> float:
    """Each of ``ranks`` GPUs sends ``nbytes`` spread evenly over the others (MoE dispatch or combine):
    ``ranks - 1`` steps, each rank moving ``nbytes / ranks`` per step."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    return (ranks - 1) * (link.latency + nbytes / ranks / link.bandwidth)


def p2p_time(nbytes: float, link: Link) -> float:
    """One message from one GPU to another (pipeline hand-off)."""
    return link.transfer_time(nbytes) if nbytes > 0 else 0.0


def kv_transfer_time(
    nbytes: float,
    link: Link,
    *,
    prefill_time: float = 0.0,
    layers: int = 1,
    layerwise: bool = False,
    conversion_s: float = 0.0,
) -> float:
    """Time a request waits for its KV cache to reach the decode side after prefill ends.

    Without overlap the whole cache moves after prefill. With layer-wise streaming each layer's KV
    leaves as soon as that layer is done, so only what the link cannot hide behind the remaining
    prefill, plus the last layer's share, is exposed. ``conversion_s`` is the format/dtype conversion
    when the two sides differ (cross-vendor hand-off).
    """
    if nbytes <= 0:
        return 0.0
    wire = nbytes / link.bandwidth
    if layerwise and layers > 1:
        hidden = prefill_time * (layers - 1) / layers
        exposed = max(wire - hidden, wire / layers)
    else:
        exposed = wire
    return link.latency + exposed + conversion_s
