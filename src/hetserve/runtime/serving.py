"""What the API server asks of an engine, and the figures an engine reports about itself.

``LLMEngine`` (one model in this process) and ``ClusterEngine`` (a plan's instances over worker
processes) both satisfy ``ServingEngine``: the API server, its engine loop and /metrics use nothing
else, so either can be served without probing which one it is.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .request import RequestOutput
from .sampling import SamplingParams


@dataclass(frozen=True)
class EngineLoad:
    """What /metrics reports about an engine (one instance, or all of a plan's together)."""

    waiting: int
    running: int
    blocks_used: int
    blocks_total: int
    steps: int
    prefix_hit_tokens: int


@dataclass(frozen=True)
class InstanceStats:
    name: str
    role: str
    up: bool  # every worker of the instance is alive
    load: EngineLoad


@dataclass(frozen=True)
class WorkerStats:
    rank: int
    server: str
    tp_rank: int
    up: bool
    steps: int  # micro-batches that passed through the worker


@dataclass(frozen=True)
class ClusterStats:
    """Per instance and per worker, for an engine that serves a plan over worker processes."""

    instances: tuple[InstanceStats, ...]
    workers: tuple[WorkerStats, ...]
    kv_handoff_bytes: int  # KV bytes handed from prefill to decode workers


@runtime_checkable
class ServingEngine(Protocol):
    #: Longest prompt + output a request may have, in tokens.
    max_model_len: int
    #: Encodes text prompts (None: the engine takes token ids only).
    tokenizer: object | None

    @property
    def vocab_size(self) -> int: ...

    def add_request(self, prompt: str | Seq[int], params: SamplingParams | None = None) -> int:
        """Queue a prompt (text or token ids); its request id. ValueError for a prompt it cannot take."""
        ...

    def abort_request(self, request_id: int) -> None:
        """Forget a request (unknown or finished ids are ignored)."""
        ...

    def has_unfinished_requests(self) -> bool: ...

    def step(self) -> list[RequestOutput]:
        """Make progress; an output for every request that produced a token (or failed)."""
        ...

    def wake(self) -> None:
        """Return from a ``step`` that waits (a request arrived that idle capacity may take now)."""
        ...

    def load(self) -> EngineLoad: ...

    def cluster_stats(self) -> ClusterStats | None:
        """Per-instance and per-worker figures (None: the engine is one model in this process)."""
        ...

    def shutdown(self) -> None: ...
