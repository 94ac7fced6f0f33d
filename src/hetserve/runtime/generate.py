"""One-shot text generation for the ``hetserve generate`` command."""

from __future__ import annotations

import sys
from typing import TextIO


def run_generate(
    model: str,
    prompt: str,
    *,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    chat: bool = True,
    system: str | None = None,
    stop: list[str] | None = None,
    dtype: str = "float32",
    threads: int | None = None,
    stream: TextIO | None = sys.stdout,
) -> str:
    """Generate a reply to ``prompt`` with ``model`` and return it, streaming it to ``stream``.

    ``model`` is a GGUF file, a Hugging Face directory (config.json, tokenizer.json, *.safetensors)
    or a known name (``smollm2-135m``). With ``chat`` the prompt (and optional ``system`` message) is
    formatted with the model's chat template. User mistakes raise ``ValueError`` with a fix.
    """
    from .model.source import ModelSourceError, resolve_model

    resolve_model(model)  # report a bad model name before anything heavy is imported
    try:
        import torch

        from .engine import EngineConfig, LLMEngine
        from .sampling import SamplingParams
    except ImportError as exc:
        raise ModelSourceError(
            f"text generation needs the '{exc.name}' package: pip install "
            f"'hetserve[engine]' (with the CPU build of torch)"
        ) from exc

    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=list(stop or []),
    )
    if threads:
        torch.set_num_threads(threads)
    engine = LLMEngine.from_model(model, EngineConfig(dtype=dtype, max_batch_size=1))
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        if not engine.tokenizer.chat_template:
            raise ModelSourceError(f"{model} has no chat template; generate without chat formatting")
        prompt_ids = engine.tokenizer.encode_chat(messages)
    else:
        prompt_ids = engine.tokenizer.encode(prompt)
    request_id = engine.add_request(prompt_ids, params)
    text = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == request_id:
                text = out.text
                if stream is not None and out.new_text:
                    stream.write(out.new_text)
                    stream.flush()
    if stream is not None:
        stream.write("\n")
        stream.flush()
    return text
