"""Any bytes as a plan, cluster or workload file give the loaded object or one HetserveError: never another
exception, a hang or an unbounded allocation (every size a file can ask for is bounded before it is used).

Three kinds of input per loader: raw bytes, a shipped example with bytes changed, and a well-formed file
whose numbers (counts, rates, durations, lengths, bandwidths) are drawn from the whole range YAML can
express, including .inf, .nan, true and 40-digit integers.
"""

import math
import resource
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hetserve.errors import HetserveError
from hetserve.plan import Deployment, load_plan
from hetserve.specs.clusters import Cluster
from hetserve.specs.workloads import MAX_REQUESTS, Workload
from tests.conftest import EXAMPLES

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: Growth of the process's peak resident memory the whole module may cause (the loaders' own bound is
#: far lower; this catches an allocation sized by a number in a file).
PEAK_GROWTH_BYTES = 1 << 30

CLUSTER = (EXAMPLES / "clusters" / "smollm2-lab.yaml").read_text()
PLAN = f"""version: 1
name: p
model: smollm2-135m
cluster: {EXAMPLES / "clusters" / "smollm2-lab.yaml"}
servers:
  - {{name: s0, node: l4-box, gpus: [0, 1], layers: [0, 15]}}
  - {{name: s1, node: t4-box, gpus: [0], layers: [15, 30]}}
instances:
  - {{name: i0, role: mixed, chain: [s0, s1], micro_batches: 2, max_batch_size: 64}}
routing: {{policy: least-work}}
"""
WORKLOAD = (EXAMPLES / "workloads" / "chat.yaml").read_text()

extreme = st.one_of(
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1e-300, 1e12, 1e18, 1e100, True, False, "8", "1e18", None]),
)
#: Mostly in range (so that files load and what they load is used), often at the extremes.
numbers = st.one_of(st.integers(1, 16), st.floats(0.05, 50), st.integers(1, 200_000), extreme)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    start = _peak_rss()
    yield tmp_path_factory.mktemp("fuzz")
    assert _peak_rss() - start < PEAK_GROWTH_BYTES


def _mutated(text: str):
    """``text`` with a few bytes replaced, inserted or deleted."""

    @st.composite
    def build(draw):
        data = bytearray(text.encode())
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(data)))
            how = draw(st.sampled_from(["replace", "insert", "delete"]))
            chunk = draw(
                st.one_of(
                    st.binary(min_size=1, max_size=6),
                    st.sampled_from(
                        [b"[", b"{", b"&a", b"*a", b": ", b"\n  ", b".inf", b"1e18", b"true", b"-"]
                    ),
                )
            )
            if how == "replace":
                data[at : at + len(chunk)] = chunk
            elif how == "insert":
                data[at:at] = chunk
            else:
                del data[at : at + len(chunk)]
        return bytes(data)

    return build()


def _yaml(strategy):
    return strategy.map(lambda d: yaml.safe_dump(d, sort_keys=False).encode())


lengths = st.one_of(
    st.fixed_dictionaries({"kind": st.just("fixed"), "value": numbers}),
    st.fixed_dictionaries({"kind": st.just("uniform"), "low": numbers, "high": numbers}),
    st.fixed_dictionaries(
        {"kind": st.just("lognormal"), "mean": numbers},
        optional={"cv": numbers, "min": numbers, "max": numbers},
    ),
)
workload_docs = _yaml(
    st.fixed_dictionaries(
        {
            "arrivals": st.fixed_dictionaries(
                {"kind": st.sampled_from(["poisson", "gamma"]), "rate": numbers}, optional={"cv": numbers}
            ),
            "prompt": lengths,
            "output": lengths,
        },
        optional={
            "duration_s": numbers,
            "slo": st.fixed_dictionaries(
                {},
                optional={"ttft_ms": numbers, "tpot_ms": numbers, "e2e_ms": numbers, "percentile": numbers},
            ),
        },
    )
)
link = st.fixed_dictionaries(
    {"a": st.sampled_from(["z1", "z2", "n-0"]), "b": st.sampled_from(["z1", "z2", "n-1"])},
    optional={"gbit_per_s": numbers, "latency_ms": numbers},
)
cluster_docs = _yaml(
    st.fixed_dictionaries(
        {
            "nodes": st.lists(
                st.fixed_dictionaries(
                    {
                        "name": st.sampled_from(["n", "m"]),
                        "gpu": st.sampled_from(["t4", "l4", "h100-sxm", "x"]),
                    },
                    optional={
                        "count": numbers,
                        "replicas": numbers,
                        "zone": st.sampled_from(["z1", "z2"]),
                        "fabric": st.fixed_dictionaries(
                            {"kind": st.just("pcie")}, optional={"gb_per_s": numbers, "latency_us": numbers}
                        ),
                    },
                ),
                min_size=1,
                max_size=3,
            )
        },
        optional={
            "network": st.fixed_dictionaries(
                {},
                optional={"gbit_per_s": numbers, "latency_ms": numbers, "zones": st.lists(link, max_size=2)},
            ),
            "gpus": st.fixed_dictionaries(
                {},
                optional={"t4": st.fixed_dictionaries({}, optional={"memory_gb": numbers, "tdp_w": numbers})},
            ),
        },
    )
)
plan_docs = _yaml(
    st.fixed_dictionaries(
        {
            "model": st.just("smollm2-135m"),
            "cluster": st.just(str(EXAMPLES / "clusters" / "smollm2-lab.yaml")),
            "servers": st.lists(
                st.fixed_dictionaries(
                    {
                        "name": st.just("s0"),
                        "node": st.sampled_from(["l4-box", "t4-box"]),
                        "gpus": st.one_of(st.just([0]), st.lists(numbers, min_size=1, max_size=3)),
                        "layers": st.one_of(st.just([0, 30]), st.lists(numbers, min_size=2, max_size=2)),
                    },
                    optional={"bits": numbers},
                ),
                min_size=1,
                max_size=1,
            ),
            "instances": st.lists(
                st.fixed_dictionaries(
                    {"name": st.just("i0"), "role": st.just("mixed"), "chain": st.just(["s0"])},
                    optional={
                        k: numbers
                        for k in (
                            "max_batch_size",
                            "max_batch_tokens",
                            "chunk_size",
                            "micro_batches",
                            "kv_share",
                            "block_size",
                        )
                    },
                ),
                min_size=1,
                max_size=1,
            ),
        },
        optional={
            "routing": st.fixed_dictionaries({}, optional={"weights": st.fixed_dictionaries({"i0": numbers})})
        },
    )
)


def _inputs(text: str, docs):
    return st.one_of(st.binary(max_size=600), _mutated(text), docs)


def _clean(exc: HetserveError, path: Path) -> None:
    message = str(exc)
    assert "\n" not in message, message
    assert len(message) < 4000, message[:200]
    assert str(path) in message or message.startswith("model:") or "cluster" in message, message


@SETTINGS
@given(content=_inputs(CLUSTER, cluster_docs))
def test_any_cluster_file_loads_or_gives_one_error(folder, content):
    path = folder / "cluster.yaml"
    path.write_bytes(content)
    try:
        cluster = Cluster.load(path)
    except HetserveError as exc:
        _clean(exc, path)
        event("refused")
        return
    event("loaded")
    names = list(cluster.nodes)
    assert 1 <= len(names) <= 10_000
    for a, b in ((names[0], names[0]), (names[0], names[-1])):
        link = cluster.link(a, b)
        assert math.isfinite(link.transfer_time(1e9)) and link.transfer_time(1e9) > 0


@SETTINGS
@given(content=_inputs(PLAN, plan_docs))
def test_any_plan_file_loads_or_gives_one_error(folder, content):
    path = folder / "plan.yaml"
    path.write_bytes(content)
    try:
        dep = load_plan(path)
    except HetserveError as exc:
        _clean(exc, path)
        event("refused")
        return
    event("loaded")
    assert isinstance(dep, Deployment)
    for name in dep.instances:
        assert dep.instances[name].kv_capacity_tokens >= 1
        dep.chain_timer(name)


@SETTINGS
@given(content=_inputs(WORKLOAD, workload_docs))
def test_any_workload_file_loads_and_samples_or_gives_one_error(folder, content):
    path = folder / "workload.yaml"
    path.write_bytes(content)
    try:
        workload = Workload.load(path)
    except HetserveError as exc:
        _clean(exc, path)
        event("refused")
        return
    event("loaded")
    assert 0 < workload.mean_rate < math.inf
    requests = workload.sample(seed=0, duration_s=min(workload.spec.duration_s, 5.0))
    assert len(requests) <= MAX_REQUESTS
    assert (requests.prompt_tokens >= 1).all() and (requests.output_tokens >= 1).all()
    prompt, output, _ = workload.length_stats(90, n=500)
    assert math.isfinite(prompt) and math.isfinite(output)
