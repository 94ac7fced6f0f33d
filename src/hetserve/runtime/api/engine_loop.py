"""One background thread drives ``LLMEngine.step()`` for every client (continuous batching).

Request handlers run on the asyncio event loop. They never touch the engine: ``submit`` queues an
*add* command and awaits the engine thread's answer (the request id, or the engine's ValueError for a
request it refuses); outputs come back on the handler's ``asyncio.Queue`` as ``(index, RequestOutput)``
pairs, all outputs of a step in one hand-over per event loop. ``abort`` queues an *abort* command (a
client went away). Between two steps the thread applies every queued command, so a request that
arrives while a step runs joins the next one.

A request that fails gets ``(index, exception)`` on its queue, the exception's text being fit for its
client: the engine's own reason for a failed output (``RequestOutput.error``), or ``ENGINE_FAILED``
when ``step`` raised (that fails every request in flight; the traceback goes to the log, and the loop
carries on with the next requests).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from ..request import RequestOutput
from ..sampling import SamplingParams
from ..serving import ServingEngine
from .metrics import ServerMetrics

log = logging.getLogger("hetserve.serve")

ENGINE_FAILED = "the engine failed while generating (the server log has the details)"


@dataclass(eq=False)
class Tracked:
    """A submitted request as the engine thread follows it."""

    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    index: int  # the choice index within the HTTP request
    arrival: float  # time.perf_counter() when the HTTP request was accepted
    request_id: int | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: bool = False
    aborted: bool = False


class EngineLoop:
    def __init__(self, engine: ServingEngine, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.metrics = metrics or ServerMetrics(self.state, engine.cluster_stats)
        self._commands: deque = deque()
        self._wake = threading.Event()
        self._tracked: dict[int, Tracked] = {}
        self._submitted = 0  # written by the event loop only
        self._admitted = 0  # written by the engine thread only
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._last_stats = (0, 0)

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="hetserve-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def state(self) -> tuple[int, int, int, int]:
        """(waiting requests incl. not yet admitted, running requests, KV blocks used, KV blocks total)."""
        load = self.engine.load()
        pending = max(0, self._submitted - self._admitted)
        return load.waiting + pending, load.running, load.blocks_used, load.blocks_total

    # ---- called from the event loop ------------------------------------------------------------
    async def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        queue: asyncio.Queue,
        index: int,
        arrival: float,
    ) -> Tracked:
        """Queue a request; returns once the engine has accepted it (raises its ValueError if not)."""
        if not self.alive:
            raise RuntimeError("the engine loop is not running")
        tracked = Tracked(queue, asyncio.get_running_loop(), index, arrival)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._submitted += 1
        self._commands.append(("add", list(prompt_ids), params, tracked, future))
        self._wake.set()
        self.engine.wake()  # an engine waiting on its workers takes it in now
        await asyncio.wrap_future(future)
        return tracked

    def abort(self, tracked: Tracked) -> None:
        """Stop generating for ``tracked`` (no-op once it finished)."""
        if not tracked.finished and not tracked.aborted:
            tracked.aborted = True
            self._commands.append(("abort", tracked))
            self._wake.set()

    # ---- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            self._apply_commands()
            if not self.engine.has_unfinished_requests():
                self._wake.wait(timeout=1.0)
                continue
            try:
                outputs = self.engine.step()
            except Exception:
                log.exception("engine step failed; failing the %d requests in flight", len(self._tracked))
                self._fail_all(RuntimeError(ENGINE_FAILED))
                self._wake.wait(timeout=0.1)  # an engine that keeps failing is not spun on
                continue
            self._deliver(outputs)
        self._fail_all(RuntimeError("the server is shutting down"))

    def _apply_commands(self) -> None:
        while self._commands:
            command = self._commands.popleft()
            if command[0] == "abort":
                tracked = command[1]
                if tracked.request_id is not None and tracked.request_id in self._tracked:
                    self.engine.abort_request(tracked.request_id)
                    del self._tracked[tracked.request_id]
                    with self.metrics.lock:
                        self.metrics.finished.inc(1, "abort")
                continue
            _, prompt_ids, params, tracked, future = command
            self._admitted += 1
            if not future.set_running_or_notify_cancel():  # the client left before it was queued
                continue
            try:
                request_id = self.engine.add_request(prompt_ids, params)
            except (ValueError, RuntimeError) as exc:  # refused (400) / cannot serve now (503)
                future.set_exception(exc)
                continue
            except Exception:  # a bug: logged, the client gets a plain 500
                log.exception("the engine could not take a request")
                future.set_exception(_InternalError(ENGINE_FAILED))
                continue
            tracked.request_id = request_id
            if tracked.aborted:  # aborted while its add command was queued
                self.engine.abort_request(request_id)
                with self.metrics.lock:
                    self.metrics.finished.inc(1, "abort")
            else:
                self._tracked[request_id] = tracked
                with self.metrics.lock:
                    self.metrics.prompt_tokens.inc(len(prompt_ids))
            future.set_result(request_id)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.perf_counter()
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        m = self.metrics
        load = self.engine.load()
        with m.lock:
            m.steps.inc(load.steps - self._last_stats[0])
            m.prefix_hits.inc(load.prefix_hit_tokens - self._last_stats[1])
            self._last_stats = (load.steps, load.prefix_hit_tokens)
            for out in outputs:
                t = self._tracked.get(out.request_id)
                if t is None:
                    continue
                if out.error is not None:  # no instance left to serve it
                    t.finished = True
                    del self._tracked[out.request_id]
                    m.finished.inc(1, "abort")
                    by_loop[t.loop].append((t.queue, (t.index, RuntimeError(out.error))))
                    continue
                if t.first_token is None:
                    t.first_token = now
                    m.ttft.observe(now - t.arrival)
                else:
                    m.tpot.observe(now - t.last_token)
                t.last_token = now
                m.generation_tokens.inc(len(out.new_token_ids))
                if out.finished:
                    t.finished = True
                    del self._tracked[out.request_id]
                    m.e2e.observe(now - t.arrival)
                    m.finished.inc(1, out.finish_reason or "stop")
                by_loop[t.loop].append((t.queue, (t.index, out)))
        for loop, items in by_loop.items():
            _hand_over(loop, items)

    def _fail_all(self, exc: BaseException) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for request_id, t in list(self._tracked.items()):
            try:
                self.engine.abort_request(request_id)
            except Exception:
                log.exception("could not abort request %d", request_id)
            t.finished = True
            by_loop[t.loop].append((t.queue, (t.index, exc)))
        self._tracked.clear()
        with self.metrics.lock:
            self.metrics.finished.inc(sum(len(v) for v in by_loop.values()), "abort")
        for loop, items in by_loop.items():
            _hand_over(loop, items)


class _InternalError(Exception):
    pass


def _put_all(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _hand_over(loop: asyncio.AbstractEventLoop, items: list) -> None:
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:  # that event loop is closed: nobody is listening any more
        pass
