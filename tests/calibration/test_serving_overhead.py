"""The serving runtime's time per step and per request, measured against the engine in-process on this
machine's CPU."""

import statistics

import pytest

from hetserve.calibration.serving_overhead import REQUESTS, measure_serving_overhead, serving_available

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not serving_available(), reason="needs hetserve[serve]")
def test_one_worker_served_alone_against_the_engine_in_process():
    lines = []
    steps = measure_serving_overhead("smollm2-135m", "fp32", 1, lines.append)
    assert len(steps.served_tpot_ms) == len(steps.engine_step_ms) == REQUESTS
    pairs = [served - engine for served, engine in zip(steps.served_tpot_ms, steps.engine_step_ms)]
    assert steps.overhead_ms == pytest.approx(max(0.0, statistics.median(pairs)))
    served, engine = statistics.median(steps.served_tpot_ms), statistics.median(steps.engine_step_ms)
    # the same model steps both ways: serving adds time around a step, it does not multiply it
    assert 0.5 * engine < served < 2 * engine
    assert "ms per step" in lines[-1] and "ms per request" in lines[-1]
    # a first token served comes after the same prompt's first step in-process, by no more than the
    # API, the tokeniser and one hand-over to the worker take (well under a second here)
    assert len(steps.served_ttft_ms) == len(steps.engine_first_step_ms) == REQUESTS
    assert statistics.median(steps.served_ttft_ms) > statistics.median(steps.engine_first_step_ms)
    assert 0.0 <= steps.request_overhead_ms < 500.0
