import numpy as np
import pytest

from hetserve.specs.workloads import Workload
from tests.conftest import shared_file


def _load(write, text):
    return Workload.load(write("w.yaml", text))


def test_poisson_rate_and_lengths(write):
    w = _load(
        write,
        """
arrivals: {kind: poisson, rate: 5}
prompt: {kind: lognormal, mean: 800, cv: 1.0, max: 100000}
output: {kind: fixed, value: 64}
duration_s: 2000
""",
    )
    r = w.sample(seed=1)
    assert len(r) == pytest.approx(10_000, rel=0.05)
    gaps = np.diff(r.arrival_s)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, abs=0.05)
    assert np.mean(r.prompt_tokens) == pytest.approx(800, rel=0.05)
    assert (r.output_tokens == 64).all()
    assert (np.diff(r.arrival_s) >= 0).all() and r.arrival_s[-1] <= 2000


def test_gamma_burstiness(write):
    w = _load(
        write,
        """
arrivals: {kind: gamma, rate: 10, cv: 3}
prompt: {kind: uniform, low: 10, high: 20}
output: {kind: uniform, low: 1, high: 5}
duration_s: 3000
""",
    )
    r = w.sample(seed=2)
    gaps = np.diff(r.arrival_s)
    assert 1 / np.mean(gaps) == pytest.approx(10, rel=0.1)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(3, rel=0.15)
    assert r.prompt_tokens.min() >= 10 and r.prompt_tokens.max() <= 20


def test_same_seed_same_requests(write):
    w = _load(
        write,
        "arrivals: {kind: poisson, rate: 3}\nprompt: {kind: lognormal, mean: 100}\n"
        "output: {kind: lognormal, mean: 10}\nduration_s: 100\n",
    )
    a, b, c = w.sample(seed=7), w.sample(seed=7), w.sample(seed=8)
    assert np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.prompt_tokens, b.prompt_tokens)
    assert not np.array_equal(a.arrival_s[:5], c.arrival_s[:5])


def test_azure_trace_replay_and_rate_scaling(write):
    trace = shared_file("traces", "azure_2023_conv.csv")
    w = _load(write, f"arrivals: {{kind: trace, path: {trace}}}\n")
    r = w.sample()
    assert len(r) > 19_000 and r.arrival_s[0] == 0
    assert np.median(r.prompt_tokens) == pytest.approx(1020, rel=0.2)
    fast = _load(write, f"arrivals: {{kind: trace, path: {trace}, rate_scale: 2}}\n").sample()
    assert fast.duration_s == pytest.approx(r.duration_s / 2)
    assert np.array_equal(fast.prompt_tokens, r.prompt_tokens)
    part = w.sample(duration_s=600)
    assert 0 < len(part) < len(r) and part.arrival_s[-1] <= 600


def test_mooncake_trace_with_prefix_hashes(write):
    trace = shared_file("traces", "mooncake_conversation.jsonl")
    w = _load(
        write,
        f"arrivals: {{kind: trace, path: {trace}, format: mooncake}}\noutput: {{kind: fixed, value: 10}}\n",
    )
    r = w.sample()
    assert len(r) == 12_031 and r.block_hashes is not None
    # 512-token blocks: the hash list covers the prompt
    assert all(len(h) == -(-p // 512) for h, p in zip(r.block_hashes[:200], r.prompt_tokens[:200]))
    assert (r.output_tokens == 10).all()


def test_empirical_lengths_from_a_trace(write):
    write(
        "t.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:17:03.9799600,100,7\n2023-11-16 18:17:04.0319600,300,9\n",
    )
    w = _load(
        write,
        "arrivals: {kind: poisson, rate: 50}\nprompt: {kind: empirical, path: t.csv}\n"
        "output: {kind: empirical, path: t.csv}\nduration_s: 100\n",
    )
    r = w.sample(seed=0)
    assert set(np.unique(r.prompt_tokens)) == {100, 300}
    assert set(np.unique(r.output_tokens)) == {7, 9}
