"""The router's HTTP server: the OpenAI routes it forwards, its health, its metrics, its health checks.

- ``POST /v1/completions``, ``POST /v1/chat/completions``: forwarded (``proxy.Router``); streams are
  relayed event by event.
- ``GET /v1/models``: an entry backend's list (the first healthy one that answers).
- ``GET /health``: 200 while a request can be served (an entry backend up and, for a P/D plan, a decode
  backend up), else 503 naming the backends down and why.
- ``GET /metrics``: the router's own counters and gauges, Prometheus text format.

A background task checks every backend each ``health_interval`` seconds (``GET /health``, then
``/metrics`` for its load): a failed check ejects it, a passing one re-admits it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ...plan import PlanFile
from ..api.guard import Guard
from ..api.limits import Access, ServerLimits
from ..api.metrics import CONTENT_TYPE, parse_prometheus
from ..api.protocol import APIError
from ..api.server import read_body
from .backends import Backend, reported_load
from .proxy import Answer, Router
from .stats import RouterStats


@dataclass(frozen=True)
class RouterSettings:
    retries: int = 2  # more backends a request may be tried on before any token was sent
    health_interval: float = 2.0  # seconds between a backend's health checks
    check_timeout: float = 2.0  # seconds a health check may take
    connect_timeout: float = 5.0  # seconds to connect to a backend
    request_timeout: float = 600.0  # seconds without a byte from a backend before it counts as failed
    queue_timeout: float = 30.0  # seconds a request may wait for a free slot (JFFC)
    max_connections: int = 256  # open connections to all backends together

    def __post_init__(self) -> None:
        if not 0 <= self.retries <= 16:
            raise ValueError("retries must be from 0 to 16")
        for name in (
            "health_interval",
            "check_timeout",
            "connect_timeout",
            "request_timeout",
            "queue_timeout",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be greater than 0")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")


def create_router_app(
    plan: PlanFile,
    backends: list[Backend],
    settings: RouterSettings | None = None,
    limits: ServerLimits | None = None,
    access: Access | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    """The router for ``plan`` over ``backends`` (one per instance). ``transport``: for tests."""
    settings, limits, access = settings or RouterSettings(), limits or ServerLimits(), access or Access()
    stats = RouterStats(backends)
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.request_timeout, connect=settings.connect_timeout),
            limits=httpx.Limits(max_connections=settings.max_connections, max_keepalive_connections=64),
            transport=transport,
        )
        state["router"] = Router(
            plan,
            backends,
            client,
            retries=settings.retries,
            queue_timeout=settings.queue_timeout,
            stats=stats,
        )
        checks = asyncio.create_task(_check_forever(backends, client, settings, stats))
        try:
            yield
        finally:
            checks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checks
            await client.aclose()

    app = FastAPI(title="hetserve router", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.limits = limits
    app.add_middleware(Guard, access=access)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def forward(request: Request, path: str) -> Response:
        raw = await read_body(request, limits)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            answer = await state["router"].handle(path, body)
        except APIError as exc:
            if exc.status == 503:
                stats.rejected.inc()
            raise
        return _response(answer)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await forward(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await forward(request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models():
        router: Router = state["router"]
        for b in router.entry:
            if not b.healthy:
                continue
            try:
                resp = await router.client.get(b.url + "/v1/models", timeout=settings.check_timeout)
            except httpx.TransportError:
                continue
            if resp.status_code == 200:
                return Response(resp.content, media_type="application/json")
        raise APIError(
            503, "no entry backend is up to list its models", type="server_error", code="unavailable"
        )

    @app.get("/health")
    async def health():
        router: Router = state["router"]
        needed = [("entry", router.entry)] + ([("decode", router.decode)] if router.two_step else [])
        down = [b for b in backends if not b.healthy]
        missing = [role for role, group in needed if not any(b.healthy for b in group)]
        body = {
            "status": "ok" if not missing else "unavailable",
            "backends": {
                b.name: {"url": b.url, "role": b.role, "up": b.healthy, "in_flight": b.in_flight}
                for b in backends
            },
        }
        if down:
            body["down"] = {b.name: b.last_error or "ejected" for b in down}
        if missing:
            body["message"] = f"no {' or '.join(missing)} backend is up: " + ", ".join(
                f"{b.name} ({b.last_error or 'ejected'})" for b in down
            )
        return JSONResponse(body, status_code=503 if missing else 200)

    @app.get("/metrics")
    async def metrics():
        return Response(stats.render(), media_type=CONTENT_TYPE)

    return app


class _Relay(StreamingResponse):
    """A relayed stream whose upstream is closed and whose backend is freed however the response ends
    (a client that goes away cancels the response before its body is read to the end)."""

    def __init__(self, answer: Answer):
        async def body():
            for chunk in answer.first or ():
                yield chunk
            async for chunk in answer.rest:
                yield chunk

        super().__init__(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.answer = answer

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.answer.close()


def _response(answer: Answer) -> Response:
    if answer.rest is not None:
        return _Relay(answer)
    return Response(answer.body, status_code=answer.status, media_type="application/json")


async def _check_forever(
    backends, client: httpx.AsyncClient, settings: RouterSettings, stats: RouterStats
) -> None:
    while True:
        await asyncio.gather(*(check_backend(b, client, settings.check_timeout, stats) for b in backends))
        await asyncio.sleep(settings.health_interval)


async def check_backend(
    b: Backend, client: httpx.AsyncClient, timeout: float, stats: RouterStats | None = None
) -> None:
    """One health check: ``GET /health`` (200: up), then the load on its ``/metrics`` page if it has one."""
    try:
        resp = await client.get(b.url + "/health", timeout=timeout)
        ok, why = resp.status_code == 200, f"health check: HTTP {resp.status_code}"
    except httpx.TransportError as exc:
        ok, why = False, f"health check: {type(exc).__name__}"
    if not ok:
        if b.eject(why) and stats is not None:
            stats.ejected(b)
        return
    b.admit()
    try:
        page = await client.get(b.url + "/metrics", timeout=timeout)
        b.reported = reported_load(parse_prometheus(page.text)) if page.status_code == 200 else 0
    except (httpx.TransportError, ValueError):
        b.reported = 0
