"""Routing in the simulator: fair ties, the load index against a scan, hand-offs to decode instances."""

import numpy as np

from hetserve.scheduling import routing
from hetserve.scheduling.routing import LeastWork, Pool, _rank
from hetserve.sim import simulate
from hetserve.sim.simulator import Simulator
from tests.sim.conftest import NO_SLO, make_deployment, poisson, requests


def _replicas(n, routing=None):
    servers = [{"name": f"s{k}", "node": "n", "gpus": [k], "layers": [0, 32]} for k in range(n)]
    inst = [{"name": f"r{k}", "role": "mixed", "chain": [f"s{k}"]} for k in range(n)]
    nodes = [{"name": "n", "gpu": "a100-80gb", "count": max(8, n)}]
    return make_deployment(servers, inst, nodes=nodes, routing=routing)


def test_identical_idle_replicas_share_requests_evenly():
    """Each request arrives after the previous one finished: every replica has no work, and the ties
    go round instead of all to the first replica."""
    dep = _replicas(4)
    r = simulate(dep, requests(np.arange(40) * 5.0, 200, 20), NO_SLO).records
    assert r.completed.all()
    names, counts = np.unique(np.asarray(r.entry, dtype=object), return_counts=True)
    assert dict(zip(names, counts)) == {"r0": 10, "r1": 10, "r2": 10, "r3": 10}


def _pd_small_budget():
    servers = [
        {"name": "ps", "node": "n", "gpus": [0], "layers": [0, 32]},
        {"name": "ds", "node": "n", "gpus": [1], "layers": [0, 32]},
    ]
    inst = [
        {"name": "pre", "role": "prefill", "chain": ["ps"], "max_batch_tokens": 4096},
        {"name": "dec", "role": "decode", "chain": ["ds"], "max_batch_tokens": 256},
    ]
    return make_deployment(servers, inst)


def test_a_decode_instance_serves_a_handoff_longer_than_its_step_budget():
    """The decode instance receives the prompt's KV and computes one token per step: a 1,500-token
    prompt with 50 output tokens runs there although its step budget is 256 tokens."""
    dep = _pd_small_budget()
    r = simulate(dep, requests([0.0, 0.5], [1500, 100], [50, 20]), NO_SLO)
    assert r.summary.completed == 2 and r.summary.dropped == 0
    assert list(r.records.decode) == ["dec", "dec"]


def _mixed_and_pd():
    nodes = [{"name": "n", "gpu": "a100-80gb", "count": 8}]
    servers = [{"name": f"s{k}", "node": "n", "gpus": [k], "layers": [0, 32]} for k in range(7)]
    inst = [
        {"name": "m0", "role": "mixed", "chain": ["s0"], "max_batch_size": 16, "chunk_size": 256},
        {"name": "m1", "role": "mixed", "chain": ["s1"], "max_batch_size": 16, "chunk_size": 256},
        {"name": "m2", "role": "mixed", "chain": ["s2"], "max_batch_size": 8},
        {"name": "p0", "role": "prefill", "chain": ["s3"]},
        {"name": "p1", "role": "prefill", "chain": ["s4"]},
        {"name": "d0", "role": "decode", "chain": ["s5"], "max_batch_size": 32},
        {"name": "d1", "role": "decode", "chain": ["s6"], "max_batch_size": 32},
    ]
    return make_deployment(
        servers, inst, nodes=nodes, routing={"policy": "least-work", "handoff": "least-work"}
    )


def test_every_indexed_decision_in_a_simulation_equals_a_scan(monkeypatch):
    """Entry routing and hand-offs read the pools' indexes while instances run decode steps many at
    a time (their work falls as each step ends, between events): each choice equals a scan of every
    instance's current outstanding work."""
    choose = LeastWork.choose
    seen = {"decisions": 0, "in_flight": 0}

    def checked(self, candidates):
        if isinstance(candidates, Pool):
            assert candidates.least() is min(list(candidates), key=_rank)
            seen["decisions"] += 1
            seen["in_flight"] += any(i.output_in_flight() > 0 for i in candidates)
        return choose(self, candidates)

    monkeypatch.setattr(LeastWork, "choose", checked)
    monkeypatch.setattr(routing, "INDEX_MIN", 1)  # index even these few instances
    dep = _mixed_and_pd()
    rng = np.random.default_rng(3)
    n = 600
    reqs = requests(poisson(12.0, n, seed=3), rng.integers(50, 1500, n), rng.integers(5, 300, n))
    r = simulate(dep, reqs, NO_SLO)
    assert r.summary.completed == n
    assert seen["decisions"] >= n  # every arrival, and every hand-off
    assert seen["in_flight"] > n // 10  # many decisions saw runs of decode steps part-way through
    assert sum(r.records.preemptions) >= 0


def test_instances_examined_per_arrival_grow_far_slower_than_the_pool(monkeypatch):
    """8x the replicas at 8x the arrival rate (the same load each): an arrival's routing reads about as
    many instances as before (a scan reads 8x as many) and moves a few heap entries per read."""
    monkeypatch.setattr(routing, "INDEX_MIN", 1)
    per_arrival = {}
    for scale in (1, 8):
        dep = _replicas(8 * scale)
        n = 400 * scale
        rng = np.random.default_rng(0)
        reqs = requests(poisson(6.0 * scale, n), rng.integers(50, 1000, n), rng.integers(10, 200, n))
        sim = Simulator(dep, reqs, NO_SLO)
        assert sim.run().summary.completed == n
        per_arrival[scale] = (sim.entry_pool.reads / n, sim.entry_pool.heap_operations / n)
    (reads1, ops1), (reads8, ops8) = per_arrival[1], per_arrival[8]
    assert reads8 < 2 * reads1 and reads8 < 8  # a scan: 8 and 64 per arrival
    for reads, ops in per_arrival.values():
        assert ops <= 4 * reads  # a read pushes its new key; stale entries are popped once each
    assert reads8 + ops8 < 4 * (reads1 + ops1)  # under half of 8x


def test_a_scanned_and_an_indexed_pool_give_the_same_simulation(monkeypatch):
    """Few instances are routed by a scan, many through the index: the choice of pool changes the
    simulator's cost, never a decision."""
    dep = _mixed_and_pd()
    rng = np.random.default_rng(5)
    n = 400
    reqs = requests(poisson(12.0, n, seed=5), rng.integers(50, 1500, n), rng.integers(5, 300, n))
    scanned = Simulator(dep, reqs, NO_SLO)
    assert isinstance(scanned.entry_pool, routing.ScanPool)
    a = scanned.run().records
    monkeypatch.setattr(routing, "INDEX_MIN", 1)
    indexed = Simulator(dep, reqs, NO_SLO)
    assert isinstance(indexed.entry_pool, routing.Pool)
    b = indexed.run().records
    assert list(a.entry) == list(b.entry) and list(a.decode) == list(b.decode)
    assert len(set(a.entry)) > 2 and len(set(a.decode) - {None}) > 1  # choices were made
    assert np.array_equal(a.finish, b.finish, equal_nan=True)
