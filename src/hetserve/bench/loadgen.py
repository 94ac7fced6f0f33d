"""A load generator for any OpenAI-compatible server: replay a workload, measure on the client.

The workload file (``hetserve.specs.workloads``) gives arrival times (Poisson, Gamma or a trace) and
prompt/output lengths. Each request is sent at its arrival time as a streamed ``/v1/completions`` (or
``/v1/chat/completions``) call with a prompt synthesised to about the sampled number of tokens (random
common words: about one token each in byte-level BPE vocabularies) and ``max_tokens`` = the sampled
output length; ``ignore_eos: true`` (honoured by hetserve and vLLM) makes the server produce exactly that
many. The client timestamps the first streamed token and every later one; the token counts come from
the server's ``usage`` (``stream_options.include_usage``) when it reports it.

The records feed ``hetserve.sim.metrics.summarise``, so the summary has the names and definitions of
``hetserve simulate``'s (TTFT/TPOT/E2E percentiles, throughput, goodput, SLO attainment), plus the
client-side inter-token latency (``itl_*_ms``) and the errors seen. Runs are bounded: at most
``max_requests`` requests and ``timeout_s`` seconds in all (unfinished requests count as dropped).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..errors import HetserveError
from ..sim.metrics import Records, summarise
from ..specs.workloads import Workload

#: Short common English words; with a leading space each is a single token in the usual BPE vocabularies.
WORDS = (
    "the of and to in is it that was for on are as with his they at be this from have or by one had "
    "not but what all were when we there can an your which their said if do will each about how up out "
    "them then she many some so these would other into has more her two like him see time could no make "
    "than first been its who now people my made over did down only way find use may water long little "
    "very after words called just where most know"
).split()

#: Summary keys of ``summarise`` that describe a simulated cluster, not a measured server.
_SIMULATION_ONLY = (
    "cost_per_hour",
    "cost_per_mtok",
    "energy_j",
    "joules_per_token",
    "utilisation",
    "peak_kv_fraction",
    "bytes_transferred",
    "gpus",
    "iterations",
)


@dataclass
class BenchConfig:
    url: str
    workload: Workload
    model: str | None = None  # None: the first model the server lists
    duration_s: float | None = None  # arrivals window; None: the workload's (a trace: all of it)
    rate: float | None = None  # override the mean arrival rate
    seed: int = 0
    max_requests: int = 1000
    timeout_s: float | None = None  # the whole run; None: arrival span + 600 s
    endpoint: Literal["completions", "chat"] = "completions"
    ignore_eos: bool = True
    api_key: str | None = None  # sent as 'Authorization: Bearer KEY' (a server started with --api-key)


@dataclass
class RequestResult:
    arrival: float  # scheduled send time, seconds from the start
    prompt_tokens: int  # the server's count when reported, else the sampled length
    output_tokens: int = 0
    first_token: float = float("nan")
    finish: float = float("nan")
    token_times: list[float] = field(default_factory=list)
    error: str | None = None


def base_url(url: str) -> str:
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def synthesise_prompt(num_tokens: int, rng: random.Random) -> str:
    """About ``num_tokens`` tokens of random common words."""
    return " ".join(rng.choice(WORDS) for _ in range(max(1, num_tokens)))


async def _discover_model(client, url: str) -> str:
    try:
        resp = await client.get(f"{url}/v1/models")
        data = resp.json()["data"]
        return data[0]["id"]
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the user
        raise HetserveError(
            f"{url}/v1/models: cannot list the server's models ({exc}); is the server up? "
            "pass --model to skip this"
        ) from None


async def _one(
    client,
    url: str,
    cfg: BenchConfig,
    model: str,
    prompt: str,
    max_tokens: int,
    result: RequestResult,
    start: float,
) -> None:
    delay = start + result.arrival - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    body: dict = {
        "model": model,
        "max_tokens": int(max_tokens),
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.endpoint == "chat":
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/v1/completions", prompt
    chunks = 0
    try:
        async with client.stream("POST", url + path, json=body) as resp:
            if resp.status_code != 200:
                raw = await resp.aread()
                try:
                    message = json.loads(raw)["error"]["message"]
                except Exception:  # noqa: BLE001 - not an OpenAI error body
                    message = raw.decode(errors="replace")[:200]
                result.error = f"HTTP {resp.status_code}: {message}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = f"stream error: {event['error'].get('message')}"
                    return
                now = time.perf_counter() - start
                for choice in event.get("choices") or ():
                    text = (
                        choice.get("text")
                        if cfg.endpoint == "completions"
                        else (choice.get("delta") or {}).get("content")
                    )
                    if text:
                        chunks += 1
                        result.token_times.append(now)
                        if np.isnan(result.first_token):
                            result.first_token = now
                usage = event.get("usage")
                if usage:
                    result.prompt_tokens = int(usage.get("prompt_tokens", result.prompt_tokens))
                    result.output_tokens = int(usage.get("completion_tokens", chunks))
        result.finish = time.perf_counter() - start
        result.output_tokens = result.output_tokens or chunks
        if np.isnan(result.first_token):
            result.error = "the server streamed no tokens"
    except Exception as exc:  # noqa: BLE001 - a failed request is a measurement, not a crash
        result.error = f"{type(exc).__name__}: {exc}"


async def run_bench_async(
    cfg: BenchConfig,
    on_start: Callable[[int], None] | None = None,
    on_done: Callable[[RequestResult], None] | None = None,
) -> tuple[list[RequestResult], dict]:
    """Replay the workload; ``on_start(n)`` once the ``n`` requests are known, ``on_done(result)`` as each
    request ends (for a progress display)."""
    import httpx

    if cfg.max_requests < 1:
        raise HetserveError(f"max_requests={cfg.max_requests} must be at least 1")
    reqs = cfg.workload.sample(seed=cfg.seed, duration_s=cfg.duration_s, rate=cfg.rate)
    n = min(len(reqs), cfg.max_requests)
    if n == 0:
        raise HetserveError("no request arrives within the duration; raise --duration or the rate")
    arrivals = reqs.arrival_s[:n] - reqs.arrival_s[0]
    rng = random.Random(cfg.seed)
    prompts = [synthesise_prompt(int(p), rng) for p in reqs.prompt_tokens[:n]]
    results = [RequestResult(float(a), int(p)) for a, p in zip(arrivals, reqs.prompt_tokens[:n])]
    url = base_url(cfg.url)
    limit = cfg.timeout_s if cfg.timeout_s is not None else float(arrivals[-1]) + 600.0
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else None
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(limit, connect=30.0), limits=limits, headers=headers
    ) as client:
        model = cfg.model or await _discover_model(client, url)
        if on_start is not None:
            on_start(n)
        start = time.perf_counter()
        tasks = [
            asyncio.ensure_future(_one(client, url, cfg, model, p, int(o), r, start))
            for p, o, r in zip(prompts, reqs.output_tokens[:n], results)
        ]
        if on_done is not None:
            for task, r in zip(tasks, results):
                task.add_done_callback(lambda _t, r=r: on_done(r))
        done, pending = await asyncio.wait(tasks, timeout=limit)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        wall = time.perf_counter() - start
    for r in results:
        if r.error is None and np.isnan(r.finish):
            r.error = f"unfinished after the {limit:g} s time limit"
    return results, _summary(results, cfg, model, url, wall, int(len(reqs)))


def run_bench(
    cfg: BenchConfig,
    on_start: Callable[[int], None] | None = None,
    on_done: Callable[[RequestResult], None] | None = None,
) -> tuple[list[RequestResult], dict]:
    """Replay the workload against the server; (per-request results, summary)."""
    return asyncio.run(run_bench_async(cfg, on_start, on_done))


def to_records(results: list[RequestResult], url: str = "") -> Records:
    n = len(results)
    ok = np.array([r.error is None for r in results])
    return Records(
        n=n,
        arrival=np.array([r.arrival for r in results]),
        prompt=np.array([r.prompt_tokens for r in results]),
        output=np.array([r.output_tokens for r in results]),
        entry=[url] * n,
        decode=[url] * n,
        first_token=np.array([r.first_token if r.error is None else np.nan for r in results]),
        finish=np.array([r.finish if r.error is None else np.nan for r in results]),
        dropped=~ok,
    )


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _summary(
    results: list[RequestResult], cfg: BenchConfig, model: str, url: str, wall: float, sampled: int
) -> dict:
    rec = to_records(results, url)
    done = rec.completed
    makespan = float(np.nanmax(rec.finish) - rec.arrival.min()) if done.any() else wall
    s = summarise(
        rec,
        cfg.workload.slo,
        cost_per_hour=0.0,
        energy_j=0.0,
        makespan=makespan,
        server_util={},
        peak_kv={},
        bytes_transferred=0.0,
        gpus=0,
        iterations=0,
    ).as_dict()
    for key in _SIMULATION_ONLY:
        s.pop(key, None)
    gaps = [b - a for r in results if r.error is None for a, b in zip(r.token_times, r.token_times[1:])]
    s.update(
        {
            "itl_p50_ms": _ms(_pct(gaps, 50)),
            "itl_p90_ms": _ms(_pct(gaps, 90)),
            "itl_p99_ms": _ms(_pct(gaps, 99)),
            "errors": dict(Counter(r.error for r in results if r.error is not None).most_common()),
            "sampled_requests": sampled,
            "url": url,
            "model": model,
            "workload": cfg.workload.name,
            "endpoint": cfg.endpoint,
            "wall_s": wall,
        }
    )
    return s


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3
