"""A user's mistake gets one clear message naming the file/field and the fix, exit status 2, no traceback."""

import pytest

from tests.conftest import EXAMPLES

CLUSTER_OK = """
name: c
nodes:
  - {name: n0, gpu: a100-80gb, count: 4, zone: z1}
  - {name: n1, gpu: l4, count: 2, zone: z2}
network: {gbit_per_s: 100, latency_ms: 0.1}
"""


def assert_clean_error(code, err, *needles):
    assert code == 2
    assert "Traceback" not in err
    assert err.strip().count("\n") == 0, f"one line expected, got: {err!r}"
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"


CLUSTER_CASES = [
    (
        "unknown GPU",
        CLUSTER_OK.replace("gpu: l4,", "gpu: l44,"),
        ["nodes[1].gpu", "unknown GPU 'l44'", "did you mean 'l4'"],
    ),
    (
        "negative bandwidth",
        CLUSTER_OK.replace("gbit_per_s: 100", "gbit_per_s: -5"),
        ["network.gbit_per_s", "greater than or equal to 0.001"],
    ),
    (
        "misspelt key",
        CLUSTER_OK.replace("zone: z2", "zoen: z2"),
        ["nodes[1]", "unknown key 'zoen'", "did you mean 'zone'"],
    ),
    ("bad YAML", "name: c\nnodes: [ {name: n0, gpu: t4\n", ["invalid YAML", "line"]),
    ("missing nodes", "name: c\n", ["nodes", "is required"]),
    (
        "zero GPUs",
        CLUSTER_OK.replace("count: 2", "count: 0"),
        ["nodes[1].count", "greater than or equal to 1"],
    ),
    ("duplicate node", CLUSTER_OK.replace("name: n1", "name: n0"), ["node name 'n0' appears twice"]),
    (
        "unknown zone override",
        CLUSTER_OK.replace(
            "network: {gbit_per_s: 100, latency_ms: 0.1}",
            "network:\n  zones: [{a: z1, b: z9, gbit_per_s: 1}]",
        ),
        ["network.zones[0].b", "unknown zone 'z9'"],
    ),
    (
        "new GPU incomplete",
        CLUSTER_OK + "gpus:\n  my-gpu: {memory_gb: 24}\n",
        ["gpus.my-gpu", "not in the catalogue", "base:"],
    ),
    (
        "override negative price",
        CLUSTER_OK + "gpus:\n  l4: {price_per_hour: -1}\n",
        ["gpus.l4.price_per_hour"],
    ),
    ("not a mapping", "- just\n- a list\n", ["must be a mapping"]),
    ("empty file", "", ["empty"]),
    (
        "fabric kind",
        CLUSTER_OK.replace("zone: z2}", "zone: z2, fabric: {kind: warp, gb_per_s: 5}}"),
        ["nodes[1].fabric.kind"],
    ),
]


@pytest.mark.parametrize("label,text,needles", CLUSTER_CASES, ids=[c[0] for c in CLUSTER_CASES])
def test_cluster_file_mistakes(label, text, needles, write, run_cli):
    path = write("cluster.yaml", text)
    code, out, err = run_cli("gpus", "--cluster", path)
    assert_clean_error(code, err, str(path), *needles)


WORKLOAD_OK = """
name: w
arrivals: {kind: poisson, rate: 2}
prompt: {kind: fixed, value: 100}
output: {kind: uniform, low: 10, high: 20}
slo: {ttft_ms: 1000, tpot_ms: 50}
"""

WORKLOAD_CASES = [
    (
        "missing trace",
        "arrivals: {kind: trace, path: nowhere.csv}\n",
        ["arrivals.path", "trace file not found"],
    ),
    ("unknown arrival kind", WORKLOAD_OK.replace("kind: poisson", "kind: poison"), ["arrivals"]),
    ("negative rate", WORKLOAD_OK.replace("rate: 2", "rate: -2"), ["arrivals.poisson.rate"]),
    (
        "uniform reversed",
        WORKLOAD_OK.replace("low: 10, high: 20", "low: 20, high: 10"),
        ["output", "high (10) must be >= low (20)"],
    ),
    (
        "percentile > 100",
        WORKLOAD_OK.replace("tpot_ms: 50", "tpot_ms: 50, percentile: 150"),
        ["slo.percentile"],
    ),
    (
        "lengths required",
        "arrivals: {kind: poisson, rate: 1}\n",
        ["'prompt' length distribution is required"],
    ),
    (
        "misspelt slo key",
        WORKLOAD_OK.replace("ttft_ms", "ttf_ms"),
        ["unknown key 'ttf_ms'", "did you mean 'ttft_ms'"],
    ),
    (
        "e2e below ttft",
        WORKLOAD_OK.replace("tpot_ms: 50", "e2e_ms: 500"),
        ["slo", "e2e_ms (500) is below ttft_ms (1000)"],
    ),
]


@pytest.mark.parametrize("label,text,needles", WORKLOAD_CASES, ids=[c[0] for c in WORKLOAD_CASES])
def test_workload_file_mistakes(label, text, needles, write):
    from hetserve.errors import HetserveError
    from hetserve.specs.workloads import Workload

    path = write("workload.yaml", text)
    with pytest.raises(HetserveError) as exc:
        Workload.load(path)
    msg = str(exc.value)
    assert str(path) in msg
    for n in needles:
        assert n in msg


def test_malformed_trace_names_file(write):
    from hetserve.errors import HetserveError
    from hetserve.specs.workloads import Workload

    write("t.csv", "when,prompt\n1,2\n")
    path = write("w.yaml", "arrivals: {kind: trace, path: t.csv}\n")
    with pytest.raises(HetserveError, match="t.csv.*needs columns"):
        Workload.load(path)


ESTIMATE_CASES = [
    ("unknown model", ["--model", "llama-9-70b", "--gpu", "h100-sxm"], ["unknown model 'llama-9-70b'"]),
    ("unknown gpu", ["--model", "llama-2-7b", "--gpu", "h1000"], ["--gpu", "unknown GPU 'h1000'"]),
    (
        "tp cannot split heads",
        ["--model", "llama-2-70b", "--gpu", "a100-80gb", "--tp", "12"],
        ["--tp=12 cannot split the 64 attention heads (8 KV heads)", "[1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64]"],
    ),
    ("pp too deep", ["--model", "smollm2-135m", "--gpu", "t4", "--pp", "31"], ["--pp=31"]),
    ("zero batch", ["--model", "llama-2-7b", "--gpu", "t4", "--batch", "0"], ["--batch=0 must be >= 1"]),
    ("missing model config", ["--model", "/nonexistent/config.json", "--gpu", "t4"], ["unknown model"]),
    (
        "gpu family",
        ["--model", "llama-2-7b", "--gpu", "h100"],
        ["unknown GPU 'h100' (did you mean 'h100-pcie' or 'h100-sxm'?)"],
    ),
]


@pytest.mark.parametrize("label,argv,needles", ESTIMATE_CASES, ids=[c[0] for c in ESTIMATE_CASES])
def test_estimate_mistakes(label, argv, needles, run_cli):
    code, out, err = run_cli("estimate", *argv)
    assert_clean_error(code, err, *needles)


def test_unsupported_model_type(write, run_cli):
    cfg = write("m/config.json", '{"model_type": "gpt_neox", "hidden_size": 64}')
    code, out, err = run_cli("estimate", "--model", cfg, "--gpu", "t4")
    assert_clean_error(code, err, str(cfg), "model_type 'gpt_neox' is not supported")


def test_shipped_examples_load():
    from hetserve.specs.clusters import Cluster
    from hetserve.specs.workloads import Workload

    for path in sorted((EXAMPLES / "clusters").glob("*.yaml")):
        assert Cluster.load(path).total_gpus > 0
    for path in sorted((EXAMPLES / "workloads").glob("*.yaml")):
        if "trace" in path.name and not (path.parent / "../../../shared").resolve().exists():
            continue
        assert Workload.load(path).mean_rate > 0


@pytest.mark.parametrize("seed", ["-1", "4294967296", "x"])
def test_a_seed_out_of_range_is_one_line(seed, run_cli, write):
    code, out, err = run_cli("simulate", "--plan", "p.yaml", "--workload", "w.yaml", "--seed", seed)
    assert code == 2 and "--seed" in err and "Traceback" not in err


def test_version(run_cli):
    from hetserve import __version__

    code, out, err = run_cli("--version")
    assert code == 0 and f"hetserve {__version__}" in out + err


def test_every_mistake_in_a_cluster_file_is_reported_at_once(write, run_cli):
    bad = write(
        "c.yaml",
        "name: c\nnodes:\n  - {name: a, gpu: a1000, count: 2}\n  - {name: b, gpu: h1000, count: 4}\n"
        "  - {name: c, gpu: l4, count: 4}\n  - {name: c, gpu: t4, count: 1}\n"
        "network:\n  gbit_per_s: 5\n  pairs: [{a: c, b: zz, gbit_per_s: 1}]\n",
    )
    code, out, err = run_cli("gpus", "--cluster", bad)
    assert_clean_error(
        code,
        err,
        "nodes[0].gpu: unknown GPU 'a1000'",
        "nodes[1].gpu: unknown GPU 'h1000'",
        "node name 'c' appears twice",
        "network.pairs[0].b: unknown node 'zz'",
    )
    assert err.count("known: a10,") == 1  # the catalogue is listed once
