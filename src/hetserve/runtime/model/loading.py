"""Load a Llama-family model from a GGUF file or a Hugging Face safetensors directory.

Both paths yield ``(name, tensor)`` pairs under Hugging Face parameter names (without the ``model.``
prefix) that ``LlamaModel.load_weights`` places; tensors outside the model's layer range are skipped
before they are read or dequantised. A tensor-parallel shard reads each tensor of its layers whole, one
at a time, and keeps its part, so a process never holds more than its shard plus one checkpoint tensor.

GGUF: quantised tensors (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantised with ``gguf.quants``. For the
``llama`` architecture, llama.cpp's converter reorders the rows of ``attn_q``/``attn_k`` within each
head so the two rotary halves interleave; ``unpermute_rope_rows`` restores the Hugging Face order.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import LlamaConfig
from .llama import LlamaModel

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",
}
_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Architectures whose q/k rows llama.cpp reorders for its rotary layout.
_PERMUTED_ARCHS = {"llama"}


def gguf_to_hf_name(name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``layers.3.self_attn.q_proj.weight``; None for unknown tensors."""
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    m = _GGUF_BLOCK.fullmatch(name)
    if m and m.group(2) in _GGUF_LAYER_NAMES:
        return f"layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rope_rows(w: Tensor, num_heads: int) -> Tensor:
    """Undo llama.cpp's per-head row order (rotary pairs interleaved) back to halves-split order.

    Within each head of ``head_dim`` rows, llama.cpp stores row ``2 * i + j`` what Hugging Face keeps at
    row ``j * head_dim / 2 + i``. Works for weights [rows, cols] and biases [rows].
    """
    rows = w.shape[0]
    head_dim = rows // num_heads
    return w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---- GGUF -----------------------------------------------------------------------------------
def read_gguf(path: str | Path, *, arrays: bool = True):
    """(file, model config) of a GGUF file: the file is a ``gguf_file.GGUFFile`` (metadata in ``.meta``,
    tensors memory-mapped); ``arrays=False`` skips long metadata arrays, i.e. the tokenizer's vocabulary
    and merges."""
    from .gguf_file import GGUFFile

    f = GGUFFile(path, arrays=arrays)
    return f, LlamaConfig.from_gguf(f.meta, {t.name for t in f.tensors})


def gguf_weights(
    reader: Any, config: LlamaConfig, wanted: Callable[[str], bool]
) -> Iterator[tuple[str, Tensor]]:
    """Dequantised fp32 tensors of a GGUF file under Hugging Face names, for names ``wanted`` accepts."""
    from gguf.quants import dequantize

    for t in reader.tensors:
        name = gguf_to_hf_name(t.name)
        if name is None or not wanted(name):
            continue
        array = dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions fastest-first
        array = np.asarray(array, dtype=np.float32)
        if not array.flags.writeable:  # an unquantised tensor is a view of the memory-mapped file
            array = array.copy()
        tensor = torch.from_numpy(array.reshape(shape))
        if config.architecture in _PERMUTED_ARCHS:
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                tensor = unpermute_rope_rows(tensor, config.num_heads)
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                tensor = unpermute_rope_rows(tensor, config.num_kv_heads)
        yield name, tensor


def load_gguf(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    layer_start: int = 0,
    layer_end: int | None = None,
    device: str = "cpu",
    tp_rank: int = 0,
    tp_size: int = 1,
    tp_group: Any = None,
    arrays: bool = True,
) -> tuple[LlamaModel, dict[str, Any]]:
    """The model (layers ``[layer_start, layer_end)``, tensor-parallel shard ``tp_rank`` of ``tp_size``)
    of a GGUF file, and the file's metadata (without the tokenizer's arrays if ``arrays`` is False)."""
    reader, config = read_gguf(path, arrays=arrays)
    model = LlamaModel(
        config,
        layer_start,
        layer_end,
        dtype=dtype,
        device=device,
        tp_rank=tp_rank,
        tp_size=tp_size,
        tp_group=tp_group,
    )
    model.load_weights(gguf_weights(reader, config, model.wants))
    return model.eval(), reader.meta


# ---- Hugging Face safetensors directory -----------------------------------------------------
def safetensors_weights(directory: str | Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, Tensor]]:
    from safetensors import safe_open

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory}: no *.safetensors files")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name = key.removeprefix("model.")
                if wanted(name):
                    yield name, f.get_tensor(key)


def load_hf_directory(
    directory: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    layer_start: int = 0,
    layer_end: int | None = None,
    device: str = "cpu",
    tp_rank: int = 0,
    tp_size: int = 1,
    tp_group: Any = None,
) -> LlamaModel:
    """The model (layers ``[layer_start, layer_end)``, tensor-parallel shard ``tp_rank`` of ``tp_size``)
    of a Hugging Face directory (``config.json`` + ``*.safetensors``)."""
    directory = Path(directory)
    config = LlamaConfig.from_hf_file(directory / "config.json")
    model = LlamaModel(
        config,
        layer_start,
        layer_end,
        dtype=dtype,
        device=device,
        tp_rank=tp_rank,
        tp_size=tp_size,
        tp_group=tp_group,
    )
    model.load_weights(safetensors_weights(directory, model.wants))
    return model.eval()
