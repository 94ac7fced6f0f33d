"""vLLM: one ``vllm serve`` per plan instance (flags as in vLLM's engine arguments, docs/deploy.md)."""

from __future__ import annotations

import json

from .common import Export, InstanceAsk, Ports, Step, host_ref, torch_dtype
from .gaps import EngineCaps

CAPS = EngineCaps(name="vLLM", even_stages_per_node=False, fp8_kv="fp8")
RAY_PORT = 6379
NIXL_SIDE_CHANNEL_PORT = 5600


def engine_args(ask: InstanceAsk, model: str, ports: Ports, max_model_len: int, pd: bool) -> list[str]:
    """``vllm serve`` and its arguments for one instance (the model id first, as the CLI takes it)."""
    argv = ["vllm", "serve", model, "--host", "0.0.0.0", "--port", str(ports.http)]
    if ask.expert_parallel:
        # data-parallel attention over the stage's GPUs, experts spread over them (vLLM's EP deployment)
        argv += [
            "--tensor-parallel-size",
            "1",
            "--data-parallel-size",
            str(ask.tp),
            "--enable-expert-parallel",
        ]
        argv += ["--pipeline-parallel-size", str(ask.pp)]
    else:
        argv += ["--tensor-parallel-size", str(ask.tp), "--pipeline-parallel-size", str(ask.pp)]
    if ask.multi_node:
        argv += ["--distributed-executor-backend", "ray"]
    argv += ["--dtype", torch_dtype(ask.kv_dtype)]
    if ask.bits == 8:
        argv += ["--quantization", "fp8"]
    per_lane = max(1, ask.max_batch_size // ask.micro_batches)
    argv += ["--max-num-seqs", str(per_lane), "--max-num-batched-tokens", str(ask.max_batch_tokens)]
    if ask.chunk_size is not None:
        argv += ["--enable-chunked-prefill"]
        if ask.chunk_size < ask.max_batch_tokens:
            argv += ["--long-prefill-token-threshold", str(ask.chunk_size)]
    else:
        # whole prompts: the plan assumes a prompt and its output fit in one step's token budget
        argv += [
            "--no-enable-chunked-prefill",
            "--max-model-len",
            str(min(ask.max_batch_tokens, max_model_len)),
        ]
    if ask.kv_dtype == "fp8":
        argv += ["--kv-cache-dtype", CAPS.fp8_kv]
    argv += ["--block-size", str(ask.block_size)]
    argv += ["--gpu-memory-utilization", f"{ask.memory_utilisation:g}"]
    if pd:
        config = {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
        argv += ["--kv-transfer-config", json.dumps(config, separators=(",", ":"))]
    return argv


def export(
    out: Export, asks: list[InstanceAsk], ports: dict[str, Ports], served_name: str, max_model_len: int
):
    pd = any(a.role != "mixed" for a in asks)
    ray_clusters = 0
    for a in asks:
        p = ports[a.name]
        argv = engine_args(a, out.model, p, max_model_len, pd and a.role != "mixed")
        argv += ["--served-model-name", served_name]
        env = {}
        if a.pp > 1:
            env["VLLM_PP_LAYER_PARTITION"] = ",".join(map(str, a.layer_partition))
        if pd and a.role != "mixed":
            env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = host_ref(a.head)
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(NIXL_SIDE_CHANNEL_PORT + 8 * p.aux)
        head_gpus = ",".join(map(str, a.gpus_on(a.head)))
        comment = [
            f"instance {a.name} ({a.role}): TP {a.tp} x PP {a.pp}, layers {a.layer_partition}, "
            f"on {', '.join(a.nodes)}",
            f"--gpu-memory-utilization {a.memory_utilisation:g}: per GPU, the weights, activations and "
            "this instance's kv_share of the KV room",
            "  (90% of the GPU minus weights and activations) over the GPU's memory; the smallest over the stages",
        ]
        wait_gpus = None
        if a.multi_node:
            ray_port = RAY_PORT + ray_clusters
            ray_clusters += 1
            address = f"{host_ref(a.head)}:{ray_port}"
            out.steps.append(
                Step(
                    a.head,
                    a.name,
                    ["ray", "start", "--head", f"--port={ray_port}", f"--num-gpus={len(a.gpus_on(a.head))}"],
                    env={"CUDA_VISIBLE_DEVICES": head_gpus},
                    comment=[f"instance {a.name}: the Ray head of its {len(a.nodes)} nodes"],
                    background=False,
                )
            )
            for n in a.nodes[1:]:
                out.steps.append(
                    Step(
                        n,
                        a.name,
                        ["ray", "start", f"--address={address}", f"--num-gpus={len(a.gpus_on(n))}"],
                        env={"CUDA_VISIBLE_DEVICES": ",".join(map(str, a.gpus_on(n)))},
                        comment=[
                            f"instance {a.name}: join the Ray cluster on {a.head} with GPUs "
                            f"{a.gpus_on(n)} (stages {', '.join(s.server for s in a.stages_on(n))})"
                        ],
                        background=False,
                        retry=True,
                    )
                )
            env["RAY_ADDRESS"] = f"127.0.0.1:{ray_port}"
            wait_gpus = (f"127.0.0.1:{ray_port}", sum(s.tp for s in a.stages))
        out.steps.append(
            Step(
                a.head,
                a.name,
                argv,
                env={"CUDA_VISIBLE_DEVICES": head_gpus, **env},
                comment=comment,
                wait_gpus=wait_gpus,
                engine=True,
            )
        )
        out.urls[a.name] = f"http://{host_ref(a.head)}:{p.http}"
        notes = []
        if a.micro_batches != a.pp and a.pp > 1:
            notes.append(
                f"vLLM keeps {a.pp} batches in flight (one per stage); the plan asks {a.micro_batches}"
            )
        if a.pipelining == "per-request" and a.pp > 1:
            notes.append(
                "the plan pipelines per request; vLLM moves one batch per stage through the pipeline"
            )
        if a.micro_batches > 1:
            notes.append(f"--max-num-seqs {max(1, a.max_batch_size // a.micro_batches)} per batch in flight")
        if a.policy == "prefill-first":
            notes.append("policy prefill-first has no vLLM flag; vLLM schedules running requests first")
        if a.chunk_size is not None and a.chunk_size < a.max_batch_tokens:
            notes.append(
                f"chunk_size {a.chunk_size} is --long-prefill-token-threshold (a prompt alone in a step may "
                "take the whole budget)"
            )
        if a.multi_node and len(a.nodes) > 2:
            notes.append(
                "Ray orders the worker nodes by their GPU count and address: check that the stages land on "
                f"{', '.join(a.nodes[1:])} in this order (`ray status`, vLLM's startup log)"
            )
        if a.role != "mixed":
            notes.append(
                "P/D: a proxy must send each request to a prefill instance, then to a decode instance "
                "with the returned kv_transfer_params (see docs/deploy.md)"
            )
        out.notes[a.name] = notes
