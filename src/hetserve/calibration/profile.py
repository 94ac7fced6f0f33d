"""``hetserve profile``: measure this machine's torch device and describe it as a GPU type.

Measured with torch itself, in the thread count the engine serves with and in each format the engine
is asked to serve in (``--dtypes``: fp32 and bf16 unless told otherwise; the first is the main one):
- matrix products over a sweep of row counts (1 to 1,024) at the served model's shapes, and one large
  square product (the format's peak), in each format;
- attention (``scaled_dot_product_attention``) for prefill over prompt lengths and decode over contexts,
  in the main format;
- memory bandwidth (a large tensor copy: bytes read plus written per second);
- between two processes on this machine (gloo over 127.0.0.1, as the runtime's workers talk): an
  all-reduce and a point-to-point tensor send (the primitive KV hand-offs and pipeline hops use) over
  a sweep of sizes, fitted to a latency plus bytes over bandwidth;
- the real engine (``LLMEngine`` on SmolLM2-135M) over batch sizes and prompt lengths, in each format:
  whole-batch prefill and mean decode step, the full-model rows ``hetserve calibrate`` fits;
- the serving runtime's time per step and per request (serving_overhead.py; not with ``--quick``): one
  request at a time through ``serve --plan`` with one worker against the engine in-process; the time
  per step is added to every engine row, the time per request is every format's
  ``request_overhead_ms``.

The device entry takes its peak FLOPS per format, bandwidth and fabric from the micro-benchmarks; its
cost factors are then fitted to the engine rows of each format apart (per_dtype.py), so the simulator
times a server with the factors of the format it computes in: a CPU's bf16 runs a large product about
twice as fast as fp32 but has no native matrix-vector path, so one factor set cannot describe both.
"""

from __future__ import annotations

import itertools
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import HetserveError
from ..specs.calibration import (
    AttentionPoint,
    EngineRow,
    FactorFit,
    FitError,
    GemmPoint,
    GPUCalibration,
    ProfileFile,
    ProfileMeasurements,
    TransferPoint,
)
from ..specs.gpus import CostFactors, GPUSpec
from ..vocabulary import RunDType
from .serving_overhead import measure_serving_overhead, serving_available

MODEL = "smollm2-135m"
#: torch's name of each format the engine serves in -> the cost model's.
TORCH_DTYPES: dict[str, RunDType] = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
#: The formats profiled unless told otherwise: fp32 (the main one) and bf16, the formats the example
#: plans serve in; fp16's matrix products are several times slower than fp32's on CPUs without native
#: fp16 arithmetic (a 64-token prefill of SmolLM2-135M: 0.86 s vs 0.28 s on the 2-core test machine),
#: so it is measured on request only.
DEFAULT_DTYPES = ("float32", "bfloat16")


def _timed(fn: Callable[[], object], *, repeats: int, sync: Callable[[], None]) -> float:
    """Median seconds of ``fn`` after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _sync_for(device):
    import torch

    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def measure_gemm(device, dtype, shapes: list[tuple[int, int, int]], repeats: int) -> list[GemmPoint]:
    import torch

    sync = _sync_for(device)
    out = []
    for rows, k, n in shapes:
        a = torch.randn(rows, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        with torch.inference_mode():
            t = _timed(lambda a=a, b=b: a @ b, repeats=repeats, sync=sync)
        out.append(
            GemmPoint(
                dtype=TORCH_DTYPES[str(dtype).removeprefix("torch.")],
                rows=rows,
                k=k,
                n=n,
                ms=t * 1e3,
                tflops=2 * rows * k * n / t / 1e12,
            )
        )
    return out


def measure_attention(device, dtype, heads: int, head_dim: int, quick: bool) -> list[AttentionPoint]:
    import torch
    import torch.nn.functional as F

    sync = _sync_for(device)
    out = []
    prompts = (64, 512) if quick else (64, 256, 1024)
    contexts = (256, 2048) if quick else (128, 512, 2048)
    with torch.inference_mode():
        for p in prompts:
            q = torch.randn(1, heads, p, head_dim, device=device, dtype=dtype)
            t = _timed(
                lambda q=q: F.scaled_dot_product_attention(q, q, q, is_causal=True), repeats=3, sync=sync
            )
            out.append(AttentionPoint(phase="prefill", tokens=p, context=p, ms=t * 1e3))
        for c in contexts:
            q = torch.randn(8, heads, 1, head_dim, device=device, dtype=dtype)
            kv = torch.randn(8, heads, c, head_dim, device=device, dtype=dtype)
            t = _timed(lambda q=q, kv=kv: F.scaled_dot_product_attention(q, kv, kv), repeats=5, sync=sync)
            out.append(AttentionPoint(phase="decode", tokens=8, context=c, ms=t * 1e3))
    return out


def measure_copy(device, quick: bool) -> float:
    """GB/s of a large copy (bytes read + bytes written)."""
    import torch

    n = (64 if quick else 256) * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = _timed(lambda: dst.copy_(src), repeats=5, sync=_sync_for(device))
    return 2 * src.numel() * 4 / t / 1e9


def _comm_worker(rank: int, port: int, sizes: list[int], repeats: int, threads: int, queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=_timeout()
    )
    try:
        results = {"allreduce": [], "p2p": []}
        for nbytes in sizes:
            x = torch.zeros(max(1, nbytes // 4))
            for kind in ("allreduce", "p2p"):
                times = []
                for i in range(repeats + 1):
                    dist.barrier()
                    start = time.perf_counter()
                    if kind == "allreduce":
                        dist.all_reduce(x)
                    elif rank == 0:
                        dist.send(x, 1)
                        dist.recv(x[:1], 1)  # the receiver's one-element ack closes the clock
                    else:
                        dist.recv(x, 0)
                        dist.send(x[:1], 0)
                    if i:
                        times.append(time.perf_counter() - start)
                results[kind].append((x.numel() * 4, statistics.median(times)))
        if rank == 0:
            queue.put(results)
    finally:
        dist.destroy_process_group()


def _timeout():
    from datetime import timedelta

    return timedelta(seconds=120)


def two_processes(target, args: tuple, timeout: float, what: str):
    """Run ``target(rank, port, *args, queue)`` in two spawned processes that meet over gloo on
    127.0.0.1 (``port``); what rank 0 puts on the queue."""
    import multiprocessing as mp

    from ..runtime.cluster.launch import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(rank, port, *args, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        return queue.get(timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - a worker that died leaves the queue empty
        raise HetserveError(f"profile: {what} failed ({exc})") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def measure_comm(quick: bool, threads: int) -> tuple[list[TransferPoint], list[TransferPoint]]:
    """(all-reduce, point-to-point) times between two local processes."""
    sizes = [2**k for k in ((12, 16, 20, 22) if quick else (10, 12, 14, 16, 18, 20, 22, 24))]
    results = two_processes(
        _comm_worker, (sizes, 5 if quick else 9, threads), 300, "the two-process communication test"
    )
    ar = [TransferPoint(bytes=b, ms=t * 1e3) for b, t in results["allreduce"]]
    # the p2p clock spans the message and a 4-byte ack back: the ack costs one latency
    p2p = [TransferPoint(bytes=b, ms=t * 1e3) for b, t in results["p2p"]]
    return ar, p2p


def fit_line(points: list[TransferPoint]) -> tuple[float, float]:
    """(seconds of fixed cost, seconds per byte) of a least-squares line through the points."""
    x = np.array([p.bytes for p in points], dtype=float)
    y = np.array([p.ms * 1e-3 for p in points])
    slope, intercept = np.polyfit(x, y, 1)
    return max(float(intercept), 0.0), max(float(slope), 1e-15)


def engine_shapes(quick: bool, tp: int = 1) -> tuple[list[tuple[int, int]], int]:
    """The (batch, prompt) shapes the engine is timed at and the output length of each request. A
    tensor-parallel engine is timed at the corners of the grid: its rows inform the collectives only."""
    batches = (1, 2, 4) if quick else (1, 2, 4, 8)
    prompts = (16, 64, 128) if quick else (16, 64, 256)
    output = 8 if quick else 32
    if tp > 1:
        return list(itertools.product((batches[0], batches[-1]), (prompts[0], prompts[-1]))), output
    shapes = list(itertools.product(batches, prompts))
    if not quick:
        shapes += [(1, 512), (1, 1024)]  # long prompts alone: the quadratic attention term
    return shapes, output


def time_engine(
    engine, shapes, output: int, tp: int, dtype: RunDType, log=lambda msg: None
) -> list[EngineRow]:
    """Whole-batch prefill and mean decode step of ``engine`` at each (batch, prompt) of ``shapes``
    (twice each, the median kept; the same random prompts on every tensor-parallel rank)."""
    from ..runtime import SamplingParams

    rng = np.random.default_rng(0)
    vocab = engine.model.config.vocab_size
    rows = []
    for batch, prompt in shapes:
        prefill, decode = [], []
        for _repeat in range(2):
            for _ in range(batch):
                ids = rng.integers(100, vocab - 1, size=prompt).tolist()
                engine.add_request(ids, SamplingParams(max_tokens=output, ignore_eos=True))
            start = time.perf_counter()
            engine.step()  # the whole batch's prompts fit one step's token budget
            prefill.append(time.perf_counter() - start)
            steps = []
            while engine.has_unfinished_requests():
                start = time.perf_counter()
                engine.step()
                steps.append(time.perf_counter() - start)
            decode.append(statistics.mean(steps))
        rows.append(
            EngineRow(
                model=MODEL,
                tp=tp,
                batch=batch,
                prompt=prompt,
                output=output,
                prefill_ms=statistics.median(prefill) * 1e3,
                decode_ms=statistics.median(decode) * 1e3,
                dtype=dtype,
            )
        )
        log(engine_row_line(rows[-1]))
    return rows


def engine_row_line(row: EngineRow) -> str:
    """One engine measurement as the profile's log shows it."""
    return (
        f"  engine {row.dtype}{f' TP {row.tp}' if row.tp > 1 else ''} batch {row.batch:>2} x "
        f"{row.prompt:>4} tokens: prefill {row.prefill_ms:7.1f} ms, decode step {row.decode_ms:6.1f} ms"
    )


def _engine_config(shapes) -> dict:
    """Engine limits that let each shape's whole batch prefill in one step."""
    batch = max(b for b, _ in shapes)
    return dict(max_batch_size=batch, max_batch_tokens=batch * max(p for _, p in shapes) + 64)


def measure_engine(dtype: str, threads: int, quick: bool, log) -> list[EngineRow]:
    import torch

    from ..runtime import EngineConfig, LLMEngine

    torch.set_num_threads(threads)
    shapes, output = engine_shapes(quick)
    engine = LLMEngine.from_model(MODEL, EngineConfig(dtype=dtype, **_engine_config(shapes)))
    return time_engine(engine, shapes, output, 1, TORCH_DTYPES[dtype], log)


def _tp_engine_worker(rank: int, port: int, dtype: str, threads: int, quick: bool, queue) -> None:
    import torch
    import torch.distributed as dist

    from ..runtime import EngineConfig, LLMEngine
    from ..runtime.model.source import load_model as load_weights

    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=_timeout()
    )
    try:
        shapes, output = engine_shapes(quick, tp=2)
        model, _ = load_weights(MODEL, dtype=dtype, tp_rank=rank, tp_size=2, tokenizer=False)
        engine = LLMEngine(model, None, EngineConfig(**_engine_config(shapes)))
        rows = time_engine(engine, shapes, output, 2, TORCH_DTYPES[dtype])
        if rank == 0:
            queue.put([r.model_dump() for r in rows])
    finally:
        dist.destroy_process_group()


def measure_engine_tp(dtype: str, threads: int, quick: bool, log) -> list[EngineRow]:
    """The engine split over two processes (tensor parallel 2, gloo over 127.0.0.1 as the runtime's
    workers all-reduce): its steps carry the all-reduces as a served TP step meets them, between layers
    of real work, which a sweep of back-to-back all-reduces does not (on the 2-core test machine an
    all-reduce inside a TP 2 decode step took ~1.8 ms, one alone after a barrier ~0.45 ms)."""
    found = two_processes(_tp_engine_worker, (dtype, threads, quick), 900, "the two-process engine (TP 2)")
    rows = [EngineRow.model_validate(r) for r in found]
    for r in rows:  # timed in other processes: logged here
        log(engine_row_line(r))
    return rows


def run_profile(
    *,
    device: str,
    name: str | None,
    quick: bool,
    threads: int,
    dtypes: Sequence[str] = DEFAULT_DTYPES,
    log=lambda msg: None,
) -> ProfileFile:
    """Profile ``device`` in each of ``dtypes`` (torch names; the first is the main format: its factors
    also time servers in a format not measured here)."""
    import torch

    from ..specs.models import load_model
    from .fit import fit_gemm_curve
    from .measurements import engine_rows
    from .per_dtype import calibrate_gpu

    if threads < 1:
        raise HetserveError(f"--threads={threads} must be >= 1")
    unknown = [d for d in dtypes if d not in TORCH_DTYPES]
    if not dtypes or unknown or len(set(dtypes)) < len(dtypes):
        raise HetserveError(
            f"--dtypes {' '.join(dtypes)}: give each of {', '.join(TORCH_DTYPES)} at most once (the first "
            "is the main format)"
        )
    try:
        dev = torch.device(device)
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError) as exc:
        raise HetserveError(f"--device={device}: torch cannot use it ({str(exc).splitlines()[0]})") from None
    torch.set_num_threads(threads)
    runs = [TORCH_DTYPES[d] for d in dtypes]  # the formats as the cost model names them
    main = runs[0]
    model = load_model(MODEL)
    h, f = model.hidden_size, model.intermediate_size
    rows = (1, 16, 256) if quick else (1, 4, 16, 64, 256, 1024)
    shapes = [(r, h, f) for r in rows] + [(r, f, h) for r in rows]
    shapes.append((1024, 1024, 1024) if quick else (2048, 2048, 2048))
    log(f"profiling {device} ({', '.join(dtypes)}; {threads} thread(s)){' quick' if quick else ''}")
    gemm: list[GemmPoint] = []
    for torch_name in dtypes:
        gemm += measure_gemm(dev, getattr(torch, torch_name), shapes, repeats=3 if quick else 5)
    if not {"bf16", "fp16"} & set(runs) and not quick:
        gemm += measure_gemm(dev, torch.bfloat16, [(1024, 1024, 1024)], repeats=3)
    tflops: dict[str, float] = {}
    for g in gemm:
        tflops[g.dtype] = max(tflops.get(g.dtype, 0.0), g.tflops)
    if "bf16" not in tflops and "fp16" not in tflops:
        tflops["bf16"] = tflops[main]  # the cost model needs a 16-bit peak; none was measured
    log("  matrix products: peak " + ", ".join(f"{d} {tflops[d] * 1e3:.1f} GFLOPS" for d in runs))
    attention = measure_attention(dev, getattr(torch, dtypes[0]), model.num_heads, model.head_dim, quick)
    copy = measure_copy(dev, quick)
    log(f"  memory copy: {copy:.1f} GB/s")
    allreduce, p2p = measure_comm(quick, threads)
    # A byte between processes is copied at least once: a fit faster than the memory copy (a noisy sweep
    # whose larger messages were no slower) is held to the copy's bandwidth.
    at_copy = 1 / (copy * 1e9)
    ar_fixed, ar_per_byte = fit_line(allreduce)
    p2p_fixed, p2p_per_byte = fit_line(p2p)
    ar_per_byte, p2p_per_byte = max(ar_per_byte, at_copy), max(p2p_per_byte, at_copy)
    log(
        f"  two processes: all-reduce {ar_fixed * 1e6:.0f} us + {1 / ar_per_byte / 1e9:.2f} GB/s, "
        f"send {p2p_fixed * 1e6:.0f} us + {1 / p2p_per_byte / 1e9:.2f} GB/s"
    )
    # hetserve's engine runs on the CPU: its steps describe a CPU device only
    engine = []
    if dev.type == "cpu":
        for torch_name in dtypes:
            engine += measure_engine(torch_name, threads, quick, log)
        engine += measure_engine_tp(dtypes[0], threads, quick, log)
    serving = None
    if engine and quick:
        log("  serving: not measured with --quick (the factors describe the engine in-process)")
    elif engine and not serving_available():
        log(
            "  serving: not measured, `pip install hetserve[serve]` to (the factors describe the engine in-process)"
        )
    elif engine:
        serving = measure_serving_overhead(MODEL, main, threads, log)
    measurements = ProfileMeasurements(
        gemm=gemm,
        attention=attention,
        copy_gb_per_s=copy,
        allreduce=allreduce,
        kv_handoff=p2p,
        engine=engine,
        serving=serving,
    )

    memory_gb = _memory_gb(dev)
    label = name or ("this-cpu" if dev.type == "cpu" else f"this-{dev.type}")
    measured = (
        f"measured by hetserve profile on {platform.node() or 'this machine'}, {time.strftime('%Y-%m-%d')}"
    )
    fabric_gb_per_s = 1 / p2p_per_byte / 1e9
    # the micro-benchmarks' factors per format: the GEMM curve against that format's peak, and the
    # collectives (a two-rank ring all-reduce is 2 latency steps and one buffer over the link)
    base: dict[RunDType, CostFactors] = {}
    curve_error: dict[RunDType, FitError] = {}
    for run in runs:
        points = [g for g in gemm if g.dtype == run]
        compute, half_rows, exponent, gemm_ape = fit_gemm_curve(points, tflops[run])
        log(
            f"  GEMM efficiency curve ({run}): {compute:.2f} x (rows / (rows + {half_rows:g})) ** "
            f"{exponent:.2f} (median error {gemm_ape:.1f}%)"
        )
        base[run] = CostFactors(
            compute=compute,
            gemm_half_rows=half_rows,
            gemm_rows_exponent=exponent,
            collective=min(1.0, 1 / ar_per_byte / 1e9 / fabric_gb_per_s),
            allreduce_latency_us=ar_fixed / 2 * 1e6,
        )
        curve_error[run] = FitError(
            n=len(points), median_ape_pct=round(gemm_ape, 2), p90_ape_pct=round(gemm_ape, 2)
        )
    device_spec = GPUSpec(
        name=label,
        vendor="nvidia" if dev.type == "cuda" else "other",
        memory_gb=memory_gb,
        memory_bw_gb_per_s=copy,
        tflops=tflops,
        fabric={"kind": "none", "gb_per_s": fabric_gb_per_s, "latency_us": ar_fixed / 2 * 1e6},
        tdp_w=_tdp(dev),
        price_per_hour=0.0,
        weight_dtypes=[],
        kv_dtypes=["fp32", "bf16", "fp16"],
        efficiency=base[main],
        efficiency_by_run_dtype={run: base[run] for run in runs[1:]},
        sources={
            "memory_gb": measured + " (total memory)",
            "memory_bw_gb_per_s": measured + " (tensor copy, read + write)",
            "tflops": measured + f" (torch matmul, {threads} thread(s))",
            "fabric": measured + " (gloo between two local processes)",
            "tdp_w": "not measured (no power counters read); set tdp_w in a cluster file before planning for "
            "power",
            "price_per_hour": "0: a machine already owned",
        },
        notes=f"{platform.processor() or platform.machine()}; torch {torch.__version__}; the engine "
        f"measured in {', '.join(dtypes)} (main: {dtypes[0]})",
    )
    if engine:
        # the engine's steps as served: each plus the serving runtime's time per step
        model_rows = engine_rows(engine, device_spec, "hetserve", "profile", measurements.serving_overhead_ms)
        # every factor from the engine's own steps, per format: the micro-benchmarks' GEMM curve (the
        # starting point) leaves the engine's steps 18% off at the median on this kind of CPU, its own
        # fit ~8%
        defaults = device_spec.model_copy(update={"efficiency": CostFactors(), "efficiency_by_run_dtype": {}})
        device_spec = with_collectives(device_spec, [r for r in model_rows if r.run_dtype == main])
        if serving is not None:
            device_spec = with_factors(device_spec, request_overhead_ms=round(serving.request_overhead_ms, 3))
        log(
            f"  all-reduce inside a TP 2 step: {device_spec.efficiency.allreduce_latency_us:.0f} us per "
            f"latency step ({device_spec.efficiency.allreduce})"
        )
        calibration = calibrate_gpu(
            model_rows, device_spec, engine="hetserve", source="profile", main=main, baseline=defaults
        )
        for run, fit in [(main, calibration), *calibration.per_dtype.items()]:
            log(
                f"  engine fit ({run}): median {fit.fit.median_ape_pct:.1f}% (p90 {fit.fit.p90_ape_pct:.1f}%)"
            )
    else:
        # no engine steps on this device: the factors are the micro-benchmarks' (GEMM curve, collectives)
        fits = {
            run: FactorFit(
                factors=base[run],
                fitted=[
                    "compute",
                    "gemm_half_rows",
                    "gemm_rows_exponent",
                    "allreduce_latency_us",
                    "collective",
                ],
                engine="torch",
                rows=curve_error[run].n,
                fit=curve_error[run],
                uncalibrated=curve_error[run],
            )
            for run in runs
        }
        calibration = GPUCalibration(**dict(fits.pop(main)), dtype=main, per_dtype=fits)
    return ProfileFile(
        device=device_spec,
        engine="hetserve" if engine else "torch",
        threads=threads,
        measurements=measurements,
        calibration=calibration,
    )


COLLECTIVE_FACTORS = ("allreduce", "allreduce_latency_us", "collective")


def with_collectives(device: GPUSpec, rows) -> GPUSpec:
    """``device`` with the collective factors (``COLLECTIVE_FACTORS``) fitted to the main format's engine
    rows, tensor-parallel ones among them, in every format: a collective moves activations between
    processes the same way whatever the format computes in, and only the main format is timed split."""
    from .fit import fit_gpu

    fitted = fit_gpu(rows, device, source="profile (the main format's engine rows)").factors
    return with_factors(device, **{name: getattr(fitted, name) for name in COLLECTIVE_FACTORS})


def with_factors(device: GPUSpec, **update) -> GPUSpec:
    """``device`` with the factors ``update`` names set in every format."""
    return device.model_copy(
        update={
            "efficiency": device.efficiency.model_copy(update=update),
            "efficiency_by_run_dtype": {
                run: factors.model_copy(update=update)
                for run, factors in device.efficiency_by_run_dtype.items()
            },
        }
    )


def _memory_gb(dev) -> float:
    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory / 1e9
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 8.0


def _tdp(dev) -> float:
    return 300.0 if dev.type == "cuda" else 65.0
