"""Analytic, queueing-aware capacity of one instance for a workload (what the planner optimises over).

For a chain of stages (the cost model's timers plus hops) and a workload's mean prompt ``P`` and
output ``O``, each role gets the largest request rate it sustains while its SLOs hold at the
workload's percentile:

- prefill: batches of prompts up to the token budget; TTFT = the prompt's own prefill plus the
  queueing delay of an M/M/1-like queue at that utilisation, at the percentile;
- decode: the largest batch whose step time meets TPOT and whose KV fits; rate = B / (O * step);
- mixed: prefill time is taken out of the decode loop (each decode interval stretches by
  1 / (1 - prefill share)); both TTFT and TPOT must hold.

An end-to-end target (``slo.e2e_ms``) is checked for a request of ``output_q`` output tokens, the
workload's output length at the SLO percentile (the caller passes it; the default is the mean):

- mixed: E2E = TTFT at the percentile + (output_q - 1) x the *mean* token interval
  ``step / (1 - prefill share)`` (a long request's interval averages over its many steps, so the
  percentile factor ``TPOT_TAIL`` is not applied; adding a percentile TTFT to a percentile length is
  conservative and offsets that);
- prefill (a disaggregated pair's first half): the TTFT must meet the E2E target too;
- decode (the second half): only its own share, (output_q - 1) x TPOT <= the E2E target. The pair is
  thus judged per side, leniently when no TTFT target bounds the prefill; the simulation (which checks
  the E2E percentile of whole requests) is the judge of a disaggregated plan.

Pipelines keep ``m`` batches in flight: a step's latency is the sum of the stages and hops, and the
cycle of one lane is max(latency, m * slowest stage).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..costmodel.roofline import ServerTimer
from ..specs.workloads import SLO

#: Highest utilisation the planner plans for (queues explode beyond it).
MAX_UTILISATION = 0.9
#: Share of KV capacity the planner fills on average (room for the longer requests of a mix).
KV_HEADROOM = 0.8
#: Ratio of a percentile TPOT to the mean when prefill chunks interleave with decode steps (p90 in
#: simulations of colocated instances runs ~1.2-1.4x the mean).
TPOT_TAIL = 1.3


@dataclass
class ChainTiming:
    """Step times of one instance's chain."""

    timers: list[ServerTimer]
    hop_latency: list[float]
    hop_byte_time: list[float]  # seconds per activation token per hop
    micro_batches: int = 1

    def _stages(self, new: float, seqs: float, pairs: float, kv: float) -> tuple[float, float]:
        times = [t.time(new, seqs, pairs, kv) for t in self.timers]
        hops = sum(lat + b * new for lat, b in zip(self.hop_latency, self.hop_byte_time))
        return sum(times) + hops, max(times)

    def cycle(self, new: float, seqs: float, pairs: float, kv: float) -> tuple[float, float]:
        """(latency of one lane's step, time between that lane's steps) for a batch of this shape per lane."""
        latency, slowest = self._stages(new, seqs, pairs, kv)
        return latency, max(latency, self.micro_batches * slowest)

    def prefill(self, prompt: float, batch: int) -> tuple[float, float]:
        """(TTFT of a prompt alone, requests/s at saturation) for lanes of ``batch`` prompts."""
        m = self.timers[0].model
        pairs, read = m.attention_pairs(prompt, 0), m.kv_read(prompt)
        alone, _ = self.cycle(prompt, 1, pairs, read)
        _, cyc = self.cycle(batch * prompt, batch, batch * pairs, batch * read)
        return alone, self.micro_batches * batch / cyc

    def decode(self, batch: float, context: float) -> tuple[float, float]:
        """(TPOT, output tokens/s) with ``batch`` sequences decoding (split over the lanes)."""
        lane = max(batch / self.micro_batches, 1.0)
        kv = lane * self.timers[0].model.kv_read(context + 1)
        _, cyc = self.cycle(lane, lane, kv, kv)
        return cyc, self.micro_batches * lane / cyc


def _queue_wait(service: float, rho: float, q: float) -> float:
    """Waiting time at percentile q (0..1) of an M/M/1-like queue with mean service ``service``."""
    if rho <= 0:
        return 0.0
    if rho >= 1:
        return math.inf
    mu_minus_lambda = (1 - rho) / service
    return max(0.0, math.log(rho / (1 - q)) / mu_minus_lambda) if rho > 1 - q else 0.0


@dataclass
class Capacity:
    rate: float  # requests/s sustained within the SLOs (0 if none)
    ttft: float  # TTFT (s) at that rate, at the percentile
    tpot: float  # TPOT (s) at that rate
    e2e: float  # E2E (s) of this role's part at that rate, for the percentile output length
    busy_per_request: float  # GPU-seconds of busy time per request (for energy)
    batch: float  # decode batch in steady state (0 for prefill)
    limit: str  # what bounds the rate: "ttft", "tpot", "e2e", "kv", "batch", "compute"


def _targets(slo: SLO | None) -> tuple[float, float, float]:
    """(TTFT, TPOT, E2E) targets in seconds; inf where the SLO sets none."""
    if slo is None:
        return math.inf, math.inf, math.inf
    ttft, tpot, e2e = (ms / 1e3 if ms else math.inf for ms in (slo.ttft_ms, slo.tpot_ms, slo.e2e_ms))
    return ttft, tpot, e2e


def _bisect(ok, hi: float, iters: int = 40) -> float:
    """Largest x in [0, hi] with ok(x), assuming ok is monotone (true then false)."""
    if hi <= 0 or not ok(hi * 1e-6):
        return 0.0
    if ok(hi):
        return hi
    lo = hi * 1e-6
    for _ in range(iters):
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _prompts_per_batch(ch: ChainTiming, prompt: float, max_batch_tokens: int, max_batch: int | None) -> int:
    """Prompts one lane prefills together: as many as the token budget holds, at most the lane's share of
    the instance's ``max_batch`` sequences."""
    batch = int(max_batch_tokens // max(prompt, 1))
    if max_batch is not None:
        batch = min(batch, max_batch // ch.micro_batches)
    return max(1, batch)


def prefill_capacity(
    ch: ChainTiming,
    prompt: float,
    slo: SLO | None,
    max_batch_tokens: int,
    max_rate_by_link: float = math.inf,
    max_batch: int | None = None,
) -> Capacity:
    batch = _prompts_per_batch(ch, prompt, max_batch_tokens, max_batch)
    alone, mu = ch.prefill(prompt, batch)
    service = 1.0 / mu
    q = (slo.percentile if slo else 90) / 100
    ttft_target, _, e2e_target = _targets(slo)
    target = min(ttft_target, e2e_target)

    def ttft(rate):
        return alone + _queue_wait(service, rate / mu, q)

    top = min(mu * MAX_UTILISATION, max_rate_by_link)
    rate = _bisect(lambda r: ttft(r) <= target, top)
    if rate < top * 0.999:
        limit = "ttft" if ttft_target <= e2e_target else "e2e"
    else:
        limit = "link" if max_rate_by_link < mu * MAX_UTILISATION else "compute"
    busy = service * ch.micro_batches  # each stage is busy 1/m of the cycle per lane
    at = ttft(rate) if rate else alone
    return Capacity(rate, at, 0.0, at, busy, 0.0, limit)


def decode_capacity(
    ch: ChainTiming,
    prompt: float,
    output: float,
    slo: SLO | None,
    max_batch: int,
    kv_tokens: int,
    output_q: float | None = None,
) -> Capacity:
    context = prompt + output / 2
    kv_limit = KV_HEADROOM * kv_tokens / ch.timers[0].model.kv_read(context + 1)
    _, tpot_target, e2e_target = _targets(slo)
    steps = max((output if output_q is None else output_q) - 1, 1.0)
    target = min(tpot_target, e2e_target / steps)
    bound = "tpot" if tpot_target <= e2e_target / steps else "e2e"
    top = min(float(max_batch), kv_limit)
    if top < 1:
        return Capacity(0.0, 0.0, math.inf, math.inf, math.inf, 0.0, "kv")
    b = _bisect(lambda x: ch.decode(x, context)[0] <= target, top)
    if b < 1:
        tpot, _ = ch.decode(1, context)
        return Capacity(0.0, 0.0, tpot, steps * tpot, math.inf, 0.0, bound)
    tpot, tok_s = ch.decode(b, context)
    limit = bound if b < top * 0.999 else ("kv" if kv_limit < max_batch else "batch")
    rate = tok_s / max(output, 1) * MAX_UTILISATION
    return Capacity(rate, 0.0, tpot, steps * tpot, tpot / b * output, b, limit)


def mixed_capacity(
    ch: ChainTiming,
    prompt: float,
    output: float,
    slo: SLO | None,
    max_batch: int,
    max_batch_tokens: int,
    kv_tokens: int,
    chunk: int | None = None,
    output_q: float | None = None,
) -> Capacity:
    """Colocated prefill and decode with chunked prefill mixed into decode steps.

    At rate ``r`` prefill takes the share ``f = r * s_p`` of the time; decode steps of the ``B``
    running sequences fill the rest, so a token interval is ``step(B) / (1 - f)`` and, by Little's law,
    ``B = r * O * step(B) / (1 - f)``. A prompt needs ceil(P / chunk) steps, each carrying a decode
    step too, and queues behind earlier prompts for the prefill share (an M/M/1-like tail). The E2E of
    a request of ``output_q`` tokens is its TTFT plus ``output_q - 1`` mean token intervals.
    """
    context = prompt + output / 2
    batch = _prompts_per_batch(ch, prompt, max_batch_tokens, max_batch)
    alone, mu_p = ch.prefill(prompt, batch)
    s_p = 1.0 / mu_p  # prefill seconds per request at full batches
    q = (slo.percentile if slo else 90) / 100
    ttft_target, tpot_target, e2e_target = _targets(slo)
    kv_limit = KV_HEADROOM * kv_tokens / ch.timers[0].model.kv_read(context + 1)
    top_b = min(float(max_batch), kv_limit)
    out = max(output, 1.0)
    steps = max((output if output_q is None else output_q) - 1, 0.0)
    pieces = math.ceil(prompt / chunk) if chunk else 1

    def state(rate):
        """(feasible, ttft, tpot, e2e, batch) at ``rate``."""
        f_p = rate * s_p
        if f_p >= MAX_UTILISATION or top_b < 1:
            return False, math.inf, math.inf, math.inf, 0.0
        b = 1.0
        for _ in range(60):  # fixed point of Little's law
            nxt = max(1.0, rate * out * ch.decode(b, context)[0] / (1 - f_p))
            if nxt > top_b:
                return False, math.inf, math.inf, math.inf, top_b
            if abs(nxt - b) < 1e-3:
                b = nxt
                break
            b = nxt
        step, _ = ch.decode(b, context)
        interval = step / (1 - f_p)
        service = alone + pieces * step
        ttft = service + _queue_wait(s_p, f_p, q)
        return True, ttft, interval * TPOT_TAIL, ttft + steps * interval, b

    def ok(rate):
        good, ttft, tpot, e2e, _ = state(rate)
        return good and ttft <= ttft_target and tpot <= tpot_target and e2e <= e2e_target

    rate = _bisect(ok, mu_p * MAX_UTILISATION)
    if rate <= 0:
        step1, _ = ch.decode(1, context)
        e2e1 = alone + steps * step1
        limit = "ttft" if alone > ttft_target else ("e2e" if e2e1 > e2e_target else "tpot")
        return Capacity(0.0, alone, step1, e2e1, math.inf, 0.0, limit)
    _, ttft, tpot, e2e, b = state(rate)
    good_hi, _, tpot_hi, e2e_hi, b_hi = state(rate * 1.01)
    if not good_hi:
        limit = ("kv" if kv_limit < max_batch else "batch") if b_hi >= top_b else "prefill"
    elif tpot_hi > tpot_target:
        limit = "tpot"
    elif e2e_hi > e2e_target:
        limit = "e2e"
    else:
        limit = "ttft"
    step, _ = ch.decode(b, context)
    return Capacity(rate, ttft, tpot, e2e, s_p * ch.micro_batches + out * step / b, b, limit)
