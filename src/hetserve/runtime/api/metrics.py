"""Server metrics in the Prometheus text exposition format (version 0.0.4).

Counters, gauges and histograms are updated from the engine thread and the request handlers and read
by ``GET /metrics``; one lock guards them all. Gauges that mirror engine state (queue length, KV
blocks) are read when the page is rendered.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable

from ..serving import ClusterStats, InstanceStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _num(x: float) -> str:
    x = float(x)
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if math.isnan(x):
        return "NaN"
    return str(int(x)) if x.is_integer() and abs(x) < 2**53 else repr(x)


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, labels

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name, help, labels=()):
        super().__init__(name, help, labels)
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def lines(self) -> list[str]:
        return self.header() + [
            f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in sorted(self.values.items())
        ]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name, help, read: Callable[[], float]):
        super().__init__(name, help)
        self.read = read

    def lines(self) -> list[str]:
        return self.header() + [f"{self.name} {_num(self.read())}"]


class LabelledGauge(_Metric):
    """A gauge with one sample per label set, e.g. per instance or per worker of a plan."""

    kind = "gauge"

    def __init__(self, name, help, samples: dict[tuple[tuple[str, str], ...], float]):
        super().__init__(name, help)
        self.samples = samples

    def lines(self) -> list[str]:
        out = self.header()
        for labels, value in self.samples.items():
            text = ",".join(f'{k}="{v}"' for k, v in labels)
            out.append(f"{self.name}{{{text}}} {_num(value)}" if text else f"{self.name} {_num(value)}")
        return out


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help, buckets: Iterable[float]):
        super().__init__(name, help)
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def lines(self) -> list[str]:
        out, running = self.header(), 0
        for bound, n in zip(self.bounds + (math.inf,), self.counts):
            running += n
            out.append(f'{self.name}_bucket{{le="{_num(bound)}"}} {running}')
        out += [f"{self.name}_sum {_num(self.sum)}", f"{self.name}_count {running}"]
        return out


class ServerMetrics:
    """Everything ``/metrics`` reports. ``engine_state`` returns (waiting, running, kv used, kv total)."""

    def __init__(
        self,
        engine_state: Callable[[], tuple[int, int, int, int]] = lambda: (0, 0, 0, 0),
        cluster_stats: Callable[[], ClusterStats | None] = lambda: None,
    ):
        self.lock = threading.Lock()
        self.engine_state = engine_state
        self.cluster_stats = cluster_stats  # per instance and per worker, when serving a plan
        self.requests = Counter(
            "hetserve_requests_total",
            "HTTP requests to the generation endpoints, by endpoint and status code",
            ("endpoint", "status"),
        )
        self.finished = Counter(
            "hetserve_requests_finished_total",
            "Generation requests finished, by reason (stop, length, abort)",
            ("finish_reason",),
        )
        self.prompt_tokens = Counter("hetserve_prompt_tokens_total", "Prompt tokens of admitted requests")
        self.generation_tokens = Counter("hetserve_generation_tokens_total", "Tokens generated")
        self.prefix_hits = Counter(
            "hetserve_prefix_cache_hit_tokens_total",
            "Prompt tokens served from the prefix cache instead of computed",
        )
        self.steps = Counter("hetserve_engine_steps_total", "Engine steps (forward passes)")
        self.ttft = Histogram(
            "hetserve_time_to_first_token_seconds",
            "Request arrival to its first generated token",
            TTFT_BUCKETS,
        )
        self.tpot = Histogram(
            "hetserve_time_per_output_token_seconds",
            "Time between consecutive generated tokens of a request",
            TPOT_BUCKETS,
        )
        self.e2e = Histogram(
            "hetserve_e2e_request_latency_seconds", "Request arrival to its last generated token", E2E_BUCKETS
        )

    def render(self) -> str:
        waiting, running, used, total = self.engine_state()
        gauges = [
            Gauge(
                "hetserve_num_requests_waiting",
                "Requests queued for admission to the running batch",
                lambda: waiting,
            ),
            Gauge("hetserve_num_requests_running", "Requests in the running batch", lambda: running),
            Gauge("hetserve_kv_blocks_used", "KV-cache blocks held by running requests", lambda: used),
            Gauge("hetserve_kv_blocks_total", "KV-cache blocks in all", lambda: total),
            Gauge(
                "hetserve_kv_cache_usage_ratio",
                "Share of KV-cache blocks in use",
                lambda: used / total if total else 0.0,
            ),
        ]
        with self.lock:
            metrics = [
                self.requests,
                self.finished,
                self.prompt_tokens,
                self.generation_tokens,
                self.prefix_hits,
                self.steps,
                self.ttft,
                self.tpot,
                self.e2e,
            ]
            lines = [line for m in metrics for line in m.lines()]
        lines += [line for g in gauges for line in g.lines()]
        stats = self.cluster_stats()
        if stats is not None:
            lines += [line for g in cluster_gauges(stats) for line in g.lines()]
        return "\n".join(lines) + "\n"


#: Per-instance gauges of a plan's cluster: name, help, and how each reads an instance's figures.
INSTANCE_GAUGES: tuple[tuple[str, str, Callable[[InstanceStats], float]], ...] = (
    ("hetserve_instance_up", "1 while every worker of the instance is alive", lambda i: float(i.up)),
    ("hetserve_instance_requests_waiting", "Requests queued at the instance", lambda i: i.load.waiting),
    ("hetserve_instance_requests_running", "Requests in the instance's batches", lambda i: i.load.running),
    (
        "hetserve_instance_kv_blocks_used",
        "KV blocks the instance's requests hold",
        lambda i: i.load.blocks_used,
    ),
    ("hetserve_instance_kv_blocks_total", "KV blocks of the instance", lambda i: i.load.blocks_total),
    ("hetserve_instance_steps", "Micro-batches the instance has run", lambda i: i.load.steps),
)


def cluster_gauges(stats: ClusterStats) -> list[LabelledGauge]:
    """/metrics per instance and per worker of a plan's cluster."""
    per_inst = {(("instance", i.name), ("role", i.role)): i for i in stats.instances}
    workers = {
        (("rank", str(w.rank)), ("server", w.server), ("tp_rank", str(w.tp_rank))): w for w in stats.workers
    }
    return [
        *(
            LabelledGauge(name, help, {labels: read(i) for labels, i in per_inst.items()})
            for name, help, read in INSTANCE_GAUGES
        ),
        LabelledGauge(
            "hetserve_worker_up",
            "1 while the worker process serves",
            {k: float(w.up) for k, w in workers.items()},
        ),
        LabelledGauge(
            "hetserve_worker_steps",
            "Micro-batches that passed through the worker",
            {k: w.steps for k, w in workers.items()},
        ),
        LabelledGauge(
            "hetserve_kv_handoff_bytes",
            "KV bytes handed from prefill to decode workers",
            {(): stats.kv_handoff_bytes},
        ),
    ]


def parse_prometheus(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` for every sample of a text-format page (strict: raises ValueError)."""
    samples: dict[str, float] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line or line.startswith("#"):
            if line.startswith("# TYPE") and line.split()[3] not in (
                "counter",
                "gauge",
                "histogram",
                "summary",
                "untyped",
            ):
                raise ValueError(f"line {lineno}: unknown metric type in {line!r}")
            continue
        key, _, value = line.rpartition(" ")
        if not key:
            raise ValueError(f"line {lineno}: no value in {line!r}")
        name = key.split("{", 1)[0]
        if (
            not name
            or not (name[0].isalpha() or name[0] in "_:")
            or not all(c.isalnum() or c in "_:" for c in name)
        ):
            raise ValueError(f"line {lineno}: bad metric name {name!r}")
        if "{" in key and not key.endswith("}"):
            raise ValueError(f"line {lineno}: unterminated labels in {line!r}")
        samples[key] = float(value)
    return samples
