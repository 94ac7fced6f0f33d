import pytest

from hetserve.costmodel.links import allreduce_time, kv_transfer_time
from hetserve.costmodel.roofline import BatchShape, RooflineCostModel, ServerShape
from hetserve.specs.clusters import Link
from hetserve.specs.gpus import builtin_gpus
from hetserve.specs.models import load_model

GPUS = builtin_gpus()
L70 = load_model("llama-2-70b")


def shape(gpu, tp=1, layers=80, bits=16, **kw):
    return ServerShape(GPUS[gpu], tp, (bits,) * layers, **kw)


def test_small_batch_decode_is_bound_by_weight_bytes():
    cm = RooflineCostModel(L70)
    s = shape("a100-80gb", layers=1, first=False, last=False)
    t = cm.decode_time(s, batch=1, total_context=100)
    g = GPUS["a100-80gb"]
    weights = L70.layer_weight_bytes(16) / (g.memory_bw_gb_per_s * 1e9 * g.efficiency.memory)
    assert t == pytest.approx(weights, rel=0.05)


def test_large_prefill_is_bound_by_flops():
    cm = RooflineCostModel(L70)
    s = shape("h100-sxm", layers=1, first=False, last=False)
    t = cm.prefill_time(s, [512] * 16)
    g = GPUS["h100-sxm"]
    flops = L70.linear_flops_per_token_layer * 512 * 16
    assert t == pytest.approx(flops / (g.half_tflops * 1e12 * g.efficiency.compute), rel=0.15)
    assert t > flops / (g.half_tflops * 1e12 * g.efficiency.compute)


def test_faster_gpu_is_faster_and_time_grows_with_work():
    cm = RooflineCostModel(L70)
    for phase in ("prefill", "decode"):
        batch = BatchShape.prefill([1000] * 4) if phase == "prefill" else BatchShape.decode(32, 32 * 1000)
        times = [cm.batch_time(shape(g, layers=10), batch) for g in ("h100-sxm", "a100-80gb", "l4")]
        assert times[0] < times[1] < times[2], phase
    s = shape("a100-80gb", layers=10)
    assert cm.decode_time(s, 64, 64 * 2000) > cm.decode_time(s, 64, 64 * 500) > cm.decode_time(s, 8, 8 * 500)


def test_tensor_parallel_speeds_up_less_than_linearly_and_pcie_pays_more():
    cm = RooflineCostModel(L70)
    batch = BatchShape.prefill([2000] * 2)
    one = cm.batch_time(shape("a100-80gb", layers=8), batch)
    two = cm.batch_time(shape("a100-80gb", tp=2, layers=8), batch)
    assert one / 2 < two < one
    # the same GPU over PCIe instead of NVLink: more all-reduce time
    pcie = GPUS["a100-80gb"].model_copy(update={"name": "a100-pcie-test", "fabric": GPUS["l4"].fabric})
    assert cm.batch_time(ServerShape(pcie, 2, (16,) * 8), batch) > two


def test_low_bit_weights_speed_up_memory_bound_decode_and_cost_dequant_without_native_path():
    cm = RooflineCostModel(L70)
    t16 = cm.decode_time(shape("a100-80gb", layers=4, bits=16), 1, 500)
    t4 = cm.decode_time(shape("a100-80gb", layers=4, bits=4), 1, 500)
    assert t4 < 0.45 * t16
    # V100 has no int4 path: 4-bit prefill pays a dequantisation pass the 16-bit one does not
    v16 = cm.prefill_time(shape("v100-32gb", layers=4, bits=16), [512])
    v4 = cm.prefill_time(shape("v100-32gb", layers=4, bits=4), [512])
    assert v4 > v16


def test_gqa_reads_less_kv_than_mha():
    mha = load_model("llama-2-13b")
    gqa = load_model("mistral-7b")  # same head_dim, 8 of 32 KV heads
    batch = BatchShape.decode(64, 64 * 4000)
    t_mha = RooflineCostModel(mha).batch_time(shape("a100-80gb", layers=1, first=False, last=False), batch)
    t_gqa = RooflineCostModel(gqa).batch_time(shape("a100-80gb", layers=1, first=False, last=False), batch)
    assert t_gqa < t_mha / 2


def test_memory_and_kv_capacity():
    cm = RooflineCostModel(L70)
    fit = cm.memory(shape("a100-80gb", tp=4))
    assert fit.fits and fit.weights == pytest.approx(L70.weight_bytes(16) / 4, rel=0.01)
    assert fit.kv_capacity_tokens == int(fit.kv_room / fit.kv_bytes_per_token)
    assert not cm.memory(shape("a100-80gb", tp=1)).fits
    more = cm.memory(shape("a100-80gb", tp=4, bits=4))
    # 4-bit weights free exactly the weight bytes they save for KV
    assert more.kv_room - fit.kv_room == pytest.approx(fit.weights - more.weights)
    assert more.kv_capacity_tokens > 1.5 * fit.kv_capacity_tokens


def test_collectives_and_transfers():
    link = Link(10e9, 1e-5)
    assert allreduce_time(1e6, 1, link) == 0
    assert allreduce_time(1e9, 4, link) == pytest.approx(6 * 1e-5 + 1.5 * 0.1)
    plain = kv_transfer_time(1e9, link)
    assert plain == pytest.approx(0.1 + 1e-5)
    streamed = kv_transfer_time(1e9, link, prefill_time=0.2, layers=80, layerwise=True)
    assert streamed == pytest.approx(1e-5 + 0.1 / 80)
    assert kv_transfer_time(1e9, link, prefill_time=0.01, layers=80, layerwise=True) > streamed
    assert kv_transfer_time(1e9, link, conversion_s=0.05) == pytest.approx(plain + 0.05)


def test_estimate_cli_json_keys(run_cli):
    import json

    code, out, err = run_cli(
        "estimate",
        "--model",
        "llama-3.1-8b",
        "--gpu",
        "l40s",
        "--batch",
        "8",
        "--prompt",
        "1000",
        "--output",
        "100",
        "--json",
    )
    d = json.loads(out)
    assert code == 0 and d["fits"] is True
    for key in (
        "prefill_ms",
        "decode_ms_per_token",
        "e2e_ms",
        "tokens_per_s",
        "memory_gb_per_gpu",
        "kv_capacity_tokens",
        "fits",
    ):
        assert key in d
    assert d["e2e_ms"] == pytest.approx(d["prefill_ms"] + 99 * d["decode_ms_per_token"], rel=1e-3)
    assert d["tokens_per_s"] == pytest.approx(8 * 100 / d["e2e_ms"] * 1e3, rel=1e-3)


def test_estimate_refuses_what_does_not_fit_with_numbers(run_cli):
    import json

    code, out, err = run_cli("estimate", "--model", "llama-2-70b", "--gpu", "l4", "--json")
    d = json.loads(out)
    assert code == 1 and d["fits"] is False and "GB" in d["reason"] and "--weight-bits" in d["reason"]
    code, out, err = run_cli(
        "estimate",
        "--model",
        "llama-2-70b",
        "--gpu",
        "a100-80gb",
        "--tp",
        "2",
        "--batch",
        "64",
        "--prompt",
        "4000",
        "--output",
        "1000",
        "--json",
    )
    d = json.loads(out)
    assert code == 1 and "KV cache" in d["reason"] and d["weights_gb_per_gpu"] < d["usable_gb_per_gpu"]
    code, _, _ = run_cli(
        "estimate", "--model", "llama-2-70b", "--gpu", "l4", "--tp", "2", "--pp", "4", "--weight-bits", "4"
    )
    assert code == 0


def test_max_load_is_the_mean_plus_the_balls_into_bins_deviation():
    from hetserve.costmodel.roofline import max_load

    assert max_load(37, 1) == 37
    assert max_load(0, 8) == 0
    assert max_load(1, 8) == 1  # one ball: one bin holds it
    assert max_load(3, 8) <= 3
    big = max_load(80_000, 8)
    assert 10_000 < big < 10_000 * 1.03  # many balls: close to the mean
    assert max_load(8, 8) > max_load(8, 2) / 4  # fewer per bin, relatively more imbalance


def test_all_to_all_moves_each_ranks_share_to_every_other():
    from hetserve.costmodel.links import all_to_all_time

    link = Link(100e9, 5e-6)
    assert all_to_all_time(1e6, 1, link) == 0.0
    assert all_to_all_time(8e6, 8, link) == pytest.approx(7 * (5e-6 + 1e6 / 100e9))


def test_expert_parallelism_stores_latent_kv_once_and_pays_for_replicated_attention():
    """DeepSeek-V3 at 8 bits on 8 H200s. Tensor parallelism keeps every sequence's MLA latent on every
    GPU; expert parallelism with data-parallel attention keeps it once (about 8x the KV room less the
    replicated attention weights), so large decode batches over long contexts read 1/8 of the KV per
    GPU; a lone request pays for the whole attention weights and the busiest GPU's experts."""
    ds = load_model("deepseek-v3")
    cm = RooflineCostModel(ds)
    tp = shape("h200", tp=8, layers=61, bits=8)
    ep = shape("h200", tp=8, layers=61, bits=8, ep=True)
    m_tp, m_ep = cm.memory(tp, 8192, 256), cm.memory(ep, 8192, 256)
    assert m_ep.kv_bytes_per_token == pytest.approx(m_tp.kv_bytes_per_token / 8)
    attention = ds.num_layers * ds.attention_params  # 8-bit: about a byte per weight
    assert m_ep.weights - m_tp.weights == pytest.approx(attention * 7 / 8, rel=0.1)
    assert m_ep.kv_capacity_tokens > 5 * m_tp.kv_capacity_tokens
    assert cm.decode_time(ep, 1, 2000) > 1.3 * cm.decode_time(tp, 1, 2000)
    assert cm.decode_time(ep, 256, 256 * 8000) < 0.8 * cm.decode_time(tp, 256, 256 * 8000)
    # a dense model has no experts to spread: the flag changes nothing in the timing
    dense = RooflineCostModel(L70)
    assert dense.decode_time(shape("h100-sxm", tp=8, ep=True), 8, 8000) == pytest.approx(
        dense.decode_time(shape("h100-sxm", tp=8), 8, 8000)
    )


def test_estimate_with_expert_parallelism_fits_the_batch_tensor_parallelism_cannot(run_cli):
    """128 DeepSeek-V3 requests of 4,500 tokens on 8 H200s: tensor parallelism stores every latent on
    every GPU and runs out of KV room; expert parallelism stores each once and fits."""
    import json

    args = ["estimate", "--model", "deepseek-v3", "--gpu", "h200", "--tp", "8", "--weight-bits", "8"]
    args += ["--batch", "128", "--prompt", "4000", "--output", "500", "--json"]
    code, out, _ = run_cli(*args)
    assert code == 1 and json.loads(out)["fits"] is False
    code, out, _ = run_cli(*args, "--expert-parallel")
    assert code == 0 and json.loads(out)["fits"] is True
    code, out, err = run_cli(
        "estimate", "--model", "llama-3.1-8b", "--gpu", "h200", "--tp", "2", "--expert-parallel"
    )
    assert code == 2 and "--expert-parallel: llama-3.1-8b has no experts" in err
