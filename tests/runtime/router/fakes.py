"""OpenAI-compatible stand-ins for vLLM/SGLang/hetserve backends, served on 127.0.0.1: each records what
it was sent and can be told to fail in the ways a real backend does."""

from __future__ import annotations

import asyncio
import json
import socket

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from hetserve.plan import PlanFile


class Fake:
    def __init__(self, name: str, tokens: tuple[str, ...] = ("a", "b", "c")):
        self.name, self.tokens = name, tokens
        self.received: list[dict] = []
        self.mode = "ok"  # ok | http500 | http400 | die-before-token | die-after-token
        self.healthy = True
        self.running = 0
        self.delay = 0.0  # seconds a request takes
        self.most_at_once = 0
        self.app = self._app()

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health():
            return PlainTextResponse("ok", status_code=200 if self.healthy else 503)

        @app.get("/metrics")
        async def metrics():
            return PlainTextResponse(
                "# TYPE vllm:num_requests_running gauge\n"
                f'vllm:num_requests_running{{model_name="m"}} {self.running}\n'
            )

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": self.name}]}

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._answer(await request.json(), chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await self._answer(await request.json(), chat=True)

        return app

    async def _answer(self, body: dict, chat: bool):
        self.received.append(body)
        if self.mode == "http500":
            return JSONResponse({"error": {"message": "engine failed"}}, status_code=500)
        if self.mode == "http400":
            return JSONResponse({"error": {"message": "max_tokens: too large", "param": "max_tokens"}}, 400)
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await asyncio.sleep(self.delay)
        finally:
            if not body.get("stream"):
                self.running -= 1
        n = min(int(body.get("max_tokens") or len(self.tokens)), len(self.tokens))
        if not body.get("stream"):
            text = "".join(self.tokens[:n])
            choice = {"index": 0, "finish_reason": "length"}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            out = {"id": "x", "object": "completion", "model": "m", "choices": [choice], "backend": self.name}
            kv = body.get("kv_transfer_params")
            if kv and kv.get("do_remote_decode"):
                out["kv_transfer_params"] = {"do_remote_prefill": True, "remote_engine_id": self.name}
            return out
        return StreamingResponse(self._events(n, chat), media_type="text/event-stream")

    async def _events(self, n: int, chat: bool):
        try:
            if chat:
                yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
            if self.mode == "die-before-token":
                raise ConnectionResetError("backend died")
            for i, tok in enumerate(self.tokens[:n]):
                yield _sse(
                    {"choices": [{"index": 0, **({"delta": {"content": tok}} if chat else {"text": tok})}]}
                )
                if self.mode == "die-after-token" and i == 0:
                    raise ConnectionResetError("backend died")
            yield _sse(
                {
                    "choices": [
                        {"index": 0, "finish_reason": "length", **({"delta": {}} if chat else {"text": ""})}
                    ]
                }
            )
            yield b"data: [DONE]\n\n"
        finally:
            self.running -= 1


def _sse(event: dict) -> bytes:
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def closed_port_url() -> str:
    """A loopback URL nobody listens on (a backend that died)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def plan_of(instances: list[dict], routing: dict | None = None) -> PlanFile:
    servers = [
        {"name": f"s-{i['name']}", "node": "n", "gpus": [k], "layers": [0, 30]}
        for k, i in enumerate(instances)
    ]
    for i in instances:
        i.setdefault("chain", [f"s-{i['name']}"])
    return PlanFile.model_validate(
        {
            "model": "smollm2-135m",
            "cluster": "-",
            "servers": servers,
            "instances": instances,
            "routing": routing or {},
        }
    )
