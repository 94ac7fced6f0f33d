"""``hetserve estimate``: latency, throughput and memory of one batch on a homogeneous TP x PP group."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import HetserveError
from ..specs.clusters import Link
from ..specs.gpus import GPUSpec
from ..specs.models import WEIGHT_BITS, ModelSpec
from ..vocabulary import DTYPE_BYTES, RUN_DTYPES, RunDType
from .links import p2p_time
from .roofline import RooflineCostModel, ServerShape

#: Engines prefill long batches in chunks; activation memory is sized for one chunk.
PREFILL_CHUNK_TOKENS = 8192


@dataclass
class Estimate:
    model: str
    gpu: str
    tp: int
    pp: int
    batch: int
    prompt: int
    output: int
    weight_bits: int
    dtype: str
    prefill_ms: float
    decode_ms_per_token: float
    e2e_ms: float
    tokens_per_s: float
    memory_gb_per_gpu: float
    weights_gb_per_gpu: float
    kv_gb_per_gpu: float
    usable_gb_per_gpu: float
    kv_capacity_tokens: int
    fits: bool
    reason: str

    def as_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def split_layers(num_layers: int, parts: int) -> list[int]:
    """Layers per stage, as even as possible (earlier stages take the remainder)."""
    base, extra = divmod(num_layers, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def estimate(
    model: ModelSpec,
    gpu: GPUSpec,
    *,
    tp: int = 1,
    pp: int = 1,
    batch: int = 1,
    prompt: int = 512,
    output: int = 128,
    weight_bits: int = 16,
    expert_parallel: bool = False,
    dtype: RunDType = "fp16",
) -> Estimate:
    """``dtype``: the format the engine computes 16-bit layers and keeps KV in (its peak, cost factors,
    weight and KV width)."""
    model.check_tp(tp, "--tp")
    if pp < 1 or pp > model.num_layers:
        raise HetserveError(f"--pp={pp} must be between 1 and the model's {model.num_layers} layers")
    if dtype not in RUN_DTYPES:
        raise HetserveError(f"--dtype={dtype} is not supported; use one of {list(RUN_DTYPES)}")
    if weight_bits not in WEIGHT_BITS:
        raise HetserveError(f"--weight-bits={weight_bits} is not supported; use one of {list(WEIGHT_BITS)}")
    if expert_parallel and (model.num_experts == 1 or tp < 2):
        raise HetserveError(
            f"--expert-parallel: {model.name} has no experts"
            if model.num_experts == 1
            else "--expert-parallel spreads the experts over the TP group's GPUs: give --tp 2 or more"
        )
    for flag, value in (("--batch", batch), ("--prompt", prompt), ("--output", output)):
        if value < 1:
            raise HetserveError(f"{flag}={value} must be >= 1")
    cm = RooflineCostModel(model)
    stages = [
        ServerShape(
            gpu,
            tp,
            (weight_bits,) * n,
            first=i == 0,
            last=i == pp - 1,
            ep=expert_parallel,
            kv_dtype_bytes=float(DTYPE_BYTES[dtype]),
            run_dtype=dtype,
        )
        for i, n in enumerate(split_layers(model.num_layers, pp))
    ]
    hop = Link(gpu.fabric.gb_per_s * 1e9, gpu.fabric.latency_us * 1e-6)
    act = model.hidden_size * 2.0

    prefill = sum(cm.prefill_time(s, [prompt] * batch) for s in stages)
    prefill += (pp - 1) * p2p_time(batch * prompt * act, hop)
    mean_context = prompt + output / 2
    step = sum(cm.decode_time(s, batch, batch * mean_context) for s in stages)
    step += (pp - 1) * p2p_time(batch * act, hop)
    e2e = prefill + (output - 1) * step

    total_tokens = batch * model.kv_slots(prompt + output)  # KV slots (sliding layers keep a window)
    chunk = min(batch * prompt, PREFILL_CHUNK_TOKENS)
    worst = None
    for s in stages:
        mem = cm.memory(s, max_batch_tokens=chunk, max_batch_size=batch)
        need = mem.weights + mem.activations + mem.kv_bytes_per_token * total_tokens
        if worst is None or need > worst[0]:
            worst = (need, mem)
    need, mem = worst
    capacity = min(cm.memory(s, chunk, batch).kv_capacity_tokens for s in stages)
    gb = 1e9
    if mem.weights + mem.activations > mem.usable:
        reason = (
            f"weights {mem.weights / gb:.1f} GB + activations {mem.activations / gb:.1f} GB per GPU exceed "
            f"the usable {mem.usable / gb:.1f} GB of a {gpu.name}; raise --tp/--pp or lower --weight-bits"
        )
    elif need > mem.usable:
        reason = (
            f"the KV cache of {batch} sequences of {prompt + output} tokens needs "
            f"{mem.kv_bytes_per_token * total_tokens / gb:.1f} GB "
            f"per GPU but only {mem.kv_room / gb:.1f} GB is left (room for "
            f"{capacity // model.kv_slots(prompt + output)} of them); lower --batch or "
            "the lengths, or add GPUs"
        )
    else:
        reason = ""
    return Estimate(
        model=model.name,
        gpu=gpu.name,
        tp=tp,
        pp=pp,
        batch=batch,
        prompt=prompt,
        output=output,
        weight_bits=weight_bits,
        dtype=dtype,
        prefill_ms=prefill * 1e3,
        decode_ms_per_token=step * 1e3,
        e2e_ms=e2e * 1e3,
        tokens_per_s=batch * output / e2e,
        memory_gb_per_gpu=need / gb,
        weights_gb_per_gpu=mem.weights / gb,
        kv_gb_per_gpu=mem.kv_bytes_per_token * total_tokens / gb,
        usable_gb_per_gpu=mem.usable / gb,
        kv_capacity_tokens=capacity,
        fits=not reason,
        reason=reason,
    )
