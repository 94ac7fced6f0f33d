"""The cost model of one instance's chain: its servers' step times plus the hops between them.

Both clocks read an instance's speed and the work it has queued from here: the simulator times every
step with it, and the runtime's router turns queued tokens into seconds with the same per-token
figures (``WorkEstimate``), so least-work routing ranks instances alike in simulation and in serving.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..scheduling.instance import REF_BATCH, REF_OUTPUT, REF_PROMPT, WorkEstimate
from .roofline import ServerTimer


class ChainTimer:
    """Step times of a batch through a chain of servers (``timers``, one per stage) joined by hops
    (``hop_latency`` seconds plus ``hop_byte_time`` seconds per byte of a token's activations), with
    ``lanes`` micro-batches in flight."""

    def __init__(
        self,
        timers: Sequence[ServerTimer],
        hop_latency: Sequence[float],
        hop_byte_time: Sequence[float],
        lanes: int = 1,
    ):
        self.timers = list(timers)
        self.hop_latency = list(hop_latency)
        self.hop_byte_time = list(hop_byte_time)
        self.lanes = max(1, lanes)

    def step_time(self, new_tokens: float, seqs: float, pairs: float, kv_read: float) -> float:
        """Time of one step of one batch through the whole chain, without queueing."""
        t = 0.0
        for timer in self.timers:
            t += timer.time(new_tokens, seqs, pairs, kv_read)
        for lat, per_byte in zip(self.hop_latency, self.hop_byte_time):
            t += lat + per_byte * new_tokens
        return t

    def _in_flight(self, busy: int | None) -> int:
        """Lanes in flight: ``busy`` (at least one, at most the chain's lanes), or all of them."""
        return self.lanes if busy is None else min(max(1, busy), self.lanes)

    def cycle_time(
        self, new_tokens: float, seqs: float, pairs: float, kv_read: float, busy: int | None = None
    ) -> float:
        """Time between one lane's steps: its latency, or with m lanes in flight m x the slowest stage.
        ``busy``: the lanes in flight (default: all of them); a lane alone takes the chain's latency."""
        latency = self.step_time(new_tokens, seqs, pairs, kv_read)
        lanes = self._in_flight(busy)
        if lanes == 1:
            return latency
        slowest = max(timer.time(new_tokens, seqs, pairs, kv_read) for timer in self.timers)
        return max(latency, lanes * slowest)

    def decode_affine(self, batch: float, kv: float, busy: int | None = None) -> tuple[float, float]:
        """``(a, b)``: a lane's decode step of ``batch`` sequences takes ``a + b * kv`` (the cycle term
        that dominates at ``kv``) with ``busy`` lanes in flight (default: all)."""
        lanes = self._in_flight(busy)
        a = b = 0.0
        stages = []
        for timer in self.timers:
            ta, tb = timer.decode_affine(batch)
            a += ta
            b += tb
            stages.append((ta, tb))
        for lat, per_byte in zip(self.hop_latency, self.hop_byte_time):
            a += lat + per_byte * batch
        if lanes > 1:
            sa, sb = max(stages, key=lambda ab: ab[0] + ab[1] * kv)
            sa, sb = sa * lanes, sb * lanes
            if sa + sb * kv > a + b * kv:
                return sa, sb
        return a, b

    def stage_shares(
        self, new_tokens: float, seqs: float, pairs: float, kv_read: float, busy: int | None = None
    ) -> list[float]:
        """Each server's busy share of a lane's cycle with ``busy`` lanes in flight (a single server
        alone: [1.0])."""
        if len(self.timers) == 1 and self._in_flight(busy) == 1:
            return [1.0]
        times = [timer.time(new_tokens, seqs, pairs, kv_read) for timer in self.timers]
        cycle = self.cycle_time(new_tokens, seqs, pairs, kv_read, busy)
        return [x / cycle for x in times]

    def hop_time(self, i: int, new_tokens: float) -> float:
        return self.hop_latency[i] + self.hop_byte_time[i] * new_tokens

    def work_estimate(self) -> WorkEstimate:
        """Per-token seconds of prefill (a ``REF_PROMPT``-token prompt alone) and of decode (a batch of
        ``REF_BATCH`` at half a ``REF_OUTPUT``-token reply), and the speed of one reference request
        served alone (requests per second)."""
        prefill = self.step_time(REF_PROMPT, 1, REF_PROMPT * (REF_PROMPT + 1) / 2, REF_PROMPT)
        ctx = REF_PROMPT + REF_OUTPUT / 2
        decode = self.step_time(REF_BATCH, REF_BATCH, REF_BATCH * (ctx + 1), REF_BATCH * (ctx + 1))
        single = self.step_time(1, 1, ctx + 1, ctx + 1)
        return WorkEstimate(
            prefill_s_per_token=prefill / REF_PROMPT,
            decode_s_per_token=decode / REF_BATCH,
            speed=1.0 / (prefill + REF_OUTPUT * single),
        )
