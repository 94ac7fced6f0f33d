"""The analytic capacity model under an end-to-end target: a tight E2E target lowers what a mixed or a
decode instance sustains, a generous one changes nothing, and the prefill side's TTFT must meet it."""

import math

import pytest

from hetserve.costmodel.roofline import RooflineCostModel, ServerShape
from hetserve.planner.capacity import (
    ChainTiming,
    decode_capacity,
    mixed_capacity,
    prefill_capacity,
)
from hetserve.specs.gpus import builtin_gpus
from hetserve.specs.models import load_model
from hetserve.specs.workloads import SLO

PROMPT, OUTPUT, OUTPUT_P90 = 512.0, 128.0, 265.0
MAX_BATCH, MAX_TOKENS, KV = 64, 8192, 200_000


@pytest.fixture(scope="module")
def chain():
    """Llama-2-7B on one A100-80GB."""
    model = load_model("llama-2-7b")
    shape = ServerShape(builtin_gpus()["a100-80gb"], 1, (16,) * model.num_layers, first=True, last=True)
    return ChainTiming([RooflineCostModel(model).timer(shape)], [], [])


def mixed(chain, slo):
    return mixed_capacity(chain, PROMPT, OUTPUT, slo, MAX_BATCH, MAX_TOKENS, KV, 512, output_q=OUTPUT_P90)


def decode(chain, slo):
    return decode_capacity(chain, PROMPT, OUTPUT, slo, MAX_BATCH, KV, output_q=OUTPUT_P90)


def test_a_tight_e2e_target_lowers_the_mixed_rate_and_a_generous_one_does_not(chain):
    free = mixed(chain, SLO(tpot_ms=200))
    assert free.rate > 0 and math.isfinite(free.e2e)
    tight = mixed(chain, SLO(tpot_ms=200, e2e_ms=free.e2e * 1e3 * 0.8))
    assert 0 < tight.rate < free.rate and tight.limit == "e2e" and tight.e2e <= free.e2e * 0.8 + 1e-9
    generous = mixed(chain, SLO(tpot_ms=200, e2e_ms=free.e2e * 1e3 * 10))
    assert generous.rate == pytest.approx(free.rate) and generous.limit == free.limit


def test_the_e2e_target_is_checked_for_the_percentile_output_length(chain):
    slo = SLO(e2e_ms=mixed(chain, SLO(tpot_ms=200)).e2e * 1e3 * 0.8)
    at_mean = mixed_capacity(chain, PROMPT, OUTPUT, slo, MAX_BATCH, MAX_TOKENS, KV, 512)
    assert at_mean.rate > mixed(chain, slo).rate > 0


def test_a_tight_e2e_target_lowers_the_decode_rate_and_a_generous_one_does_not(chain):
    free = decode(chain, SLO(tpot_ms=200))
    assert free.rate > 0
    assert free.e2e == pytest.approx((OUTPUT_P90 - 1) * free.tpot)
    tight = decode(chain, SLO(tpot_ms=200, e2e_ms=free.e2e * 1e3 * 0.8))
    assert 0 < tight.rate < free.rate and tight.limit == "e2e"
    assert decode(chain, SLO(tpot_ms=200, e2e_ms=free.e2e * 1e3 * 10)).rate == pytest.approx(free.rate)


def test_an_e2e_target_bounds_the_prefill_ttft(chain):
    free = prefill_capacity(chain, PROMPT, None, MAX_TOKENS)
    alone, _ = chain.prefill(PROMPT, 1)
    target = (alone + free.ttft) / 2
    tight = prefill_capacity(chain, PROMPT, SLO(e2e_ms=target * 1e3), MAX_TOKENS)
    assert 0 < tight.rate < free.rate and tight.limit == "e2e" and tight.ttft <= target + 1e-9
    assert prefill_capacity(chain, PROMPT, SLO(e2e_ms=free.ttft * 1e3 * 10), MAX_TOKENS).rate == free.rate


def test_a_lane_prefills_no_more_prompts_at_once_than_its_share_of_the_batch_limit(chain):
    """Short prompts are bound by reading the weights, so batching them is what makes prefill fast: an
    engine held to one sequence per batch prefills them one by one, far slower than the token budget's
    256 prompts per batch (4.6x here); a loose limit changes nothing."""
    short = 32.0
    free = prefill_capacity(chain, short, None, MAX_TOKENS)
    assert prefill_capacity(chain, short, None, MAX_TOKENS, max_batch=256).rate == pytest.approx(free.rate)
    assert prefill_capacity(chain, short, None, MAX_TOKENS, max_batch=1).rate < 0.3 * free.rate
    one_mixed = mixed_capacity(chain, PROMPT, OUTPUT, None, 1, MAX_TOKENS, KV)
    assert one_mixed.rate < 0.2 * mixed_capacity(chain, PROMPT, OUTPUT, None, MAX_BATCH, MAX_TOKENS, KV).rate
    assert one_mixed.batch <= 1.0 + 1e-9
