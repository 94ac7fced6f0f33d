"""One scheduler, two clocks: the simulator and the cluster driver, fed the same plan and requests, route
every request to the same instance and run the same batches, lane by lane, step by step.

The driver runs against an in-process transport that answers every micro-batch with logits whose
greedy token is never end-of-sequence, so each request runs to its ``max_tokens`` as in the simulator.
All requests arrive at once: routing is decided before any step completes, after which each lane's
sequence of batches depends only on its own scheduler (the order in which lanes finish may differ
between the clocks, and does not matter).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from hetserve.plan import load_plan
from hetserve.runtime.cluster.channel import Step
from hetserve.runtime.cluster.driver import ClusterEngine
from hetserve.runtime.cluster.topology import topology_from_plan
from hetserve.runtime.model.config import LlamaConfig
from hetserve.runtime.sampling import SamplingParams
from hetserve.scheduling.instance import InstanceState
from hetserve.sim.instance import SimInstance, SimServer
from hetserve.sim.simulator import simulate
from hetserve.specs.workloads import SLO, Requests

CLUSTER = Path(__file__).resolve().parents[3] / "examples" / "clusters" / "smollm2-lab.yaml"
TOKEN = 7  # what the fake workers' logits always pick

PLAN = """
version: 1
name: conformance
model: smollm2-135m
cluster: {cluster}
servers:
  - {{name: fast, node: l4-box, gpus: [0], layers: [0, 30], kv_dtype: fp32}}
  - {{name: s0, node: t4-box, gpus: [0], layers: [0, 12], kv_dtype: fp32}}
  - {{name: s1, node: t4-box, gpus: [1], layers: [12, 30], kv_dtype: fp32}}
instances:
  - {{name: replica, role: mixed, chain: [fast], max_batch_size: 3, max_batch_tokens: 160}}
  - {{name: pipeline, role: mixed, chain: [s0, s1], {lanes}, max_batch_size: 4,
     max_batch_tokens: 96, chunk_size: 48, policy: {policy}}}
routing:
  policy: {routing}
"""

# (prompt tokens, output tokens): long and short prompts (chunked on the pipeline), short and long replies
REQUESTS = [(40, 6), (120, 3), (8, 12), (64, 5), (30, 9), (90, 2), (16, 7), (50, 4), (12, 10), (70, 6)]


class InProcessWorkers:
    """A transport whose workers answer each micro-batch at once (after ``open``) with logits whose
    greedy choice is ``TOKEN``."""

    def __init__(self, vocab: int):
        self.vocab = vocab
        self.gate = threading.Event()
        self.steps: list[Step] = []

    def send(self, command, ranks) -> None:
        if isinstance(command, Step):
            self.steps.append(command)

    def recv_logits(self, shape, src, tag):
        self.gate.wait(timeout=60)
        logits = torch.zeros(shape, dtype=torch.float32)
        if len(shape) == 2:
            logits[:, TOKEN] = 10.0
        return logits

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def record(monkeypatch) -> dict:
    """Log, per instance and lane, every batch the shared layer schedules (a run of k decode steps
    counts as k batches; the simulator's decode group counts as its members, each decoding one token;
    the order within a step does not matter), and every routing decision (sequence id -> instance)."""
    log: dict = {"routes": {}, "batches": {}}
    schedule, complete, add = InstanceState.schedule, InstanceState.complete, InstanceState.add
    work: dict[int, list] = {}  # id(batch) -> (seq_id, start, tokens) of everything it computes

    def logged_add(self, seq):
        log["routes"][seq.seq_id] = self.name
        return add(self, seq)

    def logged_schedule(self, lane):
        batch = schedule(self, lane)
        shape = [(it.seq.seq_id, it.start, it.num_tokens) for it in batch.items]
        if batch.group is not None:
            group = lane.scheduler
            shape += [
                (q.seq_id, q.num_computed_tokens + group.step - q.group_anchor, 1)
                for q in group.members.values()
            ]
        if shape:
            work[id(batch)] = shape
            log["batches"].setdefault((self.name, lane.index), []).append(tuple(sorted(shape)))
        return batch

    def logged_complete(self, lane, batch, token_ids=None, stopped=frozenset(), steps=1):
        runs = log["batches"][(self.name, lane.index)]
        for k in range(1, steps):  # the simulator advanced k decode steps at once
            runs.append(tuple(sorted((sid, start + k, 1) for sid, start, _ in work[id(batch)])))
        return complete(self, lane, batch, token_ids, stopped, steps)

    monkeypatch.setattr(InstanceState, "add", logged_add)
    monkeypatch.setattr(InstanceState, "schedule", logged_schedule)
    monkeypatch.setattr(InstanceState, "complete", logged_complete)
    return log


def run_simulator(dep, monkeypatch) -> dict:
    log = record(monkeypatch)
    n = len(REQUESTS)
    reqs = Requests(
        np.zeros(n),
        np.array([p for p, _ in REQUESTS], dtype=np.int64),
        np.array([o for _, o in REQUESTS], dtype=np.int64),
    )
    result = simulate(dep, reqs, SLO())
    assert result.summary.completed == n
    return log


def engine_config(dep) -> LlamaConfig:
    """The engine's view of the plan's model (no weights: the in-process workers need none); token 0
    ends a sequence."""
    m = dep.model
    return LlamaConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads,
        head_dim=m.head_dim,
        max_position_embeddings=m.max_position_embeddings,
        eos_token_ids=(0,),
    )


def run_driver(dep, monkeypatch) -> tuple[dict, InProcessWorkers]:
    log = record(monkeypatch)
    config = engine_config(dep)
    workers = InProcessWorkers(config.vocab_size)
    engine = ClusterEngine(
        topology_from_plan(dep), config, None, 0.5, prefix_caching=False, transport=workers
    )
    rng = np.random.default_rng(0)
    finished = {}
    for p, o in REQUESTS:  # arrivals: each is routed, and an idle lane starts on it at once
        prompt = [int(t) for t in rng.integers(1, config.vocab_size, p)]
        engine.add_request(prompt, SamplingParams(max_tokens=o))
        engine.wake()
        engine.step()
    workers.gate.set()
    for _ in range(1000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert len(finished) == len(REQUESTS)
    assert [len(finished[i].token_ids) for i in range(len(REQUESTS))] == [o for _, o in REQUESTS]
    for inst in engine.instances.values():
        inst.stop()
    return log, workers


@pytest.mark.parametrize("routing,policy", [("least-work", "decode-first"), ("round-robin", "prefill-first")])
def test_simulator_and_driver_route_and_batch_alike(tmp_path, monkeypatch, routing, policy):
    path = tmp_path / "plan.yaml"
    path.write_text(PLAN.format(cluster=CLUSTER, routing=routing, policy=policy, lanes="micro_batches: 2"))
    sim = run_simulator(load_plan(path), monkeypatch)
    monkeypatch.undo()
    served, workers = run_driver(load_plan(path), monkeypatch)
    assert served["routes"] == sim["routes"]
    assert set(served["routes"].values()) == {"replica", "pipeline"}  # both instances took requests
    assert served["batches"].keys() == sim["batches"].keys()
    for lane, batches in sim["batches"].items():
        assert served["batches"][lane] == batches, f"lane {lane} ran different batches"
    # the pipeline's two lanes both ran, with prompt chunks of at most 48 tokens
    assert {("pipeline", 0), ("pipeline", 1)} <= sim["batches"].keys()
    chunks = [n for b in sim["batches"][("pipeline", 0)] for _, _, n in b]
    assert max(chunks) <= 48
    # and every scheduled batch went to the workers as one Step
    assert len(workers.steps) == sum(len(b) for b in served["batches"].values())


def test_the_driver_weighs_work_by_the_same_cost_model_as_the_simulator(tmp_path):
    """Least-work routing and JFFC read the cost model's per-token seconds and speed in serving too
    (not a count of queued requests): the L4 replica prefills faster than the two-T4 pipeline, so the
    same queued prompt weighs less there."""
    path = tmp_path / "plan.yaml"
    path.write_text(
        PLAN.format(cluster=CLUSTER, routing="least-work", policy="decode-first", lanes="micro_batches: 2")
    )
    dep = load_plan(path)
    topo = topology_from_plan(dep)
    for name in ("replica", "pipeline"):
        assert (
            topo.instances[name].estimate
            == SimInstance(
                dep.instances[name], dep, {s: SimServer(s, 1, 0.0, 0.0) for s in dep.servers}
            ).estimate
        )
    fast, slow = topo.instances["replica"].estimate, topo.instances["pipeline"].estimate
    assert fast.prefill_s_per_token < slow.prefill_s_per_token


def per_sequence(batches: dict, instance: str) -> dict[int, list[tuple[int, int]]]:
    """Every step each sequence of ``instance`` computed, in order: (start, tokens)."""
    steps: dict[int, list[tuple[int, int]]] = {}
    for (name, _), runs in batches.items():
        if name == instance:
            for batch in runs:
                for sid, start, n in batch:
                    steps.setdefault(sid, []).append((start, n))
    return {sid: sorted(v) for sid, v in steps.items()}


@pytest.mark.parametrize("policy", ["decode-first", "prefill-first"])
def test_per_request_pipelining_runs_every_request_alike_in_both_clocks(tmp_path, monkeypatch, policy):
    """Pipelining per request, each request is a lane of its own, admitted in order as lanes and KV room
    free up; which lane a request gets depends on which request finished first, and which steps travel
    together differs (the simulator's servers batch what waits on them; the driver sends the ready steps
    as one micro-batch), but each request's steps (its prompt chunks, then one token per step) and its
    instance are the same in both clocks."""
    path = tmp_path / "plan.yaml"
    path.write_text(
        PLAN.format(cluster=CLUSTER, routing="round-robin", policy=policy, lanes="pipelining: per-request")
    )
    sim = run_simulator(load_plan(path), monkeypatch)
    monkeypatch.undo()
    served, workers = run_driver(load_plan(path), monkeypatch)
    assert served["routes"] == sim["routes"]
    steps = per_sequence(sim["batches"], "pipeline")
    assert steps == per_sequence(served["batches"], "pipeline")
    assert len(steps) == 5  # round-robin: every other request
    pipeline = [b for (name, _), runs in sim["batches"].items() if name == "pipeline" for b in runs]
    assert all(len(batch) == 1 for batch in pipeline)  # one sequence per batch
    for sid, seq_steps in steps.items():
        prompt, output = REQUESTS[sid]
        chunks = [n for start, n in seq_steps if start < prompt]
        assert sum(chunks) == prompt and max(chunks) <= 48
        assert len(seq_steps) - len(chunks) == output - 1
    # at most max_batch_size (4) requests were in flight on the pipeline at once
    lanes = {lane for name, lane in sim["batches"] if name == "pipeline"}
    assert len(lanes) <= 4
    # the driver sends the ready requests' steps together, within the step budget of 96 tokens
    sent = [st for st in workers.steps if st.instance == "pipeline"]
    assert all(st.ids.numel() <= 96 for st in sent)
    assert len(sent) < len(pipeline) and any(len(st.sample_rows) > 1 for st in sent)
