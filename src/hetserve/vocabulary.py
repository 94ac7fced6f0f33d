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

#: Torch's name of a format -> bytes per element (what a worker's KV occupies on the wire).
TORCH_DTYPE_BYTES: dict[str, int] = {
    torch_name: DTYPE_BYTES[short] for short, torch_name in ENGINE_DTYPES.items() if short in DTYPE_BYTES
}

#: Which sequences a scheduler step serves first (plan files, CLI flags and the scheduler alike).
SchedulePolicy = Literal["decode-first", "prefill-first"]
SCHEDULE_POLICIES: tuple[SchedulePolicy, ...] = ("decode-first", "prefill-first")

#: GB of paged KV cache an engine (``serve --model``) or each plan worker gets unless told otherwise.
DEFAULT_KV_CACHE_GB = 0.5

#: Environment variable holding the API key a server requires and a client sends (``--api-key``).
API_KEY_ENV = "HETSERVE_API_KEY"
