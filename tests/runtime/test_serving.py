"""The ServingEngine protocol: LLMEngine and ClusterEngine both meet it, with the same signatures, and the API
layer serves either through it alone (the cluster engine here over in-process stand-in workers)."""

from __future__ import annotations

import inspect

import pytest

from hetserve.plan import load_plan
from hetserve.runtime.cluster.driver import ClusterEngine
from hetserve.runtime.cluster.topology import topology_from_plan
from hetserve.runtime.engine import EngineConfig, LLMEngine
from hetserve.runtime.model.tiny import tiny_model, tiny_tokenizer
from hetserve.runtime.sampling import SamplingParams
from hetserve.runtime.serving import ClusterStats, EngineLoad, ServingEngine

from .cluster.test_conformance import CLUSTER, PLAN, TOKEN, InProcessWorkers, engine_config

MEMBERS = [
    name
    for name, value in vars(ServingEngine).items()
    if not name.startswith("_") and (callable(value) or isinstance(value, property))
] + list(ServingEngine.__annotations__)


def single_engine() -> LLMEngine:
    return LLMEngine(tiny_model(seed=3), tiny_tokenizer(), EngineConfig(num_kv_blocks=64, block_size=4))


def cluster_engine(tmp_path) -> tuple[ClusterEngine, InProcessWorkers]:
    path = tmp_path / "plan.yaml"
    path.write_text(
        PLAN.format(cluster=CLUSTER, routing="round-robin", policy="decode-first", lanes="micro_batches: 2")
    )
    dep = load_plan(path)
    config = engine_config(dep)
    workers = InProcessWorkers(config.vocab_size)
    workers.gate.set()
    engine = ClusterEngine(topology_from_plan(dep), config, None, 0.5, transport=workers)
    return engine, workers


@pytest.fixture
def cluster(tmp_path):
    engine, _ = cluster_engine(tmp_path)
    yield engine
    for inst in engine.instances.values():
        inst.stop()


def test_the_protocol_declares_what_the_api_layer_uses():
    assert set(MEMBERS) == {
        "tokenizer",
        "max_model_len",
        "vocab_size",
        "add_request",
        "abort_request",
        "has_unfinished_requests",
        "step",
        "wake",
        "load",
        "cluster_stats",
        "shutdown",
    }


def test_both_engines_meet_the_protocol_with_its_signatures(cluster):
    for engine in (single_engine(), cluster):
        assert isinstance(engine, ServingEngine)
        for name in MEMBERS:
            declared = getattr(ServingEngine, name, None)
            if declared is None or isinstance(declared, property):
                assert hasattr(engine, name), (type(engine), name)
                continue
            got = inspect.signature(getattr(engine, name))
            want = inspect.signature(declared)
            assert list(got.parameters) == [p for p in want.parameters if p != "self"], (type(engine), name)


def test_a_single_engine_reports_no_cluster_stats():
    engine = single_engine()
    engine.wake()  # a no-op: its steps never wait
    assert engine.cluster_stats() is None
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True))
    assert engine.load() == EngineLoad(1, 0, 0, 64, 0, 0)


def test_the_cluster_engine_reports_its_instances_and_workers(cluster):
    rid = cluster.add_request([5, 6, 7, 8], SamplingParams(max_tokens=3))
    outs = []
    while cluster.has_unfinished_requests():
        outs += [o for o in cluster.step() if o.request_id == rid]
    assert [o.new_token_ids for o in outs] == [[TOKEN]] * 3
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    stats = cluster.cluster_stats()
    assert isinstance(stats, ClusterStats)
    assert [(i.name, i.role, i.up) for i in stats.instances] == [
        ("replica", "mixed", True),
        ("pipeline", "mixed", True),
    ]
    assert sum(i.load.steps for i in stats.instances) == 3  # one prefill and two decode steps
    assert [(w.rank, w.server, w.up) for w in stats.workers] == [
        (1, "fast", True),
        (2, "s0", True),
        (3, "s1", True),
    ]
    assert stats.kv_handoff_bytes == 0
    assert cluster.load().running == 0


def test_the_api_serves_a_cluster_engine_through_the_protocol(cluster):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from hetserve.runtime.api.metrics import parse_prometheus
    from hetserve.runtime.api.server import BackgroundServer, create_app

    with (
        BackgroundServer(create_app(cluster, "plan")) as srv,
        httpx.Client(base_url=srv.url, timeout=60) as c,
    ):
        r = c.post("/v1/completions", json={"model": "plan", "prompt": [5, 6, 7], "max_tokens": 4})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "length"
        assert r.json()["usage"]["completion_tokens"] == 4
        metrics = parse_prometheus(c.get("/metrics").text)
    assert metrics['hetserve_instance_up{instance="replica",role="mixed"}'] == 1
    assert metrics['hetserve_worker_up{rank="2",server="s0",tp_rank="0"}'] == 1
    assert metrics["hetserve_generation_tokens_total"] == 4
    assert metrics["hetserve_kv_handoff_bytes"] == 0


def test_health_fails_when_no_instance_can_take_requests(cluster):
    """A plan whose entry instances are all down cannot serve: /health says so (a load balancer then
    stops sending traffic), while a plan with one entry instance up is healthy."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from hetserve.runtime.api.server import BackgroundServer, create_app

    with (
        BackgroundServer(create_app(cluster, "plan")) as srv,
        httpx.Client(base_url=srv.url, timeout=30) as c,
    ):
        assert c.get("/health").status_code == 200
        cluster.instances["replica"].up = False
        assert c.get("/health").status_code == 200  # the pipeline still takes requests
        cluster.instances["pipeline"].up = False
        r = c.get("/health")
        assert r.status_code == 503 and "no instance" in r.json()["status"]
        assert sorted(r.json()["down"]) == ["pipeline", "replica"]  # it names what is down
