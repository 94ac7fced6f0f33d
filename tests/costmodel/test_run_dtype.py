"""A server is timed with the peak and the cost factors of the format it computes in (fp32, bf16, fp16):
a GPU's own entry for that format where it has one, else its main factors and 16-bit peak."""

import pytest

from hetserve.costmodel.roofline import BatchShape, ServerShape, ServerTimer
from hetserve.plan import load_plan
from hetserve.specs.gpus import CostFactors, builtin_gpus
from hetserve.specs.models import load_model
from tests.conftest import EXAMPLES

SMOL = load_model("smollm2-135m")
L4 = builtin_gpus()["l4"]
#: bf16 factors of a CPU-like device: slow weight reads (no native bf16 matrix-vector path), a per-step cost
SLOW_BF16 = CostFactors(compute=0.3, memory=0.1, step_overhead_ms=7.0)


def decode_ms(gpu, run_dtype, batch=1, context=256):
    shape = ServerShape(gpu, 1, (16,) * SMOL.num_layers, kv_dtype_bytes=2.0, run_dtype=run_dtype)
    return ServerTimer(shape, SMOL).batch_time(BatchShape.decode(batch, batch * context)) * 1e3


def prefill_ms(gpu, run_dtype, prompt=2048):
    shape = ServerShape(gpu, 1, (16,) * SMOL.num_layers, kv_dtype_bytes=2.0, run_dtype=run_dtype)
    return ServerTimer(shape, SMOL).batch_time(BatchShape.prefill([prompt])) * 1e3


def test_a_bf16_server_is_timed_with_the_bf16_factors():
    device = L4.model_copy(update={"efficiency_by_run_dtype": {"bf16": SLOW_BF16}})
    as_if_main = L4.model_copy(update={"efficiency": SLOW_BF16})
    assert decode_ms(device, "bf16") == pytest.approx(decode_ms(as_if_main, "bf16"), rel=1e-12)
    assert decode_ms(device, "bf16") > decode_ms(L4, "bf16") + 7.0  # the step cost and slower reads
    # servers in other formats keep the main factors
    assert decode_ms(device, "fp16") == pytest.approx(decode_ms(L4, "fp16"), rel=1e-12)
    assert decode_ms(device, "fp32") == pytest.approx(decode_ms(L4, "fp32"), rel=1e-12)


def test_each_format_is_timed_from_its_own_peak():
    flat = CostFactors(compute=0.5, memory=0.5, layer_overhead_us=0.0)
    gpu = L4.model_copy(update={"tflops": {"fp32": 10.0, "bf16": 40.0, "fp16": 20.0}, "efficiency": flat})
    # a long prefill is compute bound: its time follows the format's peak (fp32 also reads 4-byte weights,
    # which a compute-bound step does not feel)
    bf16, fp16, fp32 = (prefill_ms(gpu, d) for d in ("bf16", "fp16", "fp32"))
    assert fp16 / bf16 == pytest.approx(2.0, rel=0.01)
    assert fp32 / bf16 == pytest.approx(4.0, rel=0.01)
    # a format the GPU lists no peak for is timed at its 16-bit peak (the faster of bf16 and fp16)
    no_fp16 = gpu.model_copy(update={"tflops": {"fp32": 10.0, "bf16": 40.0}})
    assert prefill_ms(no_fp16, "fp16") == pytest.approx(bf16, rel=1e-12)


def test_catalogue_gpus_time_every_16_bit_format_alike():
    for name in ("a100-80gb", "l4", "t4", "gaudi2"):
        gpu = builtin_gpus()[name]
        assert prefill_ms(gpu, "bf16") == pytest.approx(prefill_ms(gpu, "fp16"), rel=1e-12), name


def test_a_plan_server_computes_in_its_kv_format():
    """hetserve's engine runs a server in its KV's format: the P/D bf16 example's decode server is a bf16
    server, its prefill pair fp32; an fp8 KV (other engines) goes with 16-bit compute."""
    dep = load_plan(EXAMPLES / "serve" / "smollm2-pd-bf16.yaml")
    assert dep.servers["token"].shape.run_dtype == "bf16"
    assert dep.servers["prompt"].shape.run_dtype == "fp32"
    from hetserve.vocabulary import run_dtype_for_kv

    assert [run_dtype_for_kv(kv) for kv in ("fp32", "bf16", "fp16", "fp8", "int8")] == [
        "fp32",
        "bf16",
        "fp16",
        "fp16",
        "fp16",
    ]


def test_estimate_times_and_sizes_a_run_format():
    """``hetserve estimate --dtype``: a device profiled in bf16 is estimated with its bf16 factors; fp32
    holds weights and KV at 4 bytes."""
    from hetserve.costmodel.estimate import estimate
    from hetserve.errors import HetserveError

    device = L4.model_copy(update={"efficiency_by_run_dtype": {"bf16": SLOW_BF16}})
    fp16 = estimate(SMOL, device, batch=4, dtype="fp16")
    bf16 = estimate(SMOL, device, batch=4, dtype="bf16")
    fp32 = estimate(SMOL, device, batch=4, dtype="fp32")
    assert bf16.decode_ms_per_token > fp16.decode_ms_per_token + 7.0  # bf16's step cost and slow reads
    assert fp32.weights_gb_per_gpu == pytest.approx(2 * fp16.weights_gb_per_gpu, rel=0.01)
    assert fp32.kv_gb_per_gpu == pytest.approx(2 * fp16.kv_gb_per_gpu, rel=1e-9)
    assert (fp16.dtype, bf16.dtype) == ("fp16", "bf16")
    with pytest.raises(HetserveError, match="--dtype=int8"):
        estimate(SMOL, device, dtype="int8")
