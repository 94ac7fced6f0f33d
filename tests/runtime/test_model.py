"""The Llama module on the paged cache, checked against an independent dense implementation and
(when installed) against transformers' own Llama/Qwen2 on the same random weights."""

import json
import math
import random

import pytest
import torch

from hetserve.runtime.model.attention import AttentionMetadata, PrefillSpan, StepSegments
from hetserve.runtime.model.config import LlamaConfig, RopeScaling
from hetserve.runtime.model.llama import LlamaModel, rope_inv_freq
from hetserve.runtime.model.loading import load_gguf, load_hf_directory, unpermute_rope_rows
from hetserve.runtime.model.tiny import tiny_config, tiny_model
from hetserve.runtime.model_runner import ModelRunner
from hetserve.scheduling import ScheduledSeq, Sequence

from .conftest import llamacpp_row_order, write_gguf


def dense_logits(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    """Textbook float64 forward over one whole sequence: no cache, explicit softmax attention."""
    c = model.config
    w = {k: v.double() for k, v in model.checkpoint_items()}
    head = w.get("lm_head.weight", w["embed_tokens.weight"])
    n, hd, group = len(ids), c.head_dim, c.num_heads // c.num_kv_heads
    angles = torch.arange(n, dtype=torch.float64)[:, None] * rope_inv_freq(c).double()[None, :]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]

    def rope(t):  # rotate the pair (i, i + hd/2) of every head by position * frequency_i
        a, b = t[..., : hd // 2], t[..., hd // 2 :]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    def rms(t, g):
        return g * t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps)

    def linear(t, name):
        out = t @ w[name + ".weight"].T
        return out + w[name + ".bias"] if name + ".bias" in w else out

    x = w["embed_tokens.weight"][ids]
    future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    for i in range(c.num_layers):
        p = f"layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = rope(linear(h, p + "self_attn.q_proj").view(n, c.num_heads, hd))
        k = rope(linear(h, p + "self_attn.k_proj").view(n, c.num_kv_heads, hd)).repeat_interleave(group, 1)
        v = linear(h, p + "self_attn.v_proj").view(n, c.num_kv_heads, hd).repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        attn = scores.masked_fill(future, float("-inf")).softmax(-1)
        x = x + linear(torch.einsum("hqk,khd->qhd", attn, v).reshape(n, -1), p + "self_attn.o_proj")
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        x = x + linear(
            torch.nn.functional.silu(linear(h, p + "mlp.gate_proj")) * linear(h, p + "mlp.up_proj"),
            p + "mlp.down_proj",
        )
    return rms(x, w["norm.weight"]) @ head.T


def step_logits(runner: ModelRunner, items: list[ScheduledSeq]) -> list[torch.Tensor]:
    """Logits of every computed row, per item: the runner's batch layout is decodes first, then spans."""
    ids, positions, meta, _ = runner.prepare(items)
    with torch.inference_mode():
        logits = runner.model.compute_logits(runner.model(ids, positions, meta, runner.kv_caches))
    decodes = [it for it in items if it.num_tokens == 1]
    rows, row = {}, 0
    for it in decodes + [it for it in items if it.num_tokens > 1]:
        rows[id(it)] = logits[row : row + it.num_tokens]
        row += it.num_tokens
    return [rows[id(it)] for it in items]


def scattered_tables(seqs: list[Sequence], num_blocks: int, block_size: int, seed: int = 0) -> None:
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)
    for s in seqs:
        s.block_table = [free.pop() for _ in range(-(-(s.prompt_len + 8) // block_size))]


@pytest.mark.parametrize(
    "config",
    [
        tiny_config(),
        tiny_config(tie_word_embeddings=True, num_kv_heads=1),
        tiny_config(qkv_bias=True, architecture="qwen2"),
        tiny_config(rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64)),
    ],
    ids=["gqa", "tied-mqa", "qkv-bias", "llama3-rope"],
)
def test_paged_batch_matches_dense_reference(config):
    """Mixed batches (whole prompts, chunks continuing earlier KV, decodes) over scattered blocks."""
    model = tiny_model(config, seed=1)
    runner = ModelRunner(model, num_blocks=64, block_size=4)
    gen = random.Random(0)
    prompts = [[gen.randrange(3, 300) for _ in range(n)] for n in (13, 7, 22)]
    seqs = [Sequence(i, len(p), 8, token_ids=p) for i, p in enumerate(prompts)]
    scattered_tables(seqs, 64, 4)
    a, b, c = seqs
    refs = [dense_logits(model, s.token_ids) for s in seqs]
    # step 1: a whole, b and c chunks
    got = step_logits(
        runner,
        [
            ScheduledSeq(a, 0, 13, True, True),
            ScheduledSeq(b, 0, 4, False, True),
            ScheduledSeq(c, 0, 9, False, True),
        ],
    )
    for g, ref, (lo, hi) in zip(got, refs, [(0, 13), (0, 4), (0, 9)]):
        torch.testing.assert_close(g.double(), ref[lo:hi], atol=2e-4, rtol=1e-4)
    # step 2: a decodes the token it sampled; b and c continue from their cached KV
    a.append_token(17)
    refs[0] = dense_logits(model, a.token_ids)
    got = step_logits(
        runner,
        [
            ScheduledSeq(b, 4, 3, True, True),
            ScheduledSeq(a, 13, 1, True, False),
            ScheduledSeq(c, 9, 13, True, True),
        ],
    )
    for g, ref, (lo, hi) in zip(got, [refs[1], refs[0], refs[2]], [(4, 7), (13, 14), (9, 22)]):
        torch.testing.assert_close(g.double(), ref[lo:hi], atol=2e-4, rtol=1e-4)
    # step 3: everyone decodes, with different context lengths in one padded batch
    for s, tok in zip(seqs, (5, 6, 7)):
        s.append_token(tok)
    refs = [dense_logits(model, s.token_ids) for s in seqs]
    got = step_logits(runner, [ScheduledSeq(s, s.num_tokens - 1, 1, True, False) for s in seqs])
    for g, ref in zip(got, refs):
        torch.testing.assert_close(g.double(), ref[-1:], atol=2e-4, rtol=1e-4)


def test_chunked_prefill_gives_the_same_logits_as_one_pass():
    model = tiny_model(seed=2)
    prompt = [random.Random(1).randrange(3, 300) for _ in range(37)]
    whole = ModelRunner(model, num_blocks=32, block_size=8)
    s = Sequence(
        0,
        37,
        4,
        token_ids=prompt,
    )
    s.block_table = list(range(5))
    (one_pass,) = step_logits(whole, [ScheduledSeq(s, 0, 37, True, True)])
    chunked = ModelRunner(model, num_blocks=32, block_size=8)
    pieces = []
    for start, n in ((0, 5), (5, 11), (16, 1), (17, 20)):
        pieces += step_logits(chunked, [ScheduledSeq(s, start, n, start + n == 37, True)])
    torch.testing.assert_close(torch.cat(pieces), one_pass, atol=1e-5, rtol=1e-5)
    for a, b in zip(whole.kv_caches, chunked.kv_caches):  # and the cache holds the same KV
        torch.testing.assert_close(a[0][:5], b[0][:5], atol=1e-5, rtol=1e-5)


def test_steps_run_as_one_give_each_step_its_own_logits_and_kv():
    """Two instances' steps (their own KV caches, decodes and chunks mixed) run as one forward with
    ``StepSegments`` give every row the logits, and every cache the KV, of running them apart."""
    model = tiny_model(seed=4)
    gen = random.Random(3)

    def instance(lengths, seed):
        runner = ModelRunner(model, num_blocks=32, block_size=4)
        seqs = [
            Sequence(i, n, 8, token_ids=[gen.randrange(3, 300) for _ in range(n)])
            for i, n in enumerate(lengths)
        ]
        scattered_tables(seqs, 32, 4, seed)
        return runner, seqs

    apart_a, seqs_a = instance((11, 6), seed=1)
    apart_b, seqs_b = instance((9,), seed=2)
    together_a, together_b = (ModelRunner(model, num_blocks=32, block_size=4) for _ in range(2))
    (a1, a2), (b1,) = seqs_a, seqs_b
    schedule = [
        (
            [ScheduledSeq(a1, 0, 11, True, True), ScheduledSeq(a2, 0, 4, False, True)],
            [ScheduledSeq(b1, 0, 9, True, True)],
        ),
        (
            [ScheduledSeq(a1, 11, 1, True, False), ScheduledSeq(a2, 4, 2, True, True)],
            [ScheduledSeq(b1, 9, 1, True, False)],
        ),
    ]
    for k, (items_a, items_b) in enumerate(schedule):
        if k:
            for s in (a1, b1):
                s.append_token(40 + k)
        expected = [step_logits(apart_a, items_a), step_logits(apart_b, items_b)]
        ids_a, pos_a, meta_a, _ = together_a.prepare(items_a)
        ids_b, pos_b, meta_b, _ = together_b.prepare(items_b)
        n = len(ids_a)
        segments = StepSegments((0, n, n + len(ids_b)), (meta_a, meta_b))
        caches = [(ca, cb) for ca, cb in zip(together_a.kv_caches, together_b.kv_caches)]
        with torch.inference_mode():
            h = model(torch.cat([ids_a, ids_b]), torch.cat([pos_a, pos_b]), segments, caches)
            logits = model.compute_logits(h)
        for items, rows, want in (
            (items_a, logits[:n], expected[0]),
            (items_b, logits[n:], expected[1]),
        ):
            order = [it for it in items if it.num_tokens == 1] + [it for it in items if it.num_tokens > 1]
            row, got = 0, {}
            for it in order:
                got[id(it)] = rows[row : row + it.num_tokens]
                row += it.num_tokens
            for it, w in zip(items, want):
                torch.testing.assert_close(got[id(it)], w, atol=1e-5, rtol=1e-5)
    for apart, together in ((apart_a, together_a), (apart_b, together_b)):
        for (k1, v1), (k2, v2) in zip(apart.kv_caches, together.kv_caches):
            torch.testing.assert_close(k1, k2)
            torch.testing.assert_close(v1, v2)


@pytest.mark.parametrize("first_slice", [True, False], ids=["from-token-ids", "from-hidden-states"])
def test_steps_through_different_parts_of_a_slice_run_as_one(first_slice):
    """Partial inference: steps that each run their own part of a slice (some ending at the model's last
    layer, which then takes the final norm) run as one forward with ``StepSegments.parts`` and give
    each step's rows, and each step's cache, what running it alone through its part gives."""
    config = tiny_config(num_layers=4)
    model = tiny_model(config, seed=5, layer_start=0 if first_slice else 1)
    n = len(model.layers)
    parts = [(0, n), (0, n - 1), (0, 1)] if first_slice else [(0, n), (1, n), (0, 2)]
    gen = random.Random(7)
    lengths = (5, 3, 4)
    shape = (8, 4, config.num_kv_heads, config.head_dim)

    def caches():
        return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(n)]

    if first_slice:
        inputs = [torch.tensor([gen.randrange(3, 300) for _ in range(t)]) for t in lengths]
    else:
        inputs = [
            torch.randn(t, config.hidden_size, generator=torch.Generator().manual_seed(t)) for t in lengths
        ]
    metas = [
        AttentionMetadata(torch.arange(t) + 4 * j, prefills=(PrefillSpan(0, t, t),))
        for j, t in enumerate(lengths)
    ]
    alone, together = [caches() for _ in lengths], [caches() for _ in lengths]
    with torch.inference_mode():
        expected = [
            model(x, torch.arange(len(x)), m, c, part=p) for x, m, c, p in zip(inputs, metas, alone, parts)
        ]
        bounds = (0, 5, 8, 12)
        segments = StepSegments(bounds, tuple(metas), tuple(parts))
        layer_caches = [tuple(c[i] for c in together) for i in range(n)]
        positions = torch.cat([torch.arange(t) for t in lengths])
        h = model(torch.cat(inputs), positions, segments, layer_caches)
    for j, want in enumerate(expected):
        torch.testing.assert_close(h[bounds[j] : bounds[j + 1]], want, atol=1e-5, rtol=1e-5)
        for (k1, v1), (k2, v2) in zip(alone[j], together[j]):
            torch.testing.assert_close(k1, k2)
            torch.testing.assert_close(v1, v2)


def test_layer_slices_chain_to_the_whole_model():
    """Two slices [0, 1) and [1, 2) fed one into the other equal the full model (pipeline stages)."""
    full = tiny_model(tiny_config(tie_word_embeddings=True), seed=3)
    first = tiny_model(full.config, seed=3, layer_start=0, layer_end=1)
    last = tiny_model(full.config, seed=3, layer_start=1)
    assert first.lm_head is None and last.embed_tokens is None and len(first.layers) == len(last.layers) == 1
    ids = torch.tensor([5, 9, 200, 31, 7])
    positions = torch.arange(5)
    meta = AttentionMetadata(torch.arange(5), prefills=(PrefillSpan(0, 5, 5),))

    def caches(model):
        shape = (2, 4, model.config.num_kv_heads, model.config.head_dim)
        return [(torch.zeros(shape), torch.zeros(shape)) for _ in model.layers]

    with torch.inference_mode():
        expected = full.compute_logits(full(ids, positions, meta, caches(full)))
        hidden = first(ids, positions, meta, caches(first))
        got = last.compute_logits(last(hidden, positions, meta, caches(last)))
    torch.testing.assert_close(got, expected)
    with pytest.raises(RuntimeError):
        first.compute_logits(hidden)


def test_load_weights_rejects_missing_and_misshapen_tensors():
    model = LlamaModel(tiny_config())
    items = list(tiny_model(seed=0).checkpoint_items())
    with pytest.raises(ValueError, match="lacks"):
        model.load_weights(items[:-1])
    bad = [(n, t[:-1] if n == "norm.weight" else t) for n, t in items]
    with pytest.raises(ValueError, match="norm.weight"):
        model.load_weights(bad)


# ---- loaders ---------------------------------------------------------------------------------
def test_unpermute_inverts_llamacpp_row_order():
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(32, 3)
    assert torch.equal(unpermute_rope_rows(llamacpp_row_order(w, 4), 4), w)
    assert not torch.equal(llamacpp_row_order(w, 4), w)
    bias = torch.arange(16.0)
    assert torch.equal(unpermute_rope_rows(llamacpp_row_order(bias, 2), 2), bias)


@pytest.mark.parametrize(
    "config,quant,atol",
    [
        (tiny_config(), "F32", 1e-5),
        (tiny_config(), "Q8_0", 0.15),
        (tiny_config(architecture="qwen2", qkv_bias=True, tie_word_embeddings=True), "F32", 1e-5),
    ],
    ids=["llama-f32", "llama-q8_0", "qwen2-bias-tied"],
)
def test_gguf_file_loads_back_to_the_same_model(tmp_path, config, quant, atol):
    model = tiny_model(config, seed=4)
    path = write_gguf(tmp_path / "tiny.gguf", model, quant)
    loaded, meta = load_gguf(path)
    assert meta["general.architecture"] == config.architecture
    for field in ("num_kv_heads", "tie_word_embeddings", "qkv_bias", "o_bias", "head_dim", "vocab_size"):
        assert getattr(loaded.config, field) == getattr(config, field), field
    ids = [1, 50, 60, 70, 80, 90, 100]
    torch.testing.assert_close(dense_logits(loaded, ids), dense_logits(model, ids), atol=atol, rtol=0)


def test_gguf_layer_range_reads_only_its_layers(tmp_path):
    model = tiny_model(seed=4)
    path = write_gguf(tmp_path / "tiny.gguf", model)
    last, _ = load_gguf(path, layer_start=1)
    assert last.embed_tokens is None
    torch.testing.assert_close(last.layers[0].mlp.down_proj.weight, model.layers[1].mlp.down_proj.weight)


def test_hf_directory_loads(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model(tiny_config(qkv_bias=True, architecture="qwen2"), seed=5)
    c = model.config
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "qwen2",
                "vocab_size": c.vocab_size,
                "hidden_size": c.hidden_size,
                "intermediate_size": c.intermediate_size,
                "num_hidden_layers": c.num_layers,
                "num_attention_heads": c.num_heads,
                "num_key_value_heads": c.num_kv_heads,
                "rms_norm_eps": c.rms_norm_eps,
                "rope_theta": c.rope_theta,
                "tie_word_embeddings": False,
                "max_position_embeddings": c.max_position_embeddings,
                "eos_token_id": 2,
            }
        )
    )
    tensors = {
        "model." + n if n != "lm_head.weight" else n: t.contiguous() for n, t in model.checkpoint_items()
    }
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:10]}, str(tmp_path / "model-00001.safetensors"))
    save_file({n: tensors[n] for n in names[10:]}, str(tmp_path / "model-00002.safetensors"))
    loaded = load_hf_directory(tmp_path)
    assert loaded.config.qkv_bias and not loaded.config.o_bias
    ids = [4, 8, 15, 16, 23, 42]
    torch.testing.assert_close(dense_logits(loaded, ids), dense_logits(model, ids))


# ---- config ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, message",
    [
        ("{bad", "is not valid JSON"),
        ("[1]", "must hold a JSON object"),
        ('{"hidden_size": 0, "num_hidden_layers": 2}', "hidden_size"),
        ("", "is not valid JSON"),
    ],
)
def test_a_bad_config_json_is_one_error_naming_the_file(tmp_path, text, message):
    from hetserve.errors import HetserveError

    (tmp_path / "config.json").write_text(text)
    with pytest.raises(HetserveError, match=message) as err:
        load_hf_directory(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value) or "hidden_size" in str(err.value)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(HetserveError, match="config.json"):
        LlamaConfig.from_hf_file(tmp_path)


def test_config_from_hf_reads_both_rope_layouts():
    base = {
        "model_type": "llama",
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "eos_token_id": [5, 6],
    }
    old = LlamaConfig.from_hf(
        {
            **base,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        }
    )
    new = LlamaConfig.from_hf(
        {
            **base,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        }
    )
    assert old == new and old.rope_theta == 500000.0 and old.rope_scaling.kind == "llama3"
    assert old.head_dim == 16 and old.eos_token_ids == (5, 6)
    linear = LlamaConfig.from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})
    torch.testing.assert_close(rope_inv_freq(linear) * 2, rope_inv_freq(LlamaConfig.from_hf(base)))
    with pytest.raises(ValueError, match="yarn"):
        LlamaConfig.from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="gpt2"):
        LlamaConfig.from_hf({**base, "model_type": "gpt2"})


# ---- cross-check with transformers -----------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        tiny_config(),
        tiny_config(tie_word_embeddings=True),
        tiny_config(qkv_bias=True, architecture="qwen2"),
        tiny_config(rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64), rope_theta=500000.0),
    ],
    ids=["llama", "tied", "qwen2", "llama3-rope"],
)
def test_matches_transformers_on_the_same_weights(config):
    transformers = pytest.importorskip("transformers")
    model = tiny_model(config, seed=6)
    c = model.config
    hf_dict = {
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_word_embeddings,
        "max_position_embeddings": c.max_position_embeddings,
        "head_dim": c.head_dim,
    }
    if c.rope_scaling:
        hf_dict["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": c.rope_scaling.factor,
            "low_freq_factor": c.rope_scaling.low_freq_factor,
            "high_freq_factor": c.rope_scaling.high_freq_factor,
            "original_max_position_embeddings": c.rope_scaling.original_max_position_embeddings,
        }
    if c.architecture == "qwen2":
        hf_config, cls = transformers.Qwen2Config(**hf_dict), transformers.Qwen2ForCausalLM
    else:
        hf_config, cls = transformers.LlamaConfig(**hf_dict), transformers.LlamaForCausalLM
    hf = cls(hf_config).eval()
    state = {("model." + n if n != "lm_head.weight" else n): t for n, t in model.checkpoint_items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = [1, 40, 41, 42, 250, 7, 7, 99, 12, 301, 5, 6, 88]
    with torch.inference_mode():
        expected = hf(torch.tensor([ids])).logits[0]
    runner = ModelRunner(model, num_blocks=8, block_size=4)
    s = Sequence(0, len(ids), 1, token_ids=ids)
    s.block_table = [3, 1, 6, 0]
    (got,) = step_logits(runner, [ScheduledSeq(s, 0, len(ids), True, True)])
    torch.testing.assert_close(got, expected.float(), atol=1e-4, rtol=1e-4)
