import os
from pathlib import Path

import numpy as np
import pytest
import torch

from hetserve.runtime.model.llama import LlamaModel
from hetserve.runtime.model.tiny import TINY_CHAT_TEMPLATE, TINY_MERGES, TINY_SPECIAL_TOKENS, tiny_vocab


@pytest.fixture(autouse=True, scope="session")
def _threads():
    """Two threads on an idle 2-core machine; one when other work is running, because a torch thread
    that gets descheduled stalls every parallel op (10x slower steps). HETSERVE_TEST_THREADS overrides."""
    busy = os.getloadavg()[0] > 0.8
    torch.set_num_threads(int(os.environ.get("HETSERVE_TEST_THREADS", 1 if busy else 2)))


def llamacpp_row_order(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """How llama.cpp's converter lays out q/k rows: each head's two rotary halves interleaved."""
    head_dim = w.shape[0] // num_heads
    return w.reshape(num_heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf(path: Path, model: LlamaModel, quant: str = "F32") -> Path:
    """Write ``model`` as llama.cpp would: GGUF names, permuted q/k rows, optional Q8_0 matrices."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), c.architecture)
    w.add_block_count(c.num_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_vocab_size(c.vocab_size)
    tokens = tiny_vocab() + [f"<extra_{i}>" for i in range(c.vocab_size - len(tiny_vocab()))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(TINY_SPECIAL_TOKENS) + [1] * (len(tokens) - len(TINY_SPECIAL_TOKENS)))
    w.add_token_merges([" ".join(m) for m in TINY_MERGES])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TINY_CHAT_TEMPLATE)
    for name, tensor in model.checkpoint_items():
        t = tensor.float().clone()
        if c.architecture == "llama":  # llama.cpp reorders q/k rows for this architecture only
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                t = llamacpp_row_order(t, c.num_heads)
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                t = llamacpp_row_order(t, c.num_kv_heads)
        if name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            gguf_name = f"blk.{index}.{_TO_GGUF[rest]}"
        else:
            gguf_name = {
                "embed_tokens.weight": "token_embd.weight",
                "norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight",
            }[name]
        array = t.numpy()
        if quant == "Q8_0" and array.ndim == 2:
            q = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gguf_name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gguf_name, np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
