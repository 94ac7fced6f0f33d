"""The OpenAI-compatible HTTP server: FastAPI routes over one ``EngineLoop``.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with SSE
streaming), ``GET /health``, ``GET /metrics`` (Prometheus text) and ``GET /openapi.json``. Every request
first passes ``guard.Guard`` (Host header, API key, content type, declared size); a generation request's
body is read within ``ServerLimits``' size and time, then decoded, validated (``protocol``), checked
against the limits and the context and tokenised on a worker thread, so a large prompt never holds up
the event loop; only then does it reach the engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..request import RequestOutput
from ..sampling import SamplingParams
from ..serving import ServingEngine
from .engine_loop import ENGINE_FAILED, EngineLoop, Tracked
from .guard import Guard
from .limits import Access, ServerLimits, uvicorn_config
from .metrics import CONTENT_TYPE
from .openapi import install_openapi
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_body

log = logging.getLogger("hetserve.serve")


@dataclass
class _Prompt:
    ids: list[int]
    params: SamplingParams


@dataclass
class _Context:
    """What the request handlers share."""

    engine: ServingEngine
    loop: EngineLoop
    served: str
    limits: ServerLimits
    executor: ThreadPoolExecutor | None = None  # while the app runs

    async def off_loop(self, fn: Callable, *args):
        """``fn(*args)`` on a worker thread (decoding, validating and tokenising a request)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


def create_app(
    engine: ServingEngine,
    model_name: str,
    limits: ServerLimits | None = None,
    access: Access | None = None,
) -> FastAPI:
    """An app serving ``engine`` under ``model_name``; the engine thread runs while the app is up.
    ``limits`` bound what a request may ask; ``access`` says who may ask (default: no API key, local
    Host names)."""
    limits, access = limits or ServerLimits(), access or Access()
    loop = EngineLoop(engine)
    ctx = _Context(engine, loop, model_name, limits)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hetserve-prepare")
        loop.start()
        try:
            yield
        finally:
            loop.stop()
            ctx.executor.shutdown(wait=False, cancel_futures=True)
            ctx.executor = None

    app = FastAPI(
        title="hetserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json"
    )
    app.state.engine_loop = loop
    app.state.model_name = model_name
    app.state.limits = limits
    app.add_middleware(Guard, access=access)

    # ---- errors ---------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            kind, message = "not_found_error", f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            kind = "invalid_request_error"
            message = f"method {request.method} is not allowed on {request.url.path}; use {allowed}"
        else:
            kind, message = "invalid_request_error", str(exc.detail)
        return JSONResponse(
            APIError(exc.status_code, message, type=kind).body(),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse(APIError(400, "the request does not match this route").body(), status_code=400)

    # ---- plain endpoints ------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not loop.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        stats = engine.cluster_stats()
        if stats is not None and not any(i.up and i.role != "decode" for i in stats.instances):
            down = [i.name for i in stats.instances if not i.up]
            workers = [w.rank for w in stats.workers if not w.up]
            return JSONResponse(
                {"status": "no instance is up to take requests", "down": down, "workers_down": workers},
                status_code=503,
            )
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(loop.metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict[str, Any]:
        return {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "hetserve",
            "max_model_len": engine.max_model_len,
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_name:
            raise _unknown_model(name, model_name)
        return model_card()

    # ---- generation -----------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _counted(loop, "completions", _completions(request, ctx))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _counted(loop, "chat_completions", _chat(request, ctx))

    install_openapi(app, access, model_name)
    return app


async def _counted(loop: EngineLoop, endpoint: str, handler):
    status = 500
    try:
        response = await handler
        status = response.status_code
        return response
    except APIError as exc:
        status = exc.status
        raise
    finally:
        with loop.metrics.lock:
            loop.metrics.requests.inc(1, endpoint, str(status))


def _unknown_model(name: str, served: str) -> APIError:
    shown = name if len(name) <= 100 else name[:100] + "..."
    return APIError(
        404,
        f"model '{shown}' does not exist; this server serves '{served}' (see GET /v1/models)",
        param="model",
        code="model_not_found",
    )


def _check_model(name: str, served: str) -> None:
    if name != served:
        raise _unknown_model(name, served)


async def read_body(request: Request, limits: ServerLimits) -> bytes:
    """The JSON request body, refused when it is not sent as ``application/json`` (415: a web page can
    send ``text/plain`` or form bodies to another site without the browser asking that site first, but
    not JSON), is larger than ``max_body_bytes`` (413) or has not all arrived within ``body_timeout``
    seconds (408, closing the connection). After a 413 uvicorn discards the rest of the body as it
    arrives, within the header timeout, and the connection stays open."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise APIError(
            415,
            "the request body must be JSON, sent with the header 'Content-Type: application/json'"
            + (f" (got {media[:60]!r})" if media else ""),
            code="unsupported_media_type",
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise _too_large(limits)

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise _too_large(limits)
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), limits.body_timeout)
    except asyncio.TimeoutError:
        raise APIError(
            408,
            f"the request body did not arrive within {limits.body_timeout:g} s",
            code="request_timeout",
            headers={"Connection": "close"},
        ) from None
    except ClientDisconnect:
        raise APIError(499, "client disconnected") from None


def _too_large(limits: ServerLimits) -> APIError:
    return APIError(
        413,
        f"the request body is larger than this server's limit of {limits.max_body_bytes} bytes",
        code="body_too_large",
    )


def _check_prompt_chars(chars: int, limits: ServerLimits, param: str) -> None:
    if chars > limits.max_prompt_chars:
        raise APIError(
            400,
            f"{param}: {chars} characters of prompt text in one request; this server takes at most "
            f"{limits.max_prompt_chars}",
            param=param,
            code="prompt_too_long",
        )


def _check_stop_token_ids(req, vocab: int) -> None:
    for i, t in enumerate(req.stop_token_ids or []):
        if not 0 <= t < vocab:
            raise APIError(
                400, f"stop_token_ids.{i}: token ids must be in [0, {vocab})", param=f"stop_token_ids.{i}"
            )


def _sampling(
    req, prompt_len: int, max_model_len: int, default_max: int | None, param: str
) -> SamplingParams:
    """SamplingParams for one prompt, with the context limits checked."""
    if prompt_len >= max_model_len:
        raise APIError(
            400,
            f"the {param} has {prompt_len} tokens but this model's context is {max_model_len} "
            f"tokens (at most {max_model_len - 1} for the prompt, leaving one to generate); "
            f"shorten it",
            param=param,
            code="context_length_exceeded",
        )
    limit = req.output_limit if isinstance(req, ChatCompletionRequest) else req.max_tokens
    room = max_model_len - prompt_len
    if limit is None:
        limit = min(default_max, room) if default_max else room
    elif prompt_len + limit > max_model_len:
        name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        raise APIError(
            400,
            f"this model's context is {max_model_len} tokens, but {prompt_len} prompt tokens + "
            f"{name}={limit} would need {prompt_len + limit}; lower {name} to at most {room}",
            param=name,
            code="context_length_exceeded",
        )
    try:
        return SamplingParams(
            max_tokens=limit,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=req.seed,
            stop=req.stop_list,
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
        )
    except ValueError as exc:
        raise APIError(400, str(exc)) from None


def _prepare_completion(ctx: _Context, raw: bytes) -> tuple[CompletionRequest, list[_Prompt]]:
    """Decode, validate, check and tokenise a completion request (on a worker thread)."""
    engine, limits = ctx.engine, ctx.limits
    req: CompletionRequest = parse_body(raw, CompletionRequest)
    _check_model(req.model, ctx.served)
    if isinstance(req.prompt, str):
        texts: list[Any] = [req.prompt]
    elif req.prompt and isinstance(req.prompt[0], int):
        texts = [req.prompt]
    else:
        texts = list(req.prompt)
    if len(texts) > limits.max_prompts_per_request:
        raise APIError(
            400,
            f"prompt: {len(texts)} prompts in one request; this server takes at most "
            f"{limits.max_prompts_per_request} (send several requests)",
            param="prompt",
            code="too_many_prompts",
        )
    _check_prompt_chars(sum(len(p) for p in texts if isinstance(p, str)), limits, "prompt")
    vocab = engine.vocab_size
    _check_stop_token_ids(req, vocab)
    prompts = []
    for i, p in enumerate(texts):
        param = "prompt" if len(texts) == 1 else f"prompt.{i}"
        if isinstance(p, str):
            if engine.tokenizer is None:
                raise APIError(400, "this model has no tokenizer; send token ids", param="prompt")
            ids = engine.tokenizer.encode(p)
        else:
            ids = list(p)
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"{param}: token ids must be in [0, {vocab})", param=param)
        if not ids:
            raise APIError(400, f"{param}: the prompt is empty", param=param)
        prompts.append(_Prompt(ids, _sampling(req, len(ids), engine.max_model_len, 16, param)))
    return req, prompts


def _prepare_chat(ctx: _Context, raw: bytes) -> tuple[ChatCompletionRequest, list[_Prompt]]:
    """Decode, validate, check, render and tokenise a chat request (on a worker thread)."""
    engine, limits = ctx.engine, ctx.limits
    req: ChatCompletionRequest = parse_body(raw, ChatCompletionRequest)
    _check_model(req.model, ctx.served)
    tok = engine.tokenizer
    if tok is None or not tok.chat_template:
        raise APIError(
            400, f"model '{ctx.served}' has no chat template; use /v1/completions", param="messages"
        )
    if len(req.messages) > engine.max_model_len:
        raise APIError(
            400,
            f"messages: {len(req.messages)} messages cannot fit in this model's context of "
            f"{engine.max_model_len} tokens",
            param="messages",
            code="context_length_exceeded",
        )
    messages = [m.as_template_input() for m in req.messages]
    chars = sum(len(v) for m in messages for v in m.values() if isinstance(v, str))
    _check_prompt_chars(chars, limits, "messages")
    _check_stop_token_ids(req, engine.vocab_size)
    try:
        ids = tok.encode_chat(messages)
    except ValueError as exc:  # the template refused the conversation (e.g. roles out of order)
        raise APIError(400, f"messages: {exc}", param="messages") from None
    default = limits.default_max_tokens
    return req, [_Prompt(ids, _sampling(req, len(ids), engine.max_model_len, default, "messages"))]


async def _completions(request: Request, ctx: _Context):
    raw = await read_body(request, ctx.limits)
    req, prompts = await ctx.off_loop(_prepare_completion, ctx, raw)
    served = ctx.served
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    base = {"id": rid, "object": "text_completion", "created": created, "model": served}

    def chunk(index: int, out: RequestOutput | None, text: str, finish: str | None) -> dict:
        return {
            **base,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}],
        }

    def full(outs: list[RequestOutput]) -> dict:
        return {
            **base,
            "choices": [
                {"index": i, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason}
                for i, o in enumerate(outs)
            ],
            "usage": _usage(prompts, outs),
        }

    return await _run(request, ctx.loop, req, prompts, chunk, full, first_delta=None)


async def _chat(request: Request, ctx: _Context):
    raw = await read_body(request, ctx.limits)
    req, prompts = await ctx.off_loop(_prepare_chat, ctx, raw)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": ctx.served}

    def chunk(index: int, out: RequestOutput | None, text: str, finish: str | None) -> dict:
        delta = {"content": text} if text or finish is None else {}
        if out is None:
            delta = {"role": "assistant", "content": ""}
        return {
            **base,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    def full(outs: list[RequestOutput]) -> dict:
        (o,) = outs
        return {
            **base,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": o.text},
                    "logprobs": None,
                    "finish_reason": o.finish_reason,
                }
            ],
            "usage": _usage(prompts, outs),
        }

    return await _run(request, ctx.loop, req, prompts, chunk, full, first_delta=True)


def _usage(prompts: list[_Prompt], outs: list[RequestOutput]) -> dict[str, int]:
    p = sum(len(x.ids) for x in prompts)
    c = sum(len(o.token_ids) for o in outs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _submit_all(
    loop: EngineLoop, prompts: list[_Prompt], queue: asyncio.Queue, param: str
) -> list[Tracked]:
    arrival = time.perf_counter()
    tracked: list[Tracked] = []
    try:
        for i, p in enumerate(prompts):
            tracked.append(await loop.submit(p.ids, p.params, queue, i, arrival))
    except BaseException as exc:
        for t in tracked:
            loop.abort(t)
        if isinstance(exc, ValueError):  # the engine refused it (e.g. more KV than the whole cache)
            where = param if len(prompts) == 1 else f"{param}.{len(tracked)}"
            raise APIError(400, str(exc), param=where) from None
        if isinstance(exc, RuntimeError):  # no instance up, or the engine loop stopped
            raise APIError(503, str(exc), type="server_error", code="engine_unavailable") from None
        if isinstance(exc, Exception):
            raise APIError(500, ENGINE_FAILED, type="server_error") from None
        raise
    return tracked


async def _events(queue: asyncio.Queue, n: int) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of ``n`` engine requests until all have finished; raises the engine's error if one fails."""
    done = 0
    while done < n:
        index, item = await queue.get()
        if isinstance(item, BaseException):
            raise APIError(500, f"generation failed: {item}", type="server_error") from item
        if item.finished:
            done += 1
        yield index, item


async def _run(
    request: Request,
    loop: EngineLoop,
    req,
    prompts: list[_Prompt],
    chunk: Callable,
    full: Callable,
    first_delta: bool | None,
):
    queue: asyncio.Queue = asyncio.Queue()
    tracked = await _submit_all(loop, prompts, queue, "messages" if first_delta else "prompt")
    if req.stream:
        return StreamingResponse(
            _stream(loop, req, prompts, tracked, queue, chunk, first_delta),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    collector = asyncio.ensure_future(_collect(queue, len(prompts)))
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not collector.done():  # the client went away: stop generating for it
            collector.cancel()
            for t in tracked:
                loop.abort(t)
            return JSONResponse(APIError(499, "client disconnected").body(), status_code=499)
        return JSONResponse(full(collector.result()))
    finally:
        watcher.cancel()
        if not collector.done():
            collector.cancel()
        for t in tracked:
            loop.abort(t)


async def _collect(queue: asyncio.Queue, n: int) -> list[RequestOutput]:
    final: dict[int, RequestOutput] = {}
    async for index, out in _events(queue, n):
        if out.finished:
            final[index] = out
    return [final[i] for i in range(n)]


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def _stream(
    loop: EngineLoop,
    req,
    prompts: list[_Prompt],
    tracked: list[Tracked],
    queue: asyncio.Queue,
    chunk: Callable,
    first_delta: bool | None,
) -> AsyncIterator[bytes]:
    usage = req.include_usage
    outs: dict[int, RequestOutput] = {}

    def event(index: int, out: RequestOutput | None, text: str, finish: str | None) -> bytes:
        body = chunk(index, out, text, finish)
        if usage:
            body["usage"] = None
        return _sse(body)

    try:
        if first_delta:
            for i in range(len(prompts)):
                yield event(i, None, "", None)
        try:
            async for index, out in _events(queue, len(prompts)):
                if out.new_text:
                    yield event(index, out, out.new_text, None)
                if out.finished:
                    outs[index] = out
                    yield event(index, out, "", out.finish_reason)
        except APIError as exc:
            yield _sse(exc.body())
            yield b"data: [DONE]\n\n"
            return
        if usage:
            final = chunk(0, None, "", None)
            final["choices"] = []
            final["usage"] = _usage(prompts, [outs[i] for i in range(len(prompts))])
            yield _sse(final)
        yield b"data: [DONE]\n\n"
    finally:  # also reached when the client disconnects mid-stream
        for t in tracked:
            loop.abort(t)


class _Terminated(Exception):
    pass


def _terminate(signum, frame) -> None:
    raise _Terminated


def serve(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Serve ``app`` (from ``create_app``) with uvicorn, with its connection limits, until SIGINT or
    SIGTERM; then return normally, so the caller's clean-up runs. (uvicorn shuts down gracefully on
    either signal, then raises it again: SIGINT arrives here as KeyboardInterrupt, SIGTERM would end
    the process at once but for the handler installed meanwhile.)"""
    import signal
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn_config(app, host, port, _limits_of(app), log_level))
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main else None
    try:
        server.run()
    except (KeyboardInterrupt, _Terminated):
        pass
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _limits_of(app: FastAPI) -> ServerLimits:
    return getattr(app.state, "limits", None) or ServerLimits()


class BackgroundServer:
    """Serve ``app`` with uvicorn from a background thread (for tests and benchmarks)::

        with BackgroundServer(create_app(engine, "m")) as server:
            httpx.get(server.url + "/health")

    ``port=0`` takes a free port; ``url`` tells which.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = self.socket.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn_config(app, self.host, self.port, _limits_of(app), log_level))
        self._thread = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        import threading

        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, name="hetserve-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(30)
        self.socket.close()
