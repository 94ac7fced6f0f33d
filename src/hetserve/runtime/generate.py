"""One-shot text generation for the ``hetserve generate`` command."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from ..report.progress import note


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
    note(f"loading {model} ...")
    t0 = time.perf_counter()
    engine = LLMEngine.from_model(model, EngineConfig(dtype=dtype, max_batch_size=1))
    note(f"loaded in {time.perf_counter() - t0:.1f} s")
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        if not engine.tokenizer.chat_template:
            raise ModelSourceError(f"{model} has no chat template; generate without chat formatting")
        prompt_ids = engine.tokenizer.encode_chat(messages)
    else:
        prompt_ids = engine.tokenizer.encode(prompt)
    start = time.perf_counter()
    request_id = engine.add_request(prompt_ids, params)
    text, tokens, first = "", 0, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == request_id:
                text, tokens = out.text, len(out.token_ids)
                if first is None and tokens:
                    first = time.perf_counter() - start
                if stream is not None and out.new_text:
                    stream.write(out.new_text)
                    stream.flush()
    if stream is not None:
        stream.write("\n")
        stream.flush()
    note(generation_summary(len(prompt_ids), tokens, first, time.perf_counter() - start))
    return text


def generation_summary(prompt_tokens: int, tokens: int, first_s: float | None, total_s: float) -> str:
    """'12 tokens in 1.90 s: first after 0.41 s (a 25-token prompt), then 7.4 tok/s'."""
    if not tokens or first_s is None:
        return f"no tokens generated ({prompt_tokens}-token prompt, {total_s:.2f} s)"
    rate = (tokens - 1) / (total_s - first_s) if tokens > 1 and total_s > first_s else float("nan")
    then = f", then {rate:.1f} tok/s" if rate == rate else ""
    return f"{tokens} tokens in {total_s:.2f} s: first after {first_s:.2f} s (a {prompt_tokens}-token prompt){then}"
