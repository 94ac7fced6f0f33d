"""Each cost factor moves the prediction the way its documentation says, and the defaults leave the
plain roofline unchanged."""

import pytest

from hetserve.costmodel.links import allreduce_time
from hetserve.costmodel.roofline import BatchShape, ServerShape, ServerTimer, roof
from hetserve.specs.clusters import Link
from hetserve.specs.gpus import builtin_gpus
from hetserve.specs.models import load_model

MODEL = load_model("llama-3.1-8b")
A100 = builtin_gpus()["a100-80gb"]


def timer(tp=1, run_dtype="fp16", **factors):
    gpu = A100.model_copy(update={"efficiency": A100.efficiency.model_copy(update=factors)})
    layers = (16,) * MODEL.num_layers
    return ServerTimer(ServerShape(gpu, tp, layers, run_dtype=run_dtype, kv_dtype_bytes=2.0), MODEL)


def decode(t, batch, context=512):
    return t.batch_time(BatchShape.decode(batch, batch * context))


def prefill(t, prompt, n=1):
    return t.batch_time(BatchShape.prefill([prompt] * n))


def test_roof_overlap_spans_max_to_sum():
    assert roof(3.0, 1.0, 1.0) == 3.0
    assert roof(3.0, 1.0, 0.0) == 4.0
    assert roof(1.0, 3.0, 0.5) == 3.5


def test_defaults_are_the_plain_roofline():
    # explicit neutral values of every new factor give the same times as the defaults
    base = timer()
    neutral = timer(gemm_half_rows=0.0, overlap=1.0, step_overhead_ms=0.0, attention_compute=0.7)
    for t in (decode(base, 1), decode(base, 64), prefill(base, 2048)):
        assert t > 0
    assert decode(base, 8) == pytest.approx(decode(neutral, 8), rel=1e-12)
    assert prefill(base, 3000) == pytest.approx(prefill(neutral, 3000), rel=1e-12)


def test_gemm_efficiency_curve_makes_decode_grow_from_batch_one():
    flat, curved = timer(), timer(gemm_half_rows=128.0, overlap=0.0)
    # the plain roofline is memory bound and flat for small batches; the curve is not
    assert decode(flat, 2, 1) == pytest.approx(decode(flat, 1, 1), rel=0.01)
    assert decode(curved, 16, 1) > decode(curved, 1, 1) * 1.05
    # and a 128-token prefill now costs clearly more than one decode step (it cost about the same)
    assert prefill(flat, 128) < 1.1 * decode(flat, 1, 128)
    assert prefill(curved, 128) > 1.3 * decode(curved, 1, 128)


def test_step_and_layer_overheads_add_exactly():
    base = decode(timer(), 4)
    assert decode(timer(step_overhead_ms=3.0), 4) - base == pytest.approx(3e-3, rel=1e-9)
    extra = decode(timer(layer_overhead_us=120.0), 4) - base
    assert extra == pytest.approx(100e-6 * MODEL.num_layers, rel=1e-9)


def test_a_pipeline_pays_the_step_overhead_once():
    """The engine's time per step (scheduling, the serving loop) is paid once per step of a chain, by its
    first server; every stage pays its layers' overhead."""
    from hetserve.costmodel.chain import ChainTimer

    def chain(**factors):
        gpu = A100.model_copy(update={"efficiency": A100.efficiency.model_copy(update=factors)})
        cuts = [(0, 10), (10, 21), (21, MODEL.num_layers)]
        timers = [
            ServerTimer(ServerShape(gpu, 1, (16,) * (b - a), first=a == 0, last=b == MODEL.num_layers), MODEL)
            for a, b in cuts
        ]
        return ChainTimer(timers, [0.0, 0.0], [0.0, 0.0])

    shape = (4, 4, 4 * 512, 4 * 512)
    extra = chain(step_overhead_ms=3.0).step_time(*shape) - chain().step_time(*shape)
    assert extra == pytest.approx(3e-3, rel=1e-9)
    extra = chain(layer_overhead_us=120.0).step_time(*shape) - chain().step_time(*shape)
    assert extra == pytest.approx(100e-6 * MODEL.num_layers, rel=1e-9)


def test_attention_compute_only_moves_long_prefills():
    slow = timer(attention_compute=0.05)
    assert decode(slow, 1, 64) == pytest.approx(decode(timer(), 1, 64), rel=1e-3)
    assert prefill(slow, 8192) > 1.2 * prefill(timer(), 8192)


def test_attention_memory_scales_decode_kv_reads():
    short, long_ = decode(timer(attention_memory=0.2), 32, 64), decode(timer(attention_memory=0.2), 32, 8192)
    assert long_ - short > 2 * (decode(timer(), 32, 8192) - decode(timer(), 32, 64))


def test_fp32_servers_read_twice_the_weight_bytes():
    half, wide = decode(timer(), 1, 1), decode(timer(run_dtype="fp32"), 1, 1)
    assert wide == pytest.approx(2 * half, rel=0.05)


def test_allreduce_algorithms():
    link = Link(100e9, 5e-6)
    ring = allreduce_time(1e6, 8, link, "ring")
    assert ring == pytest.approx(14 * 5e-6 + 14 / 8 * 1e6 / 100e9)
    one = allreduce_time(1e3, 8, link, "one-shot")
    assert one == pytest.approx(5e-6 + 7 * 1e3 / 100e9)
    # small messages: one-shot wins on latency; large ones: ring wins on bandwidth; auto takes the better
    assert allreduce_time(1e3, 8, link, "auto") == one < allreduce_time(1e3, 8, link, "ring")
    assert allreduce_time(1e9, 8, link, "auto") == allreduce_time(1e9, 8, link, "ring")


def test_tp_latency_term_grows_with_degree():
    t2 = timer(tp=2, allreduce_latency_us=50.0)
    t8 = timer(tp=8, allreduce_latency_us=50.0)
    base2, base8 = timer(tp=2, allreduce_latency_us=0.0), timer(tp=8, allreduce_latency_us=0.0)
    added2 = decode(t2, 1) - decode(base2, 1)
    added8 = decode(t8, 1) - decode(base8, 1)
    # ring: 2(n-1) latency steps per all-reduce, two all-reduces per layer
    assert added2 == pytest.approx(2 * MODEL.num_layers * 2 * 50e-6, rel=1e-6)
    assert added8 == pytest.approx(7 * added2, rel=1e-6)
