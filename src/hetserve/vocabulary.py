"""The words hetserve uses in more than one part, each spelt and defined once: number formats, scheduling
policies and the defaults that the planner, the simulator and the runtime must agree on."""

from __future__ import annotations

from typing import Literal

#: Bytes per element of each number format a plan names for weights or KV (``fp8``/``int8``: one byte).
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}

#: The formats the engine computes in, under either spelling, with torch's name for each.
ENGINE_DTYPES: dict[str, str] = {
    "fp32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "float16": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
}

#: The formats an engine computes a server's layers in (the weights of 16-bit layers, the activations
#: and, in hetserve's engine, the KV cache): the cost model times a server with its GPU's peak and cost
#: factors for this format.
RunDType = Literal["fp32", "bf16", "fp16"]
RUN_DTYPES: tuple[RunDType, ...] = ("fp32", "bf16", "fp16")


def run_dtype_for_kv(kv_dtype: str) -> RunDType:
    """The format a server with ``kv_dtype`` KV computes in. hetserve's engine runs weights, activations
    and KV in one format (fp32, bf16 or fp16), so it is the KV's; a narrower KV (fp8, int8: other engines)
    goes with 16-bit compute, taken as fp16."""
    return kv_dtype if kv_dtype in RUN_DTYPES else "fp16"  # type: ignore[return-value]


#: Torch's name of a format -> bytes per element (what a worker's KV occupies on the wire).
TORCH_DTYPE_BYTES: dict[str, int] = {
    torch_name: DTYPE_BYTES[short] for short, torch_name in ENGINE_DTYPES.items() if short in DTYPE_BYTES
}

#: Which sequences a scheduler step serves first (plan files, CLI flags and the scheduler alike).
SchedulePolicy = Literal["decode-first", "prefill-first"]
SCHEDULE_POLICIES: tuple[SchedulePolicy, ...] = ("decode-first", "prefill-first")
#: How an instance's chain pipelines requests (``InstancePlan.pipelining``).
Pipelining = Literal["lanes", "per-request"]
#: Whose KV room an instance holds on each server (``InstancePlan.kv_pool``).
KVPoolKind = Literal["own", "server"]

#: GB of paged KV cache an engine (``serve --model``) or each plan worker gets unless told otherwise.
DEFAULT_KV_CACHE_GB = 0.5

#: Environment variable holding the API key a server requires and a client sends (``--api-key``).
API_KEY_ENV = "HETSERVE_API_KEY"
