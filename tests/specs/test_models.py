import pytest

from hetserve.specs.models import builtin_model_names, load_model, model_from_hf_config

# Published parameter counts (model cards / papers), in billions.
PUBLISHED = {
    "llama-2-7b": 6.74,
    "llama-2-13b": 13.02,
    "llama-2-70b": 68.98,
    "llama-3.1-8b": 8.03,
    "llama-3.1-70b": 70.55,
    "llama-3.1-405b": 405.85,
    "mistral-7b": 7.24,
    "mixtral-8x7b": 46.70,
    "qwen2.5-7b": 7.62,
    "qwen2.5-72b": 72.71,
    "opt-66b": 65.7,
    "bloom-176b": 176.25,
    "smollm2-135m": 0.1345,
    "llama-3.2-1b": 1.24,  # model card: 1.23B
    "llama-3.2-3b": 3.21,
    "llama-3.3-70b": 70.6,
    "qwen3-8b": 8.2,  # Qwen3 model cards
    "qwen3-32b": 32.8,
    "qwen3-30b-a3b": 30.5,
    "qwen3-235b-a22b": 235.0,
}
#: Published activated parameters per token of the MoE models (Qwen3 model cards), in billions.
ACTIVE = {"qwen3-30b-a3b": 3.3, "qwen3-235b-a22b": 22.0, "mixtral-8x7b": 12.9}


@pytest.mark.parametrize("name,billions", sorted(PUBLISHED.items()))
def test_parameter_count_matches_published(name, billions):
    assert load_model(name).total_params / 1e9 == pytest.approx(billions, rel=0.01)


def test_every_builtin_named_in_the_issue_is_there():
    need = {
        "llama-2-7b",
        "llama-2-13b",
        "llama-2-70b",
        "llama-3.1-8b",
        "llama-3.1-70b",
        "llama-3.1-405b",
        "qwen2.5-7b",
        "qwen2.5-32b",
        "qwen2.5-72b",
        "mistral-7b",
        "mixtral-8x7b",
        "opt-13b",
        "opt-30b",
        "opt-66b",
        "bloom-176b",
        "smollm2-135m",
    }
    assert need <= set(builtin_model_names())
    for name in builtin_model_names():
        assert load_model(name).source.startswith("https://huggingface.co/")


def test_kv_bytes_are_gqa_correct():
    m = load_model("llama-2-70b")  # 80 layers, 8 KV heads of 128
    assert m.kv_bytes_per_token(2) == 2 * 80 * 8 * 128 * 2
    mha = load_model("llama-2-13b")  # 40 layers, 40 KV heads of 128
    assert mha.kv_bytes_per_token(2) == 2 * 40 * 40 * 128 * 2


def test_weight_bytes_shrink_with_bits_and_carry_group_scales():
    m = load_model("llama-2-7b")
    b16, b8, b4, b3 = (m.layer_weight_bytes(b) for b in (16, 8, 4, 3))
    assert b16 > b8 > b4 > b3
    matrix = m.matmul_params_per_layer
    # 4-bit: half a byte per weight plus 4 bytes of scale+zero per 128 weights, norms at 16-bit
    assert b4 == pytest.approx(matrix * 0.5 + matrix / 128 * 4 + 2 * (m.params_per_layer - matrix), rel=1e-6)


def test_flops_include_the_quadratic_attention_term():
    m = load_model("llama-3.1-8b")
    short, long = m.prefill_flops_per_token_layer(128), m.prefill_flops_per_token_layer(32768)
    assert long > short * 1.5  # attention dominates at 32k tokens
    assert m.decode_flops_per_token_layer(0) == pytest.approx(m.linear_flops_per_token_layer + 4 * 32 * 128)
    # linear FLOPs are 2 per weight a token meets
    assert m.linear_flops_per_token_layer == 2 * m.matmul_params_per_layer


def test_moe_reads_only_touched_experts():
    m = load_model("mixtral-8x7b")
    assert m.experts_touched(1) == pytest.approx(2)
    assert m.experts_touched(10_000) == pytest.approx(8)
    one = m.layer_weight_bytes_read(16, 1)
    assert one < 0.4 * m.layer_weight_bytes(16)
    assert m.layer_weight_bytes_read(16, 10_000) == pytest.approx(m.layer_weight_bytes(16))
    assert m.linear_flops_per_token_layer < 0.4 * 2 * m.matmul_params_per_layer


def test_reads_a_user_config_json(write):
    cfg = write(
        "my-model/config.json",
        """{"model_type": "qwen2", "hidden_size": 1024,
        "intermediate_size": 2816, "num_hidden_layers": 24, "num_attention_heads": 16,
        "num_key_value_heads": 16, "vocab_size": 151936, "tie_word_embeddings": true}""",
    )
    m = load_model(str(cfg.parent))
    assert m.name == "my-model" and m.qkv_bias and m.tie_word_embeddings
    assert 0.4e9 < m.total_params < 0.55e9  # Qwen1.5-0.5B-like


def test_opt_and_bloom_are_plain_mlps_with_bias():
    for name in ("opt-13b", "bloom-176b"):
        m = load_model(name)
        assert not m.gated_mlp and m.linear_bias and m.layer_norm_bias


def test_check_tp_lists_valid_degrees():
    from hetserve.errors import HetserveError

    m = load_model("smollm2-135m")  # 9 heads, 3 KV heads
    m.check_tp(3)
    m.check_tp(2)  # KV heads split 2 + 1
    m.check_tp(9)  # each KV head on 3 ranks
    for tp in (4, 6, 0):
        with pytest.raises(
            HetserveError,
            match=r"cannot split the 9 attention heads \(3 KV heads\).*"
            r"use one of \[1, 2, 3, 9\]",
        ):
            m.check_tp(tp)
    big = load_model("llama-2-70b")  # 64 heads, 8 KV heads
    for tp in (3, 5, 8, 16, 64):
        big.check_tp(tp)
    with pytest.raises(HetserveError, match=r"use one of \[1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64\]"):
        big.check_tp(12)


def test_tp_rule_is_torch_free():
    import subprocess
    import sys

    code = (
        "import sys; from hetserve.specs.models import tp_supported; import hetserve.runtime.model.tp; "
        "assert tp_supported(9, 3, 2) and 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kv_heads_must_divide_heads():
    from hetserve.errors import HetserveError

    with pytest.raises(HetserveError, match="must divide"):
        model_from_hf_config(
            {
                "model_type": "llama",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 3,
                "vocab_size": 100,
            },
            "bad",
        )


def test_planner_and_engine_read_config_json_alike():
    """The planner's ModelSpec and the engine's LlamaConfig come from one reader of config.json: the same
    sizes, defaults and bias rule, and one error naming a missing field."""
    from hetserve.errors import HetserveError
    from hetserve.runtime.model.config import LlamaConfig
    from hetserve.specs.models import model_from_hf_config

    cfg = {
        "model_type": "qwen2",
        "hidden_size": 896,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    }
    spec, engine = model_from_hf_config(cfg, "q"), LlamaConfig.from_hf(cfg)
    for field in (
        "hidden_size",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "intermediate_size",
        "num_layers",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
        "qkv_bias",
    ):
        assert getattr(spec, field) == getattr(engine, field), field
    assert spec.head_dim == 64 and spec.max_position_embeddings == 4096 and spec.qkv_bias
    broken = {k: v for k, v in cfg.items() if k != "intermediate_size"}
    for read in (
        lambda: model_from_hf_config(broken, "q", source="c.json"),
        lambda: LlamaConfig.from_hf(broken),
    ):
        with pytest.raises(HetserveError, match="lacks 'intermediate_size'"):
            read()


@pytest.mark.parametrize("name,billions", sorted(ACTIVE.items()))
def test_moe_activated_parameters_match_published(name, billions):
    m = load_model(name)
    dense = m.total_params - m.params_per_layer * m.num_layers  # embeddings, head, final norm
    active = m.active_params_per_layer * m.num_layers + dense
    assert active / 1e9 == pytest.approx(billions, rel=0.02)


@pytest.mark.parametrize(
    "model_id,builtin",
    [
        ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b"),
        ("meta-llama/Llama-2-70b-chat-hf", "llama-2-70b"),
        ("Qwen/Qwen3-30B-A3B-Instruct-2507", "qwen3-30b-a3b"),
        ("mistralai/Mistral-7B-Instruct-v0.3", "mistral-7b"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m"),
        ("bigscience/bloom", "bloom-176b"),
        ("google/gemma-2-9b-it", "gemma-2-9b"),
        ("google/gemma-3-27b-it", "gemma-3-27b"),
    ],
)
def test_hugging_face_ids_name_the_builtin_of_their_architecture(model_id, builtin):
    assert load_model(model_id) == load_model(builtin)


def test_an_unknown_hugging_face_id_says_how_to_use_it_without_a_download():
    from hetserve.errors import HetserveError

    with pytest.raises(HetserveError) as e:
        load_model("microsoft/phi-4")
    assert "nothing is downloaded" in str(e.value) and "config.json" in str(e.value)


def test_deepseek_v3_latent_attention_and_shared_experts_match_published():
    """DeepSeek-V3 (its paper and model card): 671B parameters, 37B activated per token; MLA caches
    kv_lora_rank 512 + rope 64 elements per token and layer, the same on every tensor-parallel rank."""
    m = load_model("deepseek-v3")
    dense = m.total_params - m.params_per_layer * m.num_layers
    assert m.total_params / 1e9 == pytest.approx(671, rel=0.005)
    assert (m.active_params_per_layer * m.num_layers + dense) / 1e9 == pytest.approx(37, rel=0.02)
    assert m.kv_bytes_per_token(2) == 61 * 576 * 2
    assert m.kv_share_per_gpu(8) == 1.0  # the latent is not split by TP
    gqa = load_model("llama-3.1-70b")
    assert gqa.kv_share_per_gpu(8) == 1 / 8 and gqa.kv_share_per_gpu(16) == 1 / 8  # replicated KV heads
    # a dense first layer has no experts: the averaged layer reads fewer expert bytes than all-MoE would
    assert m.layer_weight_bytes_read(16, 1) < m.layer_weight_bytes(16)
    assert load_model("deepseek-ai/DeepSeek-R1") == m


#: Gemma technical reports (Gemma 2: Table 2; Gemma 3: Table 1): embedding and non-embedding parameters
#: of the language model (Gemma 3's 417M vision encoder is not served and not counted).
GEMMA_PUBLISHED = {
    "gemma-2-9b": (917_504_000, 8_324_201_984),
    "gemma-2-27b": (1_179_648_000, 26_047_480_320),
    "gemma-3-12b": (1_012e6, 10_759e6),
    "gemma-3-27b": (1_416e6, 25_600e6),
}


@pytest.mark.parametrize("name", sorted(GEMMA_PUBLISHED))
def test_gemma_parameters_match_the_technical_reports(name):
    m = load_model(name)
    embedding, rest = GEMMA_PUBLISHED[name]
    own_embedding = m.vocab_size * m.hidden_size  # tied with the LM head
    assert own_embedding == pytest.approx(embedding, rel=0.01)
    assert m.total_params - own_embedding == pytest.approx(rest, rel=0.001)


def test_gemma_sliding_layers_follow_each_generation_rule():
    """Gemma 2 slides on every other layer (4,096 tokens); Gemma 3 on five of every six (1,024)."""
    g2, g3 = load_model("gemma-2-9b"), load_model("gemma-3-27b")
    assert (g2.sliding_layers, g2.sliding_window) == (21, 4096)
    assert (g3.sliding_layers, g3.sliding_window, g3.num_layers) == (52, 1024, 62)
    # a 32k-token Gemma 3 sequence holds its 10 global layers' KV in full and 1,024 tokens of the rest
    assert g3.kv_slots(32_768) == -(-(10 * 32_768 + 52 * 1024) // 62)
    assert g3.kv_slots(800) == 800
    # attention past the window: a sliding layer's decode token reads 1,024 keys, a global one all
    assert g3.attention_pairs(1, 9_999) == pytest.approx((10 * 10_000 + 52 * 1024) / 62)
    assert load_model("llama-3.1-8b").kv_slots(32_768) == 32_768


def test_gemma_layer_types_override_the_pattern_and_mistakes_are_named():
    from hetserve.errors import HetserveError

    cfg = {
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "num_hidden_layers": 4,
        "vocab_size": 100,
        "sliding_window": 32,
        "layer_types": ["sliding_attention", "full_attention", "full_attention", "full_attention"],
    }
    assert model_from_hf_config(cfg, "tiny").sliding_layers == 1
    with pytest.raises(HetserveError, match="layer_types"):
        model_from_hf_config({**cfg, "layer_types": ["full_attention"]}, "tiny")
    with pytest.raises(HetserveError, match="text_config"):
        model_from_hf_config({"model_type": "gemma3"}, "tiny")
    with pytest.raises(HetserveError, match="sliding_window"):
        model_from_hf_config({**cfg, "sliding_window": 0}, "tiny")
