"""Per-request records and the summary of a simulation (definitions in docs/simulate.md).

- TTFT: arrival -> the first output token is produced (end of the prefill step that samples it; for
  disaggregated plans the prefill instance streams it, as in Splitwise).
- TPOT: (finish - first token) / (output tokens - 1), for requests with more than one output token.
- E2E: arrival -> last output token.
- Throughput: output tokens of completed requests / makespan (first arrival -> last completion).
- Goodput: completed requests that met every SLO the workload sets / makespan; SLO attainment: their
  share of all requests (dropped ones count as misses).
- Energy: each GPU draws its idle power for the whole makespan, plus (TDP - idle) while busy.
- ``slo_met``: every percentile target the workload sets holds (TTFT, TPOT, E2E) and nothing was
  dropped. A simulation at a fixed rate that is to decide a TTFT or E2E target spans ``probe_window_s``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from ..specs.workloads import SLO

#: Arrival windows, in TTFT or E2E deadlines, that a rate probe must span: a burst shorter than the
#: deadline is absorbed by the queues however slow the plan, and over ``k`` deadlines an overload of more
#: than about 1 + 1 / (0.9 k) times the sustainable rate pushes the p90 request past the deadline.
DEADLINE_WINDOWS = 10
#: Longest arrival window a simulation at a rate replays (``planner.evaluate.simulate_at_rate``: the
#: planner's confirmations, the strategies' trials and ``hetserve compare``'s goodput probes).
MAX_SEARCH_WINDOW_S = 600.0

RECORD_FIELDS = (
    "id",
    "arrival_s",
    "prompt_tokens",
    "output_tokens",
    "entry_instance",
    "decode_instance",
    "prefill_start_s",
    "prefill_end_s",
    "transfer_start_s",
    "transfer_end_s",
    "first_token_s",
    "finish_s",
    "preemptions",
    "kv_bytes",
    "dropped",
    "drop_reason",
)

#: Why the simulator dropped a request (``Records.drop_reason``).
DROP_TOO_LONG = "prompt + output longer than any instance's KV cache holds"
DROP_UNFINISHED = "unfinished when the simulation stopped (arrivals plus drain time)"
#: Request ids listed per drop reason.
DROP_EXAMPLES = 5


@dataclass
class Records:
    """Column arrays, one row per request."""

    n: int
    arrival: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    entry: list = field(default_factory=list)
    decode: list = field(default_factory=list)
    prefill_start: np.ndarray = None
    prefill_end: np.ndarray = None
    transfer_start: np.ndarray = None
    transfer_end: np.ndarray = None
    first_token: np.ndarray = None
    finish: np.ndarray = None
    preemptions: np.ndarray = None
    kv_bytes: np.ndarray = None
    dropped: np.ndarray = None
    drop_reason: list = field(default_factory=list)  # "" for requests not dropped

    def __post_init__(self) -> None:
        nan = lambda: np.full(self.n, np.nan)
        for name in (
            "prefill_start",
            "prefill_end",
            "transfer_start",
            "transfer_end",
            "first_token",
            "finish",
            "kv_bytes",
        ):
            if getattr(self, name) is None:
                setattr(self, name, nan())
        if self.preemptions is None:
            self.preemptions = np.zeros(self.n, dtype=np.int64)
        if self.dropped is None:
            self.dropped = np.zeros(self.n, dtype=bool)
        if not self.entry:
            self.entry = [""] * self.n
        if not self.decode:
            self.decode = [""] * self.n
        if not self.drop_reason:
            self.drop_reason = [""] * self.n

    def drops(self) -> dict[str, dict]:
        """Dropped requests by reason: ``{reason: {"count": n, "first_ids": [...]}}`` (ids are row
        numbers, first ``DROP_EXAMPLES``)."""
        out: dict[str, dict] = {}
        for i in np.flatnonzero(self.dropped):
            reason = self.drop_reason[i] or DROP_UNFINISHED
            d = out.setdefault(reason, {"count": 0, "first_ids": []})
            d["count"] += 1
            if len(d["first_ids"]) < DROP_EXAMPLES:
                d["first_ids"].append(int(i))
        return out

    @property
    def completed(self) -> np.ndarray:
        return ~np.isnan(self.finish) & ~self.dropped

    def ttft(self) -> np.ndarray:
        return self.first_token - self.arrival

    def tpot(self) -> np.ndarray:
        steps = self.output - 1
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(steps > 0, (self.finish - self.first_token) / np.maximum(steps, 1), np.nan)

    def e2e(self) -> np.ndarray:
        return self.finish - self.arrival

    def write(self, path: Path) -> Path:
        cols = [
            np.arange(self.n),
            self.arrival,
            self.prompt,
            self.output,
            self.entry,
            self.decode,
            self.prefill_start,
            self.prefill_end,
            self.transfer_start,
            self.transfer_end,
            self.first_token,
            self.finish,
            self.preemptions,
            self.kv_bytes,
            self.dropped,
            self.drop_reason,
        ]
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(
                pa.table({k: list(v) if isinstance(v, list) else v for k, v in zip(RECORD_FIELDS, cols)}),
                path,
            )
            return path
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(RECORD_FIELDS)
            for row in zip(*cols):
                w.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in row])
        return path


def _pct(values: np.ndarray, q: float) -> float | None:
    v = values[~np.isnan(values)]
    return float(np.percentile(v, q)) if len(v) else None


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3


def meets_slo(rec: Records, slo: SLO) -> np.ndarray:
    ok = rec.completed.copy()
    if slo.ttft_ms is not None:
        ok &= rec.ttft() * 1e3 <= slo.ttft_ms
    if slo.tpot_ms is not None:
        tp = rec.tpot()
        ok &= np.isnan(tp) | (tp * 1e3 <= slo.tpot_ms)
    if slo.e2e_ms is not None:
        ok &= rec.e2e() * 1e3 <= slo.e2e_ms
    return ok


@dataclass(frozen=True)
class SimSummary:
    """What a simulation (or a measured run, ``hetserve bench``) comes to; times in ms, rates per second.
    ``*_q_ms`` are the percentiles of the workload's SLO (``slo_percentile``); ``as_dict`` names them
    ``ttft_p{q}_ms`` etc. as the JSON output does."""

    requests: int
    completed: int
    dropped: int
    ttft_p50_ms: float | None
    ttft_p90_ms: float | None
    ttft_p99_ms: float | None
    tpot_p50_ms: float | None
    tpot_p90_ms: float | None
    tpot_p99_ms: float | None
    e2e_p50_ms: float | None
    e2e_p90_ms: float | None
    e2e_p99_ms: float | None
    throughput_rps: float
    throughput_tok_s: float
    input_tok_s: float
    goodput_rps: float
    slo_attainment: float
    slo_percentile: float
    ttft_q_ms: float | None
    tpot_q_ms: float | None
    e2e_q_ms: float | None
    makespan_s: float
    preemptions: int
    bytes_transferred: float
    gpus: int
    cost_per_hour: float
    cost_per_mtok: float | None
    energy_j: float
    joules_per_token: float | None
    iterations: int
    utilisation: dict[str, float]
    peak_kv_fraction: dict[str, float]
    slo_met: bool

    @property
    def power_w(self) -> float:
        """Average power draw over the makespan."""
        return self.energy_j / max(self.makespan_s, 1e-9)

    def as_dict(self) -> dict:
        """The summary as JSON-ready names (the SLO percentile's figures as ``ttft_p{q}_ms`` etc.)."""
        out = {}
        q = f"{self.slo_percentile:g}"
        for f in fields(self):
            if f.name == "slo_percentile":
                continue
            if f.name.endswith("_q_ms"):
                out[f"{f.name[: -len('_q_ms')]}_p{q}_ms"] = getattr(self, f.name)
            else:
                out[f.name] = getattr(self, f.name)
        return out


def summarise(
    rec: Records,
    slo: SLO,
    *,
    cost_per_hour: float,
    energy_j: float,
    makespan: float,
    server_util: dict[str, float],
    peak_kv: dict[str, float],
    bytes_transferred: float,
    gpus: int,
    iterations: int,
) -> SimSummary:
    done = rec.completed
    out_tokens = float(rec.output[done].sum())
    in_tokens = float(rec.prompt[done].sum())
    span = max(makespan, 1e-9)
    tput = out_tokens / span
    good = meets_slo(rec, slo)
    ttft, tpot, e2e = rec.ttft()[done], rec.tpot()[done], rec.e2e()[done]
    q = slo.percentile
    ttft_q, tpot_q, e2e_q = _ms(_pct(ttft, q)), _ms(_pct(tpot, q)), _ms(_pct(e2e, q))
    dropped = int(rec.n - done.sum())
    return SimSummary(
        requests=int(rec.n),
        completed=int(done.sum()),
        dropped=dropped,
        ttft_p50_ms=_ms(_pct(ttft, 50)),
        ttft_p90_ms=_ms(_pct(ttft, 90)),
        ttft_p99_ms=_ms(_pct(ttft, 99)),
        tpot_p50_ms=_ms(_pct(tpot, 50)),
        tpot_p90_ms=_ms(_pct(tpot, 90)),
        tpot_p99_ms=_ms(_pct(tpot, 99)),
        e2e_p50_ms=_ms(_pct(e2e, 50)),
        e2e_p90_ms=_ms(_pct(e2e, 90)),
        e2e_p99_ms=_ms(_pct(e2e, 99)),
        throughput_rps=float(done.sum()) / span,
        throughput_tok_s=tput,
        input_tok_s=in_tokens / span,
        goodput_rps=float(good.sum()) / span,
        slo_attainment=float(good.sum()) / max(rec.n, 1),
        slo_percentile=q,
        ttft_q_ms=ttft_q,
        tpot_q_ms=tpot_q,
        e2e_q_ms=e2e_q,
        makespan_s=makespan,
        preemptions=int(rec.preemptions.sum()),
        bytes_transferred=bytes_transferred,
        gpus=gpus,
        cost_per_hour=cost_per_hour,
        cost_per_mtok=cost_per_hour / (tput * 3600) * 1e6 if tput > 0 else None,
        energy_j=energy_j,
        joules_per_token=energy_j / out_tokens if out_tokens else None,
        iterations=iterations,
        utilisation=server_util,
        peak_kv_fraction=peak_kv,
        slo_met=_slo_met(ttft_q, tpot_q, e2e_q, dropped, slo),
    )


def probe_window_s(slo: SLO) -> float:
    """Shortest arrival window (s) over which a simulation at a fixed rate can tell whether the SLO's
    queueing targets hold at that rate: ``DEADLINE_WINDOWS`` times the longer of the TTFT and E2E targets
    (0 without either; TPOT does not grow with a queue)."""
    targets = [t for t in (slo.ttft_ms, slo.e2e_ms) if t is not None]
    return DEADLINE_WINDOWS * max(targets) / 1e3 if targets else 0.0


def _slo_met(ttft_q: float | None, tpot_q: float | None, e2e_q: float | None, dropped: int, slo: SLO) -> bool:
    """The workload's percentile targets hold (TTFT, TPOT and E2E over completed requests, at the SLO's
    percentile) and nothing was dropped."""
    checks = []
    if slo.ttft_ms is not None:
        checks.append(ttft_q is not None and ttft_q <= slo.ttft_ms)
    if slo.tpot_ms is not None:
        checks.append(tpot_q is None or tpot_q <= slo.tpot_ms)
    if slo.e2e_ms is not None:
        checks.append(e2e_q is not None and e2e_q <= slo.e2e_ms)
    return all(checks) and dropped == 0
