"""The servers a router sends to: one backend per instance of the plan, its load and its health.

A ``Backend`` is an OpenAI-compatible server (vLLM, SGLang or ``hetserve serve``) standing for one
instance of the plan. It is ``Routable`` (scheduling/routing.py), so the plan's routing policy chooses
among backends as it chooses among instances in the simulator and in ``serve --plan``:

- outstanding work: the requests the router has in flight to it, or the backend's own count of running
  and waiting requests from its ``/metrics`` page when that is larger (other clients share it), divided
  by its speed;
- speed: the instance's routing weight in the plan (1 without weights);
- a free slot: fewer requests in flight than the instance's ``max_batch_size`` (what JFFC waits for).

A backend is *ejected* when a connection to it fails or its health check does not answer 200, and
*re-admitted* when a later check does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ...errors import HetserveError
from ...plan import InstancePlan, PlanFile

#: Sample names read from a backend's /metrics page as requests it is running and holding.
LOAD_SAMPLES = {
    "running": ("vllm:num_requests_running", "sglang:num_running_reqs", "hetserve_num_requests_running"),
    "waiting": ("vllm:num_requests_waiting", "sglang:num_queue_reqs", "hetserve_num_requests_waiting"),
}


@dataclass(eq=False)
class Backend:
    name: str  # the plan's instance name
    url: str  # base URL, no trailing slash
    role: str  # mixed, prefill or decode
    max_batch_size: int
    weight: float = 1.0
    in_flight: int = 0
    reported: int = 0  # running + waiting on the backend's own /metrics page (0: none read)
    healthy: bool = True
    last_error: str = ""
    ejected_at: float | None = None
    # Routable
    last_chosen: int = -1
    pools: list = field(default_factory=list)

    @property
    def speed(self) -> float:
        return self.weight

    def outstanding_work(self) -> float:
        return max(self.in_flight, self.reported) / self.weight

    def has_free_slot(self) -> bool:
        return self.in_flight < self.max_batch_size

    def eject(self, why: str) -> bool:
        """Mark the backend down; True if it was up."""
        was = self.healthy
        self.healthy, self.last_error = False, why
        if was:
            self.ejected_at = time.monotonic()
        return was

    def admit(self) -> bool:
        """Mark the backend up; True if it was down."""
        was = self.healthy
        self.healthy, self.last_error, self.ejected_at = True, "", None
        return not was


def parse_backend_flags(values: list[str]) -> dict[str, str]:
    """``["NAME=URL", ...]`` -> ``{NAME: URL}``, each URL an http(s) base URL without a trailing slash."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, url = value.partition("=")
        name, url = name.strip(), url.strip().rstrip("/")
        if not sep or not name or not url:
            raise HetserveError(f"--backend {value!r}: give NAME=URL, e.g. replica-0=http://127.0.0.1:8001")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise HetserveError(f"--backend {name}={url}: the URL must start with http:// or https://")
        if name in out:
            raise HetserveError(f"--backend {name}: given twice; one backend per instance of the plan")
        out[name] = url
    return out


def backends_for(plan: PlanFile, urls: dict[str, str], source: str = "the plan") -> list[Backend]:
    """One backend per instance of ``plan``, in the plan's order; every instance needs a URL and every
    URL an instance."""
    names = [i.name for i in plan.instances]
    unknown = [n for n in urls if n not in names]
    missing = [n for n in names if n not in urls]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not an instance of it")
        if missing:
            parts.append(f"no --backend for {', '.join(missing)}")
        raise HetserveError(
            f"--backend: {'; '.join(parts)}; {source} has instances {', '.join(names)} (give NAME=URL for each)"
        )
    weights = plan.routing.weights or {}
    return [_backend(inst, urls[inst.name], weights.get(inst.name)) for inst in plan.instances]


def _backend(inst: InstancePlan, url: str, weight: float | None) -> Backend:
    return Backend(
        name=inst.name,
        url=url,
        role=inst.role,
        max_batch_size=inst.max_batch_size,
        weight=weight if weight and weight > 0 else 1.0,
    )


def reported_load(samples: dict[str, float]) -> int:
    """Requests running plus waiting from a parsed /metrics page (``metrics.parse_prometheus``): the first
    name of ``LOAD_SAMPLES`` the page has for each, summed over its label sets."""
    total = 0.0
    for names in LOAD_SAMPLES.values():
        for name in names:
            found = [v for k, v in samples.items() if k == name or k.startswith(name + "{")]
            if found:
                total += sum(found)
                break
    return int(total)
