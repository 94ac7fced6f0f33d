"""``hetserve serve``: load a model (optionally quantised and configured by a plan) and serve it."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from ...errors import HetserveError


@dataclass
class ServeOptions:
    model: str
    plan: str | None = None
    served_model_name: str | None = None
    dtype: str = "float32"
    weight_bits: int | None = None        # None: the plan's per-layer bits, else 16
    group_size: int = 64
    kv_cache_gb: float = 0.5
    max_batch_size: int | None = None
    max_batch_tokens: int | None = None
    chunk_size: int | None = None
    policy: str | None = None
    max_model_len: int | None = None
    prefix_caching: bool = True
    notes: list[str] = field(default_factory=list)


def plan_settings(path: str, num_layers: int) -> tuple[dict, list[int] | None, list[str]]:
    """Scheduler settings and per-layer weight bits from a plan's first instance (plus notes to print)."""
    from ...plan import load_plan
    from ..quant import plan_layer_bits

    dep = load_plan(path)
    inst = next(iter(dep.instances.values()))
    p = inst.plan
    settings = dict(max_num_seqs=p.max_batch_size, max_num_batched_tokens=p.max_batch_tokens,
                    prefill_chunk_size=p.chunk_size, policy=p.policy.replace("-", "_"), block_size=p.block_size)
    bits = plan_layer_bits(dep, inst.name)
    notes = [f"plan {dep.name}: instance '{inst.name}' ({inst.role}) settings: max_batch_size={p.max_batch_size}, "
             f"max_batch_tokens={p.max_batch_tokens}, chunk_size={p.chunk_size}, policy={p.policy}"]
    if len(dep.instances) > 1 or len(inst.servers) > 1:
        notes.append(f"plan {dep.name}: {len(dep.instances)} instances, {len(inst.servers)} servers in the first "
                     "chain; this process runs one colocated engine with the first instance's settings")
    if len(set(bits)) == 1:
        bits = [bits[0]] * num_layers
    elif len(bits) != num_layers:
        raise HetserveError(f"--plan: the plan gives per-layer bits for {dep.model.name} ({len(bits)} layers), but "
                            f"the served model has {num_layers} layers; plan for the served model")
    return settings, bits, notes


def build_engine(opts: ServeOptions):
    """The engine for ``opts``: model loaded, quantised as asked, scheduler configured."""
    from ..engine import EngineConfig, LLMEngine
    from ..model.source import load_model
    from ..quant import parse_layer_bits, quantize_model

    model, tokenizer = load_model(opts.model, dtype=opts.dtype)
    settings: dict = {}
    bits: list[int] | None = None
    if opts.plan:
        settings, bits, notes = plan_settings(opts.plan, model.config.num_layers)
        opts.notes.extend(notes)
    for key, value in (("max_num_seqs", opts.max_batch_size), ("max_num_batched_tokens", opts.max_batch_tokens),
                       ("prefill_chunk_size", opts.chunk_size), ("policy", opts.policy)):
        if value is not None:
            settings[key] = value.replace("-", "_") if key == "policy" else value
    if opts.weight_bits is not None:
        bits = [opts.weight_bits] * model.config.num_layers
    if bits is not None:
        bits = parse_layer_bits(bits, model.config.num_layers)
        if any(b != 16 for b in bits):
            quantize_model(model, bits, opts.group_size)
            opts.notes.append(f"weights: {_describe_bits(bits)} (group size {opts.group_size})")
    try:
        config = EngineConfig(dtype=opts.dtype, kv_cache_gb=opts.kv_cache_gb, max_model_len=opts.max_model_len,
                              enable_prefix_caching=opts.prefix_caching, **settings)
        return LLMEngine(model, tokenizer, config)
    except ValueError as exc:
        raise HetserveError(str(exc)) from None


def _describe_bits(bits: list[int]) -> str:
    counts = {b: bits.count(b) for b in sorted(set(bits), reverse=True)}
    return ", ".join(f"{n} layers at {'model dtype' if b == 16 else f'int{b}'}" for b, n in counts.items())


def served_name(model: str) -> str:
    from pathlib import Path

    path = Path(model)
    return model if not (path.suffix == ".gguf" or path.is_dir()) else (path.stem if path.suffix else path.name)


def add_serve_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    s.add_argument("--model", required=True, help="GGUF file, Hugging Face directory, or smollm2-135m")
    s.add_argument("--plan", help="plan YAML: its first instance's scheduler settings and per-layer bits apply")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", help="the model id clients send (default: the --model name)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--weight-bits", type=int, choices=[16, 8, 4], help="quantise every layer (overrides the plan)")
    s.add_argument("--group-size", type=int, default=64, choices=[64, 128], help="quantisation group size")
    s.add_argument("--kv-cache-gb", type=float, default=0.5, help="memory for the paged KV cache (default 0.5)")
    s.add_argument("--max-batch-size", type=int, help="most requests in a step (default 32, or the plan's)")
    s.add_argument("--max-batch-tokens", type=int, help="most tokens in a step")
    s.add_argument("--chunk-size", type=int, help="chunked prefill: most prompt tokens per request per step")
    s.add_argument("--policy", choices=["decode-first", "prefill-first"])
    s.add_argument("--max-model-len", type=int, help="context limit (default: the model's)")
    s.add_argument("--no-prefix-caching", action="store_true")
    s.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)
    return s


def cmd_serve(args) -> int:
    for flag, value, ok in (("--port", args.port, 0 <= args.port <= 65535),
                            ("--kv-cache-gb", args.kv_cache_gb, args.kv_cache_gb > 0),
                            ("--max-batch-size", args.max_batch_size, args.max_batch_size is None or args.max_batch_size >= 1),
                            ("--max-batch-tokens", args.max_batch_tokens,
                             args.max_batch_tokens is None or args.max_batch_tokens >= 1),
                            ("--chunk-size", args.chunk_size, args.chunk_size is None or args.chunk_size >= 1),
                            ("--max-model-len", args.max_model_len, args.max_model_len is None or args.max_model_len >= 2),
                            ("--threads", args.threads, args.threads is None or args.threads >= 1)):
        if not ok:
            raise HetserveError(f"{flag}={value} is out of range")
    try:
        import torch
        import uvicorn

        from .server import create_app
    except ImportError as exc:
        raise HetserveError(f"serving needs the '{exc.name}' package: pip install 'hetserve[serve]'") from None
    from ..model.source import resolve_model

    resolve_model(args.model)  # a bad name is reported before anything is loaded
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = ServeOptions(model=args.model, plan=args.plan, served_model_name=args.served_model_name, dtype=args.dtype,
                        weight_bits=args.weight_bits, group_size=args.group_size, kv_cache_gb=args.kv_cache_gb,
                        max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_tokens,
                        chunk_size=args.chunk_size, policy=args.policy, max_model_len=args.max_model_len,
                        prefix_caching=not args.no_prefix_caching)
    engine = build_engine(opts)
    name = args.served_model_name or served_name(args.model)
    for note in opts.notes:
        print(note, file=sys.stderr)
    c = engine.config
    print(f"serving '{name}' on http://{args.host}:{args.port} (context {engine.max_model_len}, "
          f"{engine.runner.num_blocks} KV blocks of {c.block_size}, max batch {c.max_num_seqs}, "
          f"{torch.get_num_threads()} threads)", file=sys.stderr)
    uvicorn.run(create_app(engine, name), host=args.host, port=args.port, log_level=args.log_level)
    return 0
