"""``hetserve serve``: one engine in this process (``--model``), or a plan's workers behind a router (``--plan``);
``hetserve worker``: the workers of a plan held by another machine."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

from ...errors import HetserveError
from ...vocabulary import API_KEY_ENV, DEFAULT_KV_CACHE_GB, ENGINE_DTYPES, SCHEDULE_POLICIES, SchedulePolicy

TORCH_DTYPES = tuple(dict.fromkeys(ENGINE_DTYPES.values()))  # float32, float16, bfloat16
#: ``serve --model``: prompt tokens a request prefills per step. A step then holds at most one chunk and
#: a token of every running request, so a long prompt delays the other streams by one chunk's time.
DEFAULT_CHUNK_SIZE = 256


@dataclass
class ServeOptions:
    model: str
    served_model_name: str | None = None
    dtype: str = "float32"
    weight_bits: int | None = None  # None: the model's dtype
    group_size: int = 64
    kv_cache_gb: float = DEFAULT_KV_CACHE_GB
    max_batch_size: int | None = None
    max_batch_tokens: int | None = None
    chunk_size: int | None = None  # None: DEFAULT_CHUNK_SIZE, unless chunked_prefill is off
    chunked_prefill: bool = True
    policy: SchedulePolicy | None = None
    max_model_len: int | None = None
    prefix_caching: bool = True
    notes: list[str] = field(default_factory=list)


def build_engine(opts: ServeOptions):
    """The engine for ``opts``: model loaded, quantised as asked, scheduler configured."""
    from ..engine import EngineConfig, LLMEngine
    from ..model.source import load_model
    from ..quant import parse_layer_bits, quantize_model

    model, tokenizer = load_model(opts.model, dtype=opts.dtype)
    chunk, budget = opts.chunk_size, opts.max_batch_tokens
    if opts.chunked_prefill:
        chunk = chunk or DEFAULT_CHUNK_SIZE
        if budget is None:  # one chunk beside a decode token for every request of a full batch
            budget = chunk + (opts.max_batch_size or EngineConfig.max_batch_size)
    given = {
        "max_batch_size": opts.max_batch_size,
        "max_batch_tokens": budget,
        "chunk_size": chunk,
        "policy": opts.policy,
    }
    settings = {key: value for key, value in given.items() if value is not None}
    bits: list[int] | None = None
    if opts.weight_bits is not None:
        bits = [opts.weight_bits] * model.config.num_layers
    if bits is not None:
        bits = parse_layer_bits(bits, model.config.num_layers)
        if any(b != 16 for b in bits):
            quantize_model(model, bits, opts.group_size)
            opts.notes.append(f"weights: {_describe_bits(bits)} (group size {opts.group_size})")
    try:
        config = EngineConfig(
            dtype=opts.dtype,
            kv_cache_gb=opts.kv_cache_gb,
            max_model_len=opts.max_model_len,
            enable_prefix_caching=opts.prefix_caching,
            **settings,
        )
        return LLMEngine(model, tokenizer, config)
    except ValueError as exc:
        raise HetserveError(str(exc)) from None


def _describe_bits(bits: list[int]) -> str:
    counts = {b: bits.count(b) for b in sorted(set(bits), reverse=True)}
    return ", ".join(f"{n} layers at {'model dtype' if b == 16 else f'int{b}'}" for b, n in counts.items())


def served_name(model: str) -> str:
    from pathlib import Path

    path = Path(model)
    return (
        model if not (path.suffix == ".gguf" or path.is_dir()) else (path.stem if path.suffix else path.name)
    )


def add_serve_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    s.add_argument(
        "--model",
        help="GGUF file, Hugging Face directory, or smollm2-135m (with --plan: default the plan's model)",
    )
    s.add_argument("--plan", help="plan YAML: run every server of it as worker processes (see docs/serve.md)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", help="the model id clients send (default: the --model name)")
    s.add_argument(
        "--dtype",
        choices=TORCH_DTYPES,
        help="run dtype (default float32; with --plan: each server's kv_dtype)",
    )
    s.add_argument(
        "--weight-bits",
        type=int,
        choices=[16, 8, 4],
        help="quantise every layer (with --plan: the servers' bits apply)",
    )
    s.add_argument("--group-size", type=int, default=64, choices=[64, 128], help="quantisation group size")
    s.add_argument(
        "--kv-cache-gb",
        type=float,
        default=DEFAULT_KV_CACHE_GB,
        help=f"memory for the paged KV cache (default {DEFAULT_KV_CACHE_GB}; with --plan: per worker, "
        "split by kv_share)",
    )
    s.add_argument(
        "--max-batch-size",
        "--max-num-seqs",
        dest="max_batch_size",
        type=int,
        help="most requests in a step (default 32; with --plan: the instances')",
    )
    s.add_argument(
        "--max-batch-tokens",
        "--max-num-batched-tokens",
        dest="max_batch_tokens",
        type=int,
        help="most tokens in a step",
    )
    s.add_argument(
        "--chunk-size",
        type=int,
        help=f"chunked prefill: most prompt tokens per request per step (default {DEFAULT_CHUNK_SIZE})",
    )
    s.add_argument(
        "--no-chunked-prefill",
        "--no-enable-chunked-prefill",
        dest="chunked_prefill",
        action="store_false",
        help="prefill each prompt in one step (a long prompt then stalls every other stream meanwhile)",
    )
    s.add_argument("--policy", choices=SCHEDULE_POLICIES)
    s.add_argument("--max-model-len", type=int, help="context limit (default: the model's)")
    s.add_argument("--no-prefix-caching", action="store_true")
    s.add_argument(
        "--threads", type=int, help="torch threads (default: torch's choice; with --plan: 1 per worker)"
    )
    s.add_argument(
        "--servers", help="with --plan: comma-separated servers whose workers start here (default all)"
    )
    s.add_argument(
        "--rendezvous",
        help="with --plan: HOST:PORT the driver listens on (that address only) for workers started by "
        "'hetserve worker' on other machines; default a free port on 127.0.0.1",
    )
    s.add_argument(
        "--secret-file",
        help="with --plan and workers on other machines: file holding the secret they share (default: "
        "the HETSERVE_CLUSTER_SECRET environment variable)",
    )
    s.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        metavar="ADDRESS",
        help="with --plan: start every worker as a Ray actor on the Ray node whose custom resource "
        "'hetserve-node:NODE' names its plan node (ADDRESS: the Ray cluster; default RAY_ADDRESS or the "
        "one started on this machine); dead workers are started again through Ray",
    )
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_http_options(s)
    s.set_defaults(func=cmd_serve)
    return s


def add_http_options(s: argparse.ArgumentParser) -> None:
    from .limits import ServerLimits

    d = ServerLimits()
    g = s.add_argument_group("access and limits (see docs/serve.md)")
    g.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"require 'Authorization: Bearer KEY' on every /v1 route (default: ${API_KEY_ENV}; none)",
    )
    g.add_argument(
        "--allowed-hosts",
        help="comma-separated Host header names accepted besides localhost, 127.0.0.1, ::1, --host and IP "
        "addresses ('*': any)",
    )
    g.add_argument(
        "--max-body-bytes",
        type=int,
        default=d.max_body_bytes,
        help=f"request body limit (default {d.max_body_bytes})",
    )
    g.add_argument(
        "--max-prompt-chars",
        type=int,
        default=d.max_prompt_chars,
        help=f"characters of prompt text or message content per request (default {d.max_prompt_chars})",
    )
    g.add_argument(
        "--max-prompts-per-request",
        type=int,
        default=d.max_prompts_per_request,
        help=f"prompts in one /v1/completions request (default {d.max_prompts_per_request})",
    )
    g.add_argument(
        "--default-max-tokens",
        type=int,
        default=d.default_max_tokens,
        help=f"max_tokens of a chat request that gives none, within the context (default {d.default_max_tokens})",
    )
    g.add_argument(
        "--header-timeout",
        type=float,
        default=d.header_timeout,
        help=f"seconds for a request's headers to arrive (default {d.header_timeout:g})",
    )
    g.add_argument(
        "--body-timeout",
        type=float,
        default=d.body_timeout,
        help=f"seconds for a request's body to arrive (default {d.body_timeout:g})",
    )
    g.add_argument(
        "--timeout-keep-alive",
        type=float,
        default=d.timeout_keep_alive,
        help=f"seconds an idle connection stays open (default {d.timeout_keep_alive:g})",
    )
    g.add_argument(
        "--limit-concurrency",
        type=int,
        default=d.limit_concurrency,
        help=f"open connections before new requests get 503 (default {d.limit_concurrency}; 0: no limit)",
    )


def flag_error(exc: ValueError) -> HetserveError:
    """A settings object's ``ValueError`` ("max_body_bytes must be ...") as the flag's error."""
    return HetserveError(f"--{str(exc).split()[0].replace('_', '-')}: {exc}")


def http_settings(args):
    """``ServerLimits`` and ``Access`` from the serve options; HetserveError for a value out of range."""
    from .limits import Access, ServerLimits

    try:
        limits = ServerLimits(
            max_body_bytes=args.max_body_bytes,
            max_prompt_chars=args.max_prompt_chars,
            max_prompts_per_request=args.max_prompts_per_request,
            default_max_tokens=args.default_max_tokens,
            header_timeout=args.header_timeout,
            body_timeout=args.body_timeout,
            timeout_keep_alive=args.timeout_keep_alive,
            limit_concurrency=args.limit_concurrency or None,
        )
    except ValueError as exc:
        raise flag_error(exc) from None
    extra = [h for h in (args.allowed_hosts or "").split(",") if h.strip()]
    return limits, Access.for_bind(args.host, extra, api_key=args.api_key)


def access_note(args, access) -> str | None:
    from .limits import LOCAL_HOSTS

    if access.api_key is None and args.host not in LOCAL_HOSTS:
        return (
            f"note: listening on {args.host} without an API key: anyone who can reach this address can use "
            f"the server (set --api-key or ${API_KEY_ENV})"
        )
    return None


def cmd_serve(args) -> int:
    if args.limit_concurrency is not None and args.limit_concurrency < 0:
        raise HetserveError(f"--limit-concurrency={args.limit_concurrency} is out of range")
    limits, access = http_settings(args)
    for flag, value, ok in (
        ("--port", args.port, 0 <= args.port <= 65535),
        ("--kv-cache-gb", args.kv_cache_gb, args.kv_cache_gb > 0),
        ("--max-batch-size", args.max_batch_size, args.max_batch_size is None or args.max_batch_size >= 1),
        (
            "--max-batch-tokens",
            args.max_batch_tokens,
            args.max_batch_tokens is None or args.max_batch_tokens >= 1,
        ),
        ("--chunk-size", args.chunk_size, args.chunk_size is None or args.chunk_size >= 1),
        ("--max-model-len", args.max_model_len, args.max_model_len is None or args.max_model_len >= 2),
        ("--threads", args.threads, args.threads is None or args.threads >= 1),
    ):
        if not ok:
            raise HetserveError(f"{flag}={value} is out of range")
    try:
        import torch
        import uvicorn

        from .server import create_app, serve
    except ImportError as exc:
        raise HetserveError(
            f"serving needs the '{exc.name}' package: pip install 'hetserve[serve]'"
        ) from None
    if args.plan:
        return _serve_plan(args, uvicorn, create_app)
    if args.ray:
        raise HetserveError("--ray starts the workers of a plan: give --plan")
    if not args.model:
        raise HetserveError("--model is required (or give --plan)")
    from ..model.source import resolve_model

    resolve_model(args.model)  # a bad name is reported before anything is loaded
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = ServeOptions(
        model=args.model,
        served_model_name=args.served_model_name,
        dtype=args.dtype or "float32",
        weight_bits=args.weight_bits,
        group_size=args.group_size,
        kv_cache_gb=args.kv_cache_gb,
        max_batch_size=args.max_batch_size,
        max_batch_tokens=args.max_batch_tokens,
        chunk_size=args.chunk_size,
        chunked_prefill=args.chunked_prefill,
        policy=args.policy,
        max_model_len=args.max_model_len,
        prefix_caching=not args.no_prefix_caching,
    )
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    engine = build_engine(opts)
    name = args.served_model_name or served_name(args.model)
    for note in opts.notes:
        print(note, file=sys.stderr)
    c = engine.config
    prefill = f"prefill chunks of {c.chunk_size}" if c.chunk_size else "whole-prompt prefill"
    print(
        f"serving '{name}' on http://{args.host}:{args.port} (context {engine.max_model_len}, "
        f"{engine.runner.num_blocks} KV blocks of {c.block_size}, max batch {c.max_batch_size}, "
        f"{prefill}, {torch.get_num_threads()} threads)",
        file=sys.stderr,
    )
    note = access_note(args, access)
    if note:
        print(note, file=sys.stderr)
    serve(create_app(engine, name, limits, access), args.host, args.port, args.log_level)
    return 0


def _serve_plan(args, uvicorn, create_app) -> int:
    """Every server of the plan as worker processes, the router and the API here."""
    from ..cluster.launch import start_cluster

    limits, access = http_settings(args)
    ignored = [
        flag
        for flag, v in (
            ("--weight-bits", args.weight_bits),
            ("--max-batch-size", args.max_batch_size),
            ("--max-batch-tokens", args.max_batch_tokens),
            ("--chunk-size", args.chunk_size),
            ("--no-chunked-prefill", None if args.chunked_prefill else True),
            ("--policy", args.policy),
        )
        if v is not None
    ]
    if ignored:
        raise HetserveError(
            f"{', '.join(ignored)}: with --plan these come from the plan's servers and instances; "
            "edit the plan instead"
        )
    servers = [x.strip() for x in args.servers.split(",") if x.strip()] if args.servers else None
    secret = None  # default: made for this launch, or HETSERVE_CLUSTER_SECRET with remote workers
    if args.secret_file:
        from ..cluster.mesh import read_secret

        secret = read_secret(args.secret_file)
    print(f"starting the workers of {args.plan} (each loads its layers) ...", file=sys.stderr, flush=True)
    engine = start_cluster(
        args.plan,
        args.model,
        kv_cache_gb=args.kv_cache_gb,
        dtype=args.dtype,
        threads=args.threads or 1,
        servers=servers,
        rendezvous=args.rendezvous,
        prefix_caching=not args.no_prefix_caching,
        max_model_len=args.max_model_len,
        group_size=args.group_size,
        secret=secret,
        ray_address=args.ray,
    )
    name = args.served_model_name or served_name(args.model or engine.topo.model)
    print(
        f"serving '{name}' on http://{args.host}:{args.port}: plan {args.plan}, "
        f"{len(engine.instances)} instances over {engine.topo.world_size - 1} workers",
        file=sys.stderr,
    )
    for inst in engine.instances.values():
        chain = " -> ".join(f"{srv}{list(ranks)}" for srv, ranks in zip(inst.spec.servers, inst.spec.stages))
        chunk = inst.spec.scheduling.chunk_size
        print(
            f"  {inst.name} ({inst.spec.role}): {chain}, {inst.num_blocks} KV blocks of {inst.spec.block_size}, "
            f"{inst.spec.lanes} lane(s), "
            + (f"prefill chunks of {chunk}" if chunk else "whole-prompt prefill"),
            file=sys.stderr,
        )
    whole = [
        i.name
        for i in engine.instances.values()
        if not i.spec.scheduling.chunk_size and i.spec.role != "decode"
    ]
    if whole:
        print(
            f"note: {', '.join(whole)} prefill(s) whole prompts (the plan says chunk_size: null): one long "
            "prompt holds the other streams of its instance for its whole prefill; remove that line (a "
            "2,048-token chunk) or give a chunk_size to bound that to one chunk",
            file=sys.stderr,
        )
    from .server import serve

    note = access_note(args, access)
    if note:
        print(note, file=sys.stderr)
    try:  # serve returns on SIGINT and SIGTERM, so the workers are shut down and their files removed
        serve(create_app(engine, name, limits, access), args.host, args.port, args.log_level)
    finally:
        engine.shutdown()
    return 0


def add_worker_parser(sub) -> argparse.ArgumentParser:
    w = sub.add_parser("worker", help="start this machine's workers of a plan served from another machine")
    w.add_argument("--plan", required=True, help="the same plan file the serving machine uses")
    w.add_argument("--rendezvous", required=True, help="HOST:PORT given to 'hetserve serve --rendezvous'")
    w.add_argument(
        "--servers", required=True, help="comma-separated servers of the plan whose workers run here"
    )
    w.add_argument(
        "--model", help="GGUF file, Hugging Face directory or known name (default: the plan's model)"
    )
    w.add_argument("--dtype", choices=TORCH_DTYPES, help="override every server's kv_dtype")
    w.add_argument(
        "--kv-cache-gb",
        type=float,
        default=DEFAULT_KV_CACHE_GB,
        help="KV cache per worker (the same as the server's)",
    )
    w.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    w.add_argument("--group-size", type=int, default=64, choices=[64, 128])
    w.add_argument(
        "--secret-file",
        help="file holding the secret shared with the serving machine (default: the "
        "HETSERVE_CLUSTER_SECRET environment variable; one of the two is required)",
    )
    w.add_argument(
        "--bind",
        help="address the workers' sockets listen on (default: this machine's address towards the "
        "rendezvous host)",
    )
    w.set_defaults(func=cmd_worker)
    return w


def cmd_worker(args) -> int:
    from ..cluster.launch import run_workers
    from ..cluster.mesh import read_secret

    servers = [x.strip() for x in args.servers.split(",") if x.strip()]
    if args.threads < 1:
        raise HetserveError(f"--threads={args.threads} is out of range")
    return run_workers(
        args.plan,
        args.model,
        args.rendezvous,
        servers,
        kv_cache_gb=args.kv_cache_gb,
        dtype=args.dtype,
        threads=args.threads,
        group_size=args.group_size,
        secret=read_secret(args.secret_file),
        bind=args.bind,
    )
