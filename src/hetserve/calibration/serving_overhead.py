"""The serving runtime's time per engine step on this machine, for ``hetserve profile``.

``hetserve serve --plan`` runs the engine behind an API process and a driver, with the model in worker
processes: every step also pays the driver's loop, the messages to and from the worker and the API's
streaming of each token. The in-process engine's steps (``LLMEngine.step``, the rows the profile fits)
contain none of it, so factors fitted to them alone time a served plan too fast. The overhead is
measured as a difference at one request at a time, in one format: each prompt goes through ``serve
--plan`` with one worker (each streamed token timed at the client, over 127.0.0.1) and then through the
engine in-process (each decode step timed) before the next prompt, so a change in the machine's load
during the measurement reaches both sides of a pair; the overhead is the median of the pairs'
differences. The runtime's messages carry token ids, not tensors, so the overhead does not depend on
the format the worker computes in, and the profile adds it to every format's rows.

A request also pays the serving stack once before its first step (the API's parsing and tokenising,
the hand-over to the driver and the worker): the same pairs give it, as the difference of the first
token at the client and the first step in-process, less the time per step that first step pays like
every other (``ServedSteps.request_overhead_ms``, every format's ``request_overhead_ms``).

On the 2-core test machine (one torch thread, SmolLM2-135M, 128-token prompts, 32 output tokens, six
requests) two measurements with all served requests first gave 10.8 ms per step (58.4 ms per token
served vs 47.6 ms per step in-process; 8.8 ms in bf16) and 15.7 ms (67.2 vs 51.5; the served times rose
from 60 to 74 ms during that run while the machine's load changed): hence the pairs.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import HetserveError
from ..specs.calibration import ServedSteps
from ..vocabulary import ENGINE_DTYPES, RunDType

#: Requests timed each way: the median of six has a spread of about 1 ms on the test machine.
REQUESTS = 6
PROMPT_TOKENS = 128
OUTPUT_TOKENS = 32
#: Seconds the server may take to answer /health (it loads the model in its worker first).
STARTUP_TIMEOUT_S = 180.0
#: A catalogue GPU type for the one-worker plan: it only has to pass the plan's checks (memory, KV
#: format); the worker runs on this machine's CPU whatever the plan's cluster says.
PLAN_GPU = "l4"


def serving_available() -> bool:
    """Whether the serving runtime's packages (``hetserve[serve]``) are installed."""
    try:
        import fastapi  # noqa: F401
        import httpx  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        return False
    return True


def _write_plan(work: Path, model: str, layers: int, run_dtype: RunDType) -> Path:
    import yaml

    (work / "cluster.yaml").write_text(yaml.safe_dump({"nodes": [{"name": "box", "gpu": PLAN_GPU}]}))
    plan = {
        "version": 1,
        "name": "profile-one-worker",
        "model": model,
        "cluster": "cluster.yaml",
        "servers": [{"name": "w0", "node": "box", "gpus": [0], "layers": [0, layers], "kv_dtype": run_dtype}],
        "instances": [{"name": "one", "role": "mixed", "chain": ["w0"], "max_batch_size": 1}],
    }
    path = work / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def _served_ms(url: str, model: str, ids: list[int], output: int = OUTPUT_TOKENS) -> tuple[float, float]:
    """A prompt served alone: its time to first token (from sending it), and its time per output token,
    (last token - first token) / (tokens - 1)."""
    import httpx

    body = {
        "model": model,
        "prompt": ids,
        "max_tokens": output,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    times, tokens = [], 0
    sent = time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as resp:
        if resp.status_code != 200:
            raise HetserveError(f"profile: the one-worker server answered HTTP {resp.status_code}")
        for line in resp.iter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            event = json.loads(line[5:])
            now = time.perf_counter()
            if any(choice.get("text") for choice in event.get("choices") or ()):
                times.append(now)
            tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
    if tokens < 2 or len(times) < 2:
        raise HetserveError(f"profile: the one-worker server streamed {tokens} token(s), expected {output}")
    return (times[0] - sent) * 1e3, (times[-1] - times[0]) / (tokens - 1) * 1e3


def _serve(plan: Path, threads: int):
    from ..runtime.cluster.launch import free_port

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hetserve.cli",
            "serve",
            "--plan",
            str(plan),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--threads",
            str(threads),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return server, f"http://127.0.0.1:{port}"


def _wait_healthy(server, url: str) -> None:
    import httpx

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if server.poll() is not None:
            tail = (server.stderr.read() or "")[-1500:]
            raise HetserveError(
                f"profile: `hetserve serve --plan` (one worker) exited before answering:\n{tail}"
            )
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise HetserveError(
                f"profile: `hetserve serve --plan` (one worker) did not start in {STARTUP_TIMEOUT_S:.0f} s"
            )
        time.sleep(0.2)


def _stop(server) -> None:
    server.send_signal(signal.SIGINT)
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _engine_ms(engine, ids: list[int], output: int = OUTPUT_TOKENS) -> tuple[float, float]:
    """A prompt run alone in the in-process ``engine``: its first step (the prefill and the first token),
    and its mean decode step."""
    from ..runtime import SamplingParams

    start = time.perf_counter()
    engine.add_request(ids, SamplingParams(max_tokens=output, temperature=0.0, ignore_eos=True))
    engine.step()
    first = time.perf_counter() - start
    steps = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - start)
    return first * 1e3, statistics.mean(steps) * 1e3


def measure_serving_overhead(model: str, run_dtype: RunDType, threads: int, log) -> ServedSteps:
    """One request at a time through ``serve --plan`` (one worker, ``threads`` torch threads) and through
    the engine in-process, in pairs (a prompt served, then the same prompt in-process), in ``run_dtype``.
    The idle side of a pair waits on its queues without using the CPU."""
    import torch

    from ..runtime import EngineConfig, LLMEngine
    from ..specs.models import load_model

    spec = load_model(model)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(100, spec.vocab_size - 1, size=PROMPT_TOKENS).tolist() for _ in range(REQUESTS)]
    served, in_process, served_first, first_step = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="hetserve-profile-") as work:
        server, url = _serve(_write_plan(Path(work), model, spec.num_layers, run_dtype), threads)
        try:
            torch.set_num_threads(threads)
            engine = LLMEngine.from_model(
                model, EngineConfig(dtype=ENGINE_DTYPES[run_dtype], max_batch_size=1)
            )
            _wait_healthy(server, url)
            _served_ms(url, model, prompts[0][:8], output=8)  # warm-up, both sides
            _engine_ms(engine, prompts[0][:8], output=8)
            for ids in prompts:
                ttft, tpot = _served_ms(url, model, ids)
                first, step = _engine_ms(engine, ids)
                served.append(tpot)
                in_process.append(step)
                served_first.append(ttft)
                first_step.append(first)
        finally:
            _stop(server)
    steps = ServedSteps(
        dtype=run_dtype,
        prompt=PROMPT_TOKENS,
        output=OUTPUT_TOKENS,
        served_tpot_ms=[round(t, 3) for t in served],
        engine_step_ms=[round(t, 3) for t in in_process],
        served_ttft_ms=[round(t, 3) for t in served_first],
        engine_first_step_ms=[round(t, 3) for t in first_step],
    )
    log(
        f"  serving ({run_dtype}, serve --plan with one worker, {REQUESTS} requests alone, each paired with "
        f"the engine in-process): {statistics.median(served):.1f} ms per token vs "
        f"{statistics.median(in_process):.1f} ms per step: +{steps.overhead_ms:.1f} ms per step; first token "
        f"{statistics.median(served_first):.1f} ms vs a first step of {statistics.median(first_step):.1f} ms: "
        f"+{steps.request_overhead_ms:.1f} ms per request beyond a step's"
    )
    return steps
