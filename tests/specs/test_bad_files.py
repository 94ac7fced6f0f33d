"""Every bad file of the hardening probes gives one clear HetserveError naming the file and the field: not
a traceback, a hang on a FIFO or device, or an allocation sized by a number in the file."""

import json
import os
import sys

import numpy as np
import pytest

from hetserve.errors import HetserveError
from hetserve.plan import load_plan
from hetserve.specs.clusters import Cluster
from hetserve.specs.loading import MAX_DEPTH, MAX_SPEC_BYTES
from hetserve.specs.models import load_model
from hetserve.specs.workloads import MAX_REQUESTS, Workload, _gamma_arrivals
from tests.conftest import EXAMPLES

LAB = EXAMPLES / "clusters" / "smollm2-lab.yaml"
CLUSTER = LAB.read_text()
PLAN = f"""version: 1
name: p
model: smollm2-135m
cluster: {LAB}
servers:
  - {{name: s0, node: l4-box, gpus: [0], layers: [0, 30]}}
instances:
  - {{name: i0, role: mixed, chain: [s0]}}
"""
WORKLOAD = """name: w
arrivals: {kind: poisson, rate: 2}
prompt: {kind: fixed, value: 100}
output: {kind: fixed, value: 10}
slo: {ttft_ms: 2000, tpot_ms: 100}
duration_s: 30
"""
AZURE = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.1,10,5\n"
LOADERS = {"cluster": Cluster.load, "plan": load_plan, "workload": Workload.load}


def refused(kind: str, path, *needles) -> str:
    with pytest.raises(HetserveError) as info:
        LOADERS[kind](path)
    message = str(info.value)
    assert "\n" not in message
    for needle in (str(path), *needles):
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


FILE_CASES = [
    ("non-UTF-8 plan", "plan", b"name: \xff\xfe bad\n", ["not UTF-8", "0xff", "line 1"]),
    ("non-UTF-8 cluster", "cluster", b"name: c\n\nnodes: \xe9\n", ["not UTF-8", "line 3"]),
    ("5000 nested lists", "plan", ("name: " + "[" * 5000 + "]" * 5000).encode(), [f"more than {MAX_DEPTH}"]),
    ("5000 nested maps", "workload", ("a: " + "{b: " * 5000 + "1" + "}" * 5000).encode(), ["nested"]),
    ("5000-digit integer", "cluster", ("nodes: " + "9" * 5000).encode(), ["too many digits"]),
    (
        "alias bomb",
        "cluster",
        (
            "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
            + "".join(f"{x}: &{x} [{', '.join(['*' + p] * 10)}]\n" for p, x in zip("abcdef", "bcdefg"))
        ).encode(),
        ["more than 1,000,000 values"],
    ),
    (
        "replicas 1e18",
        "cluster",
        CLUSTER.replace("count: 4}", "count: 4, replicas: 1.0e+18}").encode(),
        ["nodes[1].replicas", "10000"],
    ),
    (
        "count: true",
        "cluster",
        CLUSTER.replace("count: 4}", "count: true}").encode(),
        ["nodes[1]", "count", "true/false"],
    ),
    (
        "latency_ms .inf",
        "cluster",
        CLUSTER.replace("latency_ms: 0.1", "latency_ms: .inf").encode(),
        ["network.latency_ms", "finite"],
    ),
    (
        "fabric gb_per_s 0",
        "cluster",
        CLUSTER.replace("count: 8}", "count: 8, fabric: {kind: pcie, gb_per_s: 0}}").encode(),
        ["nodes[0].fabric.gb_per_s", "0.01"],
    ),
    (
        "10,001 nodes",
        "cluster",
        CLUSTER.replace("count: 8}", "count: 8, replicas: 10000}").encode(),
        ["10,001 nodes", "10,000"],
    ),
    (
        "micro_batches 1e18",
        "plan",
        PLAN.replace("chain: [s0]", "chain: [s0], micro_batches: 1.0e+18").encode(),
        ["instances[0].micro_batches"],
    ),
    (
        "max_batch_tokens 1e18",
        "plan",
        PLAN.replace("chain: [s0]", "chain: [s0], max_batch_tokens: 1.0e+18").encode(),
        ["instances[0].max_batch_tokens"],
    ),
    (
        "gamma cv 1e100",
        "workload",
        WORKLOAD.replace("{kind: poisson, rate: 2}", "{kind: gamma, rate: 2, cv: 1.0e+100}").encode(),
        ["arrivals.gamma.cv"],
    ),
    (
        "rate .inf",
        "workload",
        WORKLOAD.replace("rate: 2", "rate: .inf").encode(),
        ["arrivals.poisson.rate", "finite"],
    ),
    (
        "rate .nan",
        "workload",
        WORKLOAD.replace("rate: 2", "rate: .nan").encode(),
        ["arrivals.poisson.rate", "finite"],
    ),
    (
        "duration_s .inf",
        "workload",
        WORKLOAD.replace("duration_s: 30", "duration_s: .inf").encode(),
        ["duration_s", "finite"],
    ),
    (
        "rate 1e12",
        "workload",
        WORKLOAD.replace("rate: 2", "rate: 1.0e+12").encode(),
        ["arrivals.poisson.rate"],
    ),
    (
        "rate x duration too many requests",
        "workload",
        WORKLOAD.replace("rate: 2", "rate: 90000").replace("duration_s: 30", "duration_s: 100000").encode(),
        ["9,000,000,000 requests", f"{MAX_REQUESTS:,}"],
    ),
    (
        "ttft_ms .inf",
        "workload",
        WORKLOAD.replace("ttft_ms: 2000", "ttft_ms: .inf").encode(),
        ["slo.ttft_ms", "finite"],
    ),
    (
        "lognormal min > max",
        "workload",
        WORKLOAD.replace(
            "{kind: fixed, value: 100}", "{kind: lognormal, mean: 100, min: 500, max: 50}"
        ).encode(),
        ["prompt.lognormal", "max (50) must be >= min (500)"],
    ),
    (
        "prompt of 1e15 tokens",
        "workload",
        WORKLOAD.replace("value: 100", "value: 1000000000000000").encode(),
        ["prompt.fixed.value"],
    ),
    ("oversized file", "cluster", b"#" * (MAX_SPEC_BYTES + 1), ["larger than the 4 MiB"]),
]


@pytest.mark.parametrize("label,kind,content,needles", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_file_gives_one_error(label, kind, content, needles, tmp_path):
    path = tmp_path / f"{kind}.yaml"
    path.write_bytes(content)
    refused(kind, path, *needles)


def test_every_mistake_of_a_file_is_listed_at_once(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text(
        WORKLOAD.replace("rate: 2", "rate: -1")
        .replace("value: 10}", "value: 0}")
        .replace("duration_s: 30", "duration_s: .nan")
        + "colour: blue\n"
    )
    message = refused("workload", path)
    for field in ("arrivals.poisson.rate", "output.fixed.value", "duration_s", "unknown key 'colour'"):
        assert field in message


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
@pytest.mark.parametrize("kind", ["plan", "cluster", "workload"])
def test_fifo_is_refused_without_blocking(kind, tmp_path):
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    refused(kind, fifo, "named pipe (FIFO)", "not a regular file")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_device_is_refused_without_reading_it():
    refused("plan", "/dev/zero", "is a device")


def test_directory_and_missing_file(tmp_path):
    refused("cluster", tmp_path, "is a directory")
    refused("cluster", tmp_path / "nowhere.yaml", "not found")


def test_plan_pointing_at_a_device_names_the_cluster(tmp_path):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    path = tmp_path / "plan.yaml"
    path.write_text(PLAN.replace(str(LAB), "/dev/zero"))
    with pytest.raises(HetserveError, match="/dev/zero: is a device.*cluster file"):
        load_plan(path)


TRACE_CASES = [
    ("NaN timestamp", "azure", AZURE + "nan,10,5\n", ["line 3", "TIMESTAMP"]),
    (
        "negative tokens",
        "azure",
        AZURE + "2023-11-16 18:17:04.1,-10,5\n",
        ["line 3", "ContextTokens", "'-10'"],
    ),
    (
        "token count out of range",
        "azure",
        AZURE + "2023-11-16 18:17:04.1,10,99999999999\n",
        ["line 3", "GeneratedTokens"],
    ),
    ("missing columns", "azure", "when,prompt\n1,2\n", ["needs columns"]),
    (
        "mooncake NaN timestamp",
        "mooncake",
        '{"timestamp": 0, "input_length": 5, "output_length": 5}\n'
        '{"timestamp": NaN, "input_length": 5, "output_length": 5}\n',
        ["line 2", "timestamp must be a finite number"],
    ),
    ("mooncake not an object", "mooncake", "[1, 2]\n", ["line 1", "JSON object"]),
    ("mooncake missing field", "mooncake", '{"timestamp": 1}\n', ["line 1", "input_length"]),
    (
        "mooncake bad hash ids",
        "mooncake",
        '{"timestamp": 1, "input_length": 5, "output_length": 5, "hash_ids": [true]}\n',
        ["hash_ids"],
    ),
    ("mooncake deep nesting", "mooncake", "[" * 100_000 + "]" * 100_000 + "\n", ["line 1"]),
]


@pytest.mark.parametrize("label,fmt,text,needles", TRACE_CASES, ids=[c[0] for c in TRACE_CASES])
def test_bad_trace_rows_are_named(label, fmt, text, needles, tmp_path):
    trace = tmp_path / ("t.csv" if fmt == "azure" else "t.jsonl")
    trace.write_text(text)
    path = tmp_path / "w.yaml"
    path.write_text(f"arrivals: {{kind: trace, path: {trace.name}}}\n")
    message = refused("workload", path, "arrivals.path", str(trace), *needles)
    assert message.count(str(path)) == 1


def test_trace_that_is_not_utf8_names_its_line(tmp_path):
    (tmp_path / "t.csv").write_bytes(AZURE.encode() + b"2023-11-16 18:17:04.1,\xff10,5\n")
    path = tmp_path / "w.yaml"
    path.write_text("arrivals: {kind: trace, path: t.csv}\n")
    refused("workload", path, "not UTF-8", "line 3")


@pytest.mark.parametrize("target", ["directory", "device"])
def test_trace_that_is_not_a_file(target, tmp_path):
    where = tmp_path if target == "directory" else "/dev/zero"
    if target == "device" and not os.path.exists(where):
        pytest.skip("no /dev/zero")
    path = tmp_path / "w.yaml"
    path.write_text(f"arrivals: {{kind: trace, path: {where}, format: azure}}\n")
    refused(
        "workload", path, "arrivals.path", "not a regular file" if target == "device" else "is a directory"
    )


def test_good_trace_still_loads(tmp_path):
    (tmp_path / "t.csv").write_text(AZURE + "2023-11-16 18:17:05.1,0,7\n")
    path = tmp_path / "w.yaml"
    path.write_text("arrivals: {kind: trace, path: t.csv}\n")
    reqs = Workload.load(path).sample()
    assert list(reqs.arrival_s) == [0.0, 2.0]
    assert list(reqs.prompt_tokens) == [10, 1]  # an empty prompt counts as one token
    assert list(reqs.output_tokens) == [5, 7]


CONFIG_CASES = [
    ("llama zero hidden", {"model_type": "llama", "hidden_size": 0}, ["'hidden_size'", "from 1"]),
    (
        "opt zero sizes",
        {
            "model_type": "opt",
            "hidden_size": 0,
            "num_attention_heads": 0,
            "num_hidden_layers": 0,
            "ffn_dim": 0,
            "vocab_size": 0,
        },
        ["'hidden_size'"],
    ),
    (
        "bloom zero heads",
        {"model_type": "bloom", "n_embed": 64, "n_head": 0, "n_layer": 2, "vocab_size": 10},
        ["'n_head'"],
    ),
    (
        "bloom more heads than dims",
        {"model_type": "bloom", "n_embed": 4, "n_head": 8, "n_layer": 2, "vocab_size": 10},
        ["exceed hidden_size"],
    ),
    (
        "llama heads of 1e9",
        {
            "model_type": "llama",
            "hidden_size": 64,
            "num_attention_heads": 10**9,
            "num_hidden_layers": 2,
            "intermediate_size": 8,
            "vocab_size": 10,
        },
        ["'num_attention_heads'", "1,024"],
    ),
    ("infinite size", {"model_type": "llama", "hidden_size": float("inf")}, ["'hidden_size'"]),
    ("true as a size", {"model_type": "llama", "hidden_size": True}, ["'hidden_size'"]),
]


@pytest.mark.parametrize("label,cfg,needles", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_json(label, cfg, needles, tmp_path):
    path = tmp_path / "m" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(cfg))
    with pytest.raises(HetserveError) as info:
        load_model(str(path))
    message = str(info.value)
    assert message.count(str(path)) == 1 and "\n" not in message
    for needle in needles:
        assert needle in message


def test_deep_config_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(HetserveError, match="nested more than"):
        load_model(str(path))


def test_gamma_arrivals_are_bounded_work():
    rng = np.random.default_rng(0)
    t = _gamma_arrivals(rng, 50.0, 10.0, 100.0)  # the burstiest CV a file may give
    assert 0 < len(t) < 50 * 100 * 5 and (np.diff(t) >= 0).all() and t[-1] <= 100.0
    with pytest.raises(HetserveError, match="more than the 10,000,000"):
        _gamma_arrivals(rng, 1e9, 1.0, 100.0)


def test_sample_refuses_non_finite_overrides(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text(WORKLOAD)
    wl = Workload.load(path)
    for kwargs in ({"rate": float("inf")}, {"duration_s": float("nan")}, {"rate": -1.0}):
        with pytest.raises(HetserveError, match="out of range"):
            wl.sample(**kwargs)
    with pytest.raises(HetserveError, match="lower the rate or the duration"):
        wl.sample(rate=1e6, duration_s=1e6)


@pytest.mark.parametrize(
    "argv",
    [
        ["gpus", "--cluster", "{dir}/fifo"],
        ["simulate", "--plan", "{dir}/fifo", "--workload", "{dir}/w.yaml"],
        ["simulate", "--plan", "{dir}/p.yaml", "--workload", "{dir}/fifo"],
    ],
)
@pytest.mark.skipif(sys.platform == "win32", reason="no FIFOs")
def test_cli_gives_one_line(argv, tmp_path, run_cli):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "w.yaml").write_text(WORKLOAD)
    (tmp_path / "p.yaml").write_text(PLAN)
    code, out, err = run_cli(*[a.format(dir=tmp_path) for a in argv])
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{tmp_path}/fifo: is a named pipe (FIFO)" in err


def test_a_value_with_a_line_break_is_named_on_one_line(tmp_path):
    """pydantic quotes a union's tag in its message; a tag with a line break must not split the one-line
    error (found by the loader fuzz at 3,000 examples: kind: "l\\normal")."""
    from hetserve.specs.workloads import Workload

    path = tmp_path / "w.yaml"
    path.write_text(
        'arrivals: {kind: poisson, rate: 1}\nprompt: {kind: "l\\normal", mean: 100}\n'
        "output: {kind: fixed, value: 10}\nslo: {ttft_ms: 1000}\n"
    )
    with pytest.raises(HetserveError) as e:
        Workload.load(path)
    assert "\n" not in str(e.value) and "prompt" in str(e.value)
