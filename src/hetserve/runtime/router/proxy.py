"""Forwarding a request to the plan's backends: the choice, retries, streaming and P/D's two steps.

A request goes to an entry backend (mixed or prefill) chosen by the plan's routing policy. When the
backend cannot take it before any token has reached the client (the connection fails, it answers 5xx,
or its stream ends before a token), the router tries another backend of the same role, at most
``retries`` more times; a backend whose connection failed is ejected. Once a token has been sent, a
failure ends the stream with an OpenAI-style error event (``data: {"error": ...}``) and ``[DONE]``.
A backend's 4xx answer is the client's mistake and is passed back as it is.

Plans with prefill instances are served in two steps, as vLLM's disaggregated serving expects (the
proxy of its NIXL disaggregated-serving example): the request goes to a prefill backend with
``max_tokens: 1``, ``stream: false`` and ``kv_transfer_params: {"do_remote_decode": true, ...}``; the
``kv_transfer_params`` of its answer are added to the original request, which goes to a decode backend
chosen by the plan's hand-off policy for that prefill instance (``routing.handoff`` and
``handoff_weights``). A backend without a KV connector (``hetserve serve --model``) ignores the field
and computes the prompt again.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import httpx

from ...plan import PlanFile
from ...scheduling.routing import RoutingPolicy, make_policy
from ..api.protocol import APIError
from .backends import Backend
from .stats import RouterStats

#: What a prefill request asks of a vLLM prefill instance with a NIXL connector.
PREFILL_KV_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


class Retry(Exception):
    """The backend did not take the request and nothing reached the client: try another."""


@dataclass
class Answer:
    """What goes back to the client: a whole body, or a stream (``first``: the events read before the
    first token, ``rest``: the remainder)."""

    status: int
    body: bytes = b""
    first: list[bytes] | None = None
    rest: AsyncIterator[bytes] | None = None
    #: Ends a stream's upstream response and frees its backend (idempotent; the server calls it however
    #: the response ends, the client's disconnect included).
    close: Callable[[], Awaitable[None]] | None = None


class Router:
    def __init__(
        self,
        plan: PlanFile,
        backends: list[Backend],
        client: httpx.AsyncClient,
        *,
        retries: int = 2,
        queue_timeout: float = 30.0,
        stats: RouterStats,
    ):
        self.plan, self.backends, self.client = plan, backends, client
        self.retries, self.queue_timeout = retries, queue_timeout
        self.stats = stats
        self.entry = [b for b in backends if b.role in ("mixed", "prefill")]
        self.decode = [b for b in backends if b.role == "decode"]
        self.two_step = any(b.role == "prefill" for b in backends)
        routing = plan.routing
        self.policy = make_policy(routing.policy, routing.weights)
        self.handoff: dict[str, RoutingPolicy] = {
            b.name: make_policy(
                routing.handoff
                if routing.handoff != "weighted" or b.name in routing.handoff_weights
                else "least-work",
                routing.handoff_weights.get(b.name),
            )
            for b in backends
            if b.role == "prefill"
        }
        self._freed = asyncio.Condition()

    # ---- choosing --------------------------------------------------------------------------------------
    async def pick(
        self, candidates: Sequence[Backend], policy: RoutingPolicy, tried: set[str]
    ) -> Backend | None:
        """The policy's choice among the healthy candidates not yet tried; a queueing policy (JFFC) waits
        up to ``queue_timeout`` for a free slot. None: no candidate."""
        deadline = time.monotonic() + self.queue_timeout
        async with self._freed:
            while True:
                live = [b for b in candidates if b.healthy and b.name not in tried]
                if not live:
                    return None
                chosen = policy.choose(live)
                if chosen is not None:
                    chosen.in_flight += 1
                    return chosen
                left = deadline - time.monotonic()
                if left <= 0:
                    raise APIError(
                        503, "every instance is busy; try again later", type="server_error", code="overloaded"
                    )
                try:
                    await asyncio.wait_for(self._freed.wait(), left)
                except asyncio.TimeoutError:
                    pass

    async def release(self, backend: Backend) -> None:
        backend.in_flight -= 1
        async with self._freed:
            self._freed.notify_all()

    def _failed(self, backend: Backend, why: str, eject: bool) -> None:
        backend.last_error = why
        self.stats.failure(backend)
        if eject and backend.eject(why):
            self.stats.ejected(backend)

    # ---- one request -----------------------------------------------------------------------------------
    async def handle(self, path: str, body: dict) -> Answer:
        if self.two_step:
            prefill, kv = await self._prefill(path, body)
            decode_body = dict(body)
            if kv is not None:
                decode_body["kv_transfer_params"] = kv
            return await self._with_retries(
                path, decode_body, self.decode, self.handoff[prefill.name], "decode"
            )
        return await self._with_retries(path, body, self.entry, self.policy, "entry")

    async def _prefill(self, path: str, body: dict) -> tuple[Backend, dict | None]:
        req = {k: v for k, v in body.items() if k != "stream_options"}
        req.update(stream=False, max_tokens=1, kv_transfer_params=dict(PREFILL_KV_PARAMS))
        if "max_completion_tokens" in req:
            req["max_completion_tokens"] = 1
        tried: set[str] = set()
        errors: list[str] = []
        for _ in range(1 + self.retries):
            backend = await self.pick(self.entry, self.policy, tried)
            if backend is None:
                break
            tried.add(backend.name)
            try:
                answer = await self._whole(backend, path, req)
            except Retry as exc:
                errors.append(f"{backend.name}: {exc}")
                self._count_retry()
                continue
            finally:
                await self.release(backend)
            if answer.status != 200:
                raise _passed_on(answer)
            try:
                kv = json.loads(answer.body).get("kv_transfer_params")
            except (ValueError, AttributeError):
                kv = None
            return backend, kv if isinstance(kv, dict) else None
        raise _none_took("prefill", errors, self.entry)

    async def _with_retries(
        self, path: str, body: dict, candidates: list[Backend], policy: RoutingPolicy, what: str
    ) -> Answer:
        tried: set[str] = set()
        errors: list[str] = []
        for _ in range(1 + self.retries):
            backend = await self.pick(candidates, policy, tried)
            if backend is None:
                break
            tried.add(backend.name)
            self.stats.sent(backend)
            try:
                if body.get("stream"):
                    return await self._stream(backend, path, body)  # releases when the stream ends
                try:
                    return await self._whole(backend, path, body)
                finally:
                    await self.release(backend)
            except Retry as exc:
                errors.append(f"{backend.name}: {exc}")
                self._count_retry()
        raise _none_took(what, errors, candidates)

    def _count_retry(self) -> None:
        self.stats.retried()

    async def _whole(self, backend: Backend, path: str, body: dict) -> Answer:
        try:
            resp = await self.client.post(backend.url + path, json=body)
        except httpx.TransportError as exc:
            self._failed(backend, _describe(exc), eject=True)
            raise Retry(_describe(exc)) from None
        if resp.status_code >= 500:
            self._failed(backend, f"HTTP {resp.status_code}", eject=False)
            raise Retry(f"HTTP {resp.status_code}")
        return Answer(resp.status_code, resp.content)

    async def _stream(self, backend: Backend, path: str, body: dict) -> Answer:
        """Open the backend's stream and read it up to the first token; the rest is relayed by the
        answer's ``rest``, which releases the backend when it ends."""
        handed_over = False
        resp = None
        try:
            try:
                resp = await self.client.send(
                    self.client.build_request("POST", backend.url + path, json=body), stream=True
                )
            except httpx.TransportError as exc:
                self._failed(backend, _describe(exc), eject=True)
                raise Retry(_describe(exc)) from None
            if resp.status_code != 200:
                raw = await resp.aread()
                if resp.status_code >= 500:
                    self._failed(backend, f"HTTP {resp.status_code}", eject=False)
                    raise Retry(f"HTTP {resp.status_code}")
                return Answer(resp.status_code, raw)
            lines = resp.aiter_lines()
            first: list[bytes] = []
            try:
                async for line in lines:
                    first.append(line.encode() + b"\n")
                    if _carries_token(line):
                        break
                else:
                    raise Retry("the stream ended before a token")
            except httpx.TransportError as exc:
                self._failed(backend, _describe(exc), eject=True)
                raise Retry(f"the stream broke before a token ({_describe(exc)})") from None
            handed_over = True
            done = False

            async def close() -> None:
                nonlocal done
                if not done:
                    done = True
                    await resp.aclose()
                    await self.release(backend)

            return Answer(200, first=first, rest=self._relay(backend, lines), close=close)
        finally:
            if not handed_over:
                if resp is not None:
                    await resp.aclose()
                await self.release(backend)

    async def _relay(self, backend: Backend, lines: AsyncIterator[str]) -> AsyncIterator[bytes]:
        try:
            async for line in lines:
                yield line.encode() + b"\n"
        except httpx.TransportError as exc:
            self._failed(backend, _describe(exc), eject=True)
            error = APIError(
                502, f"the backend {backend.name} failed mid-stream: {_describe(exc)}", type="server_error"
            )
            yield b"data: " + json.dumps(error.body()).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"


def _carries_token(line: str) -> bool:
    """Whether an SSE line is a token (text or content in a choice) or the end of the stream."""
    if not line.startswith("data:"):
        return False
    data = line[5:].strip()
    if data == "[DONE]":
        return True
    try:
        event = json.loads(data)
    except ValueError:
        return False
    if not isinstance(event, dict):
        return False
    if "error" in event:
        return True
    for choice in event.get("choices") or ():
        if isinstance(choice, dict) and (
            choice.get("text") or (choice.get("delta") or {}).get("content") or choice.get("finish_reason")
        ):
            return True
    return False


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _passed_on(answer: Answer) -> APIError:
    """A prefill backend's refusal (4xx) given to the client as the backend worded it."""
    try:
        err = json.loads(answer.body)["error"]
        return APIError(answer.status, str(err.get("message")), param=err.get("param"), code=err.get("code"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return APIError(answer.status, answer.body.decode(errors="replace")[:500])


def _none_took(what: str, errors: list[str], candidates: Sequence[Backend]) -> APIError:
    down = [f"{b.name} ({b.last_error or 'ejected'})" for b in candidates if not b.healthy]
    detail = "; ".join(errors) if errors else "every one is ejected: " + ", ".join(down)
    return APIError(
        503, f"no {what} backend took the request: {detail}", type="server_error", code="unavailable"
    )
