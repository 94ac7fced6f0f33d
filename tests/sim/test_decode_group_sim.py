"""The simulator with decode groups reproduces the per-sequence scheduler's simulation exactly."""

from pathlib import Path

import numpy as np
import pytest

from hetserve.plan import load_plan
from hetserve.scheduling import Scheduler
from hetserve.sim import simulate
from hetserve.sim.instance import SimInstance
from hetserve.specs.workloads import SLO, Requests
from tests.sim.conftest import make_deployment

PLANS = Path(__file__).resolve().parents[2] / "examples" / "plans"
FIELDS = ("prefill_start", "prefill_end", "transfer_end", "first_token", "finish")


def overload(n: int, rate: float, seed: int) -> Requests:
    """Poisson arrivals of mixed lengths; a third of the prompts share 512-token prefix blocks."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, n))
    prompt = np.clip(rng.lognormal(np.log(900), 0.8, n), 8, 6000).astype(np.int64)
    output = np.clip(rng.lognormal(np.log(150), 0.9, n), 1, 1500).astype(np.int64)
    hashes = [
        [0, 1, 2][: max(1, int(p) // 512)] if i % 3 == 0 else [1000 + i] * max(1, int(p) // 512)
        for i, p in enumerate(prompt)
    ]
    return Requests(arrivals, prompt, output, hashes)


@pytest.mark.parametrize(
    "plan, rate",
    [
        ("bench-32gpu.yaml", 40.0),  # mixed, prefill/decode and a 2-stage pipeline
        ("splitwise-pd.yaml", 30.0),
        ("cross-vendor-pd.yaml", 30.0),
        ("petals-chains.yaml", 2.0),  # chains over shared servers
        ("hexgen-asymmetric.yaml", 6.0),
        ("homogeneous-replicas.yaml", 60.0),
    ],
)
def test_decode_groups_change_no_simulated_figure(plan, rate, monkeypatch):
    same_simulation(lambda: load_plan(PLANS / plan), overload(600, rate, seed=3), monkeypatch)


@pytest.mark.parametrize("policy", ["decode-first", "prefill-first"])
def test_decode_groups_change_nothing_under_preemption(policy, monkeypatch):
    """KV room for a few requests: preemptions dissolve the group and it forms again."""

    def tight():
        return make_deployment(
            [{"name": "s", "node": "n", "gpus": [0], "layers": [0, 32]}],
            [
                {
                    "name": "i",
                    "role": "mixed",
                    "chain": ["s"],
                    "max_batch_size": 64,
                    "kv_share": 0.04,
                    "chunk_size": 256,
                    "policy": policy,
                }
            ],
        )

    result = same_simulation(tight, overload(400, 20.0, seed=5), monkeypatch)
    assert result.summary.preemptions > 0


def same_simulation(deployment, reqs: Requests, monkeypatch):
    slo = SLO(ttft_ms=2000, tpot_ms=100, percentile=90)
    grouped = simulate(deployment(), reqs, slo)
    with monkeypatch.context() as m:
        m.setattr(SimInstance, "scheduler_type", Scheduler)
        plain = simulate(deployment(), reqs, slo)
    a, b = grouped.records, plain.records
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(a.preemptions, b.preemptions)
    assert a.entry == b.entry and a.decode == b.decode
    assert grouped.summary.iterations == plain.summary.iterations
    assert grouped.summary.peak_kv_fraction == plain.summary.peak_kv_fraction
    assert grouped.summary.completed > 0
    return grouped
