"""The router's own Prometheus metrics: requests, failures, ejections and retries per backend, and the
backends' in-flight requests, state and reported load."""

from __future__ import annotations

from ..api.metrics import Counter, Gauge, LabelledGauge
from .backends import Backend


class RouterStats:
    """The router's Prometheus metrics."""

    def __init__(self, backends: list[Backend]):
        self.backends = backends
        self.requests = Counter("hetserve_router_requests_total", "Requests sent to a backend", ("backend",))
        self.failures = Counter(
            "hetserve_router_backend_failures_total", "Failed sends and checks", ("backend",)
        )
        self.ejections = Counter(
            "hetserve_router_ejections_total", "Times a backend was ejected", ("backend",)
        )
        self.retries = Counter("hetserve_router_retries_total", "Requests tried again on another backend")
        self.rejected = Counter("hetserve_router_rejected_total", "Requests no backend took (503)")

    def sent(self, b: Backend) -> None:
        self.requests.inc(1.0, b.name)

    def failure(self, b: Backend) -> None:
        self.failures.inc(1.0, b.name)

    def ejected(self, b: Backend) -> None:
        self.ejections.inc(1.0, b.name)

    def retried(self) -> None:
        self.retries.inc()

    def render(self) -> str:
        per = lambda read: {(("backend", b.name),): read(b) for b in self.backends}
        metrics = [
            self.requests,
            self.failures,
            self.ejections,
            self.retries,
            self.rejected,
            LabelledGauge(
                "hetserve_router_in_flight", "Requests in flight to a backend", per(lambda b: b.in_flight)
            ),
            LabelledGauge(
                "hetserve_router_backend_up", "1 while a backend is admitted", per(lambda b: int(b.healthy))
            ),
            LabelledGauge(
                "hetserve_router_backend_reported_load",
                "Running + waiting requests on the backend's own /metrics",
                per(lambda b: b.reported),
            ),
            Gauge("hetserve_router_backends", "Backends of the plan", lambda: len(self.backends)),
        ]
        return "\n".join(line for m in metrics for line in m.lines()) + "\n"
