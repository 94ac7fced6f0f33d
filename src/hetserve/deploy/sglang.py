"""SGLang: one ``python -m sglang.launch_server`` per plan instance and node, plus a P/D router."""

from __future__ import annotations

from .common import Export, InstanceAsk, Ports, Step, host_ref, torch_dtype
from .gaps import EngineCaps

CAPS = EngineCaps(name="SGLang", even_stages_per_node=True, fp8_kv="fp8_e5m2")
DIST_INIT_PORT = 29500
BOOTSTRAP_PORT = 8998
ROUTER_PORT = 30000


def engine_args(ask: InstanceAsk, model: str, ports: Ports, node_rank: int = 0) -> list[str]:
    """``python -m sglang.launch_server`` and its arguments for one instance on its ``node_rank``-th node."""
    argv = ["python", "-m", "sglang.launch_server", "--model-path", model]
    argv += ["--host", "0.0.0.0", "--port", str(ports.http), "--tp", str(ask.tp), "--pp-size", str(ask.pp)]
    if ask.expert_parallel:  # data-parallel attention, experts spread over the TP group's GPUs
        argv += ["--enable-dp-attention", "--dp", str(ask.tp), "--ep-size", str(ask.tp)]
    if ask.multi_node:
        argv += ["--nnodes", str(len(ask.nodes)), "--node-rank", str(node_rank)]
        argv += ["--dist-init-addr", f"{host_ref(ask.head)}:{DIST_INIT_PORT + ports.aux}"]
    argv += ["--dtype", torch_dtype(ask.kv_dtype)]
    if ask.bits == 8:
        argv += ["--quantization", "fp8"]
    if ask.kv_dtype == "fp8":
        argv += ["--kv-cache-dtype", CAPS.fp8_kv]
    argv += [
        "--max-running-requests",
        str(ask.max_batch_size),
        "--max-prefill-tokens",
        str(ask.max_batch_tokens),
    ]
    argv += ["--chunked-prefill-size", str(ask.chunk_size if ask.chunk_size is not None else -1)]
    argv += ["--page-size", str(ask.block_size), "--mem-fraction-static", f"{ask.memory_static:g}"]
    if ask.role != "mixed":
        argv += ["--disaggregation-mode", ask.role, "--disaggregation-transfer-backend", "nixl"]
        if ask.role == "prefill":
            argv += ["--disaggregation-bootstrap-port", str(BOOTSTRAP_PORT + ports.aux)]
    return argv


def export(
    out: Export, asks: list[InstanceAsk], ports: dict[str, Ports], served_name: str, max_model_len: int
):
    for a in asks:
        p = ports[a.name]
        env = {}
        if a.pp > 1:
            env["SGLANG_PP_LAYER_PARTITION"] = ",".join(map(str, a.layer_partition))
        for rank, node in enumerate(a.nodes):
            argv = engine_args(a, out.model, p, rank) + ["--served-model-name", served_name]
            comment = [
                f"instance {a.name} ({a.role}): TP {a.tp} x PP {a.pp}, layers {a.layer_partition}"
                + (f", node rank {rank} of {len(a.nodes)}" if a.multi_node else ""),
                f"--mem-fraction-static {a.memory_static:g}: per GPU, the weights and this instance's kv_share "
                "of the KV room (90% of",
                "  the GPU minus weights and activations) over the GPU's memory; the smallest over the stages",
            ]
            cvd = ",".join(map(str, a.gpus_on(node)))
            out.steps.append(
                Step(
                    node, a.name, argv, env={"CUDA_VISIBLE_DEVICES": cvd, **env}, comment=comment, engine=True
                )
            )
        out.urls[a.name] = f"http://{host_ref(a.head)}:{p.http}"
        notes = []
        if a.policy == "decode-first" and a.role == "mixed":
            notes.append("policy decode-first has no SGLang flag; SGLang admits waiting prompts first")
        if a.pipelining == "per-request" and a.pp > 1:
            notes.append("the plan pipelines per request; SGLang moves micro-batches through the pipeline")
        if a.micro_batches > 1 and a.pp > 1:
            notes.append(f"micro_batches {a.micro_batches}: SGLang sizes its pipeline micro-batches itself")
        out.notes[a.name] = notes
    prefills = [a for a in asks if a.role == "prefill"]
    decodes = [a for a in asks if a.role == "decode"]
    if prefills and decodes:
        argv = ["python", "-m", "sglang_router.launch_router", "--pd-disaggregation"]
        for a in prefills:
            argv += ["--prefill", out.urls[a.name], str(BOOTSTRAP_PORT + ports[a.name].aux)]
        for a in decodes:
            argv += ["--decode", out.urls[a.name]]
        argv += ["--host", "0.0.0.0", "--port", str(ROUTER_PORT)]
        out.steps.append(
            Step(
                "router",
                "router",
                argv,
                comment=["the P/D router: requests enter here and go to a prefill and a decode instance"],
            )
        )
