"""Kubernetes: a Deployment (one node) or LeaderWorkerSet (several nodes) and a Service per instance.

Pods land on the plan's nodes through two node labels (``hetserve.io/node``, ``hetserve.io/gpu``)
and request the plan's GPU count from the vendor's device plugin (``nvidia.com/gpu``, ``amd.com/gpu``).
The device plugin picks which GPUs of the node a pod gets, so the plan's GPU indices are not kept.
"""

from __future__ import annotations

import shlex

import yaml

from ..errors import HetserveError
from ..plan import Deployment
from .common import GPU_LABEL, GPU_RESOURCE, NODE_LABEL, Export, InstanceAsk, Ports, host_ref, safe_name

IMAGES = {
    ("vllm", "nvidia"): "vllm/vllm-openai:latest",
    ("vllm", "amd"): "rocm/vllm:latest",
    ("sglang", "nvidia"): "lmsysorg/sglang:latest",
    ("sglang", "amd"): "lmsysorg/sglang:latest-rocm",
}
LEADER = "$(LWS_LEADER_ADDRESS)"


class _Dumper(yaml.SafeDumper):
    """Writes repeated mappings (the labels) out in full instead of as YAML anchors."""

    def ignore_aliases(self, data) -> bool:
        return True


def _k8s_args(argv: list[str], ask: InstanceAsk) -> list[str]:
    """Script arguments in Kubernetes terms: the head's address is the LWS leader's."""
    return [a.replace(host_ref(ask.head), LEADER) for a in argv]


def _container(
    ask: InstanceAsk, engine: str, command: list[str], args: list[str], env: dict, gpus: int, port
):
    env_list = []
    for k, v in env.items():
        if k in ("CUDA_VISIBLE_DEVICES",):
            continue  # the device plugin chooses the GPUs
        if k == "VLLM_NIXL_SIDE_CHANNEL_HOST":
            env_list.append({"name": k, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
            continue
        env_list.append({"name": k, "value": v.replace(host_ref(ask.head), LEADER)})
    c = {
        "name": "engine",
        "image": IMAGES[(engine, ask.vendor)],
        "command": command,
        "args": args,
        "env": env_list,
        "resources": {
            "limits": {GPU_RESOURCE[ask.vendor]: gpus},
            "requests": {GPU_RESOURCE[ask.vendor]: gpus},
        },
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if port:
        c["ports"] = [{"name": "http", "containerPort": port}]
        c["readinessProbe"] = {"httpGet": {"path": "/health", "port": port}, "periodSeconds": 10}
    return c


def _pod(ask: InstanceAsk, labels: dict, container: dict, nodes: list[str]) -> dict:
    gpu_types = sorted({s.gpu.name for s in ask.stages if s.node in nodes})
    spec: dict = {"containers": [container], "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]}
    if len(nodes) == 1 and len(gpu_types) == 1:
        spec["nodeSelector"] = {NODE_LABEL: nodes[0], GPU_LABEL: gpu_types[0]}
    else:
        terms = [{"key": NODE_LABEL, "operator": "In", "values": nodes}]
        terms.append({"key": GPU_LABEL, "operator": "In", "values": gpu_types})
        spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": terms}]
                }
            },
            "podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {"labelSelector": {"matchLabels": labels}, "topologyKey": "kubernetes.io/hostname"}
                ]
            },
        }
    return {"metadata": {"labels": labels}, "spec": spec}


def _service(name: str, labels: dict, port: int, leader_only: bool) -> dict:
    selector = dict(labels)
    if leader_only:
        selector["leaderworkerset.sigs.k8s.io/worker-index"] = "0"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {"selector": selector, "ports": [{"name": "http", "port": port, "targetPort": port}]},
    }


def _engine_steps(out: Export, name: str):
    return [s for s in out.steps if s.instance == name and s.engine]


def export(out: Export, dep: Deployment, asks: list[InstanceAsk], ports: dict[str, Ports]) -> None:
    docs: list[dict] = []
    plan_label = safe_name(dep.name)
    for a in asks:
        name = safe_name(a.name)
        labels = {
            "app.kubernetes.io/part-of": "hetserve",
            "hetserve.io/plan": plan_label,
            "hetserve.io/instance": name,
        }
        p = ports[a.name]
        steps = _engine_steps(out, a.name)
        head_step = steps[0]
        if not a.multi_node:
            gpus = len(a.gpus_on(a.head))
            c = _container(a, out.engine, head_step.argv[:1], head_step.argv[1:], head_step.env, gpus, p.http)
            docs.append(
                {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "metadata": {"name": name, "labels": labels},
                    "spec": {
                        "replicas": 1,
                        "selector": {"matchLabels": labels},
                        "template": _pod(a, labels, c, [a.head]),
                    },
                }
            )
        else:
            workers = a.nodes[1:]
            counts = {len(a.gpus_on(n)) for n in workers}
            if len(counts) > 1:
                per = ", ".join(f"{n}: {len(a.gpus_on(n))}" for n in workers)
                raise HetserveError(
                    f"Kubernetes cannot express instance '{a.name}': worker nodes with different GPU counts "
                    f"({per}); a LeaderWorkerSet gives every worker pod the same request"
                )
            wgpus = counts.pop()
            if out.engine == "vllm":
                ray_port = int(
                    next(x for x in out.steps if x.instance == a.name and x.argv[:2] == ["ray", "start"])
                    .argv[3]
                    .split("=")[1]
                )
                total = sum(s.tp for s in a.stages)
                serve = shlex.join(_k8s_args(head_step.argv, a))
                wait = (
                    'until python3 -c "import ray, sys; '
                    f"ray.init(address='127.0.0.1:{ray_port}', logging_level='ERROR'); "
                    f"sys.exit(0 if ray.cluster_resources().get('GPU', 0) >= {total} else 1)\"; do sleep 5; done"
                )
                leader_args = [
                    f"ray start --head --port={ray_port} --num-gpus={len(a.gpus_on(a.head))} && {wait} && exec {serve}"
                ]
                worker_args = [f"ray start --address={LEADER}:{ray_port} --num-gpus={wgpus} --block"]
                leader = _container(
                    a,
                    out.engine,
                    ["/bin/bash", "-c"],
                    leader_args,
                    head_step.env,
                    len(a.gpus_on(a.head)),
                    p.http,
                )
                worker = _container(a, out.engine, ["/bin/bash", "-c"], worker_args, {}, wgpus, None)
            else:
                largv = _k8s_args(head_step.argv, a)
                wargv = list(largv)
                wargv[wargv.index("--node-rank") + 1] = "$(LWS_WORKER_INDEX)"
                leader = _container(
                    a, out.engine, largv[:1], largv[1:], head_step.env, len(a.gpus_on(a.head)), p.http
                )
                worker = _container(a, out.engine, wargv[:1], wargv[1:], head_step.env, wgpus, None)
            docs.append(
                {
                    "apiVersion": "leaderworkerset.x-k8s.io/v1",
                    "kind": "LeaderWorkerSet",
                    "metadata": {"name": name, "labels": labels},
                    "spec": {
                        "replicas": 1,
                        "leaderWorkerTemplate": {
                            "size": len(a.nodes),
                            "leaderTemplate": _pod(
                                a, {**labels, "hetserve.io/role": "leader"}, leader, [a.head]
                            ),
                            "workerTemplate": _pod(
                                a, {**labels, "hetserve.io/role": "worker"}, worker, workers
                            ),
                        },
                    },
                }
            )
        docs.append(_service(name, labels, p.http, a.multi_node))
        out.urls[a.name] = f"http://{name}:{p.http}"
    router = next((s for s in out.steps if s.instance == "router"), None)
    if router is not None:
        args = list(router.argv)
        for a in asks:
            for i, x in enumerate(args):
                if x == f"http://{host_ref(a.head)}:{ports[a.name].http}":
                    args[i] = out.urls[a.name]
        labels = {
            "app.kubernetes.io/part-of": "hetserve",
            "hetserve.io/plan": plan_label,
            "hetserve.io/instance": "router",
        }
        port = int(args[args.index("--port") + 1])
        container = {
            "name": "router",
            "image": IMAGES[("sglang", "nvidia")],
            "command": args[:1],
            "args": args[1:],
            "ports": [{"name": "http", "containerPort": port}],
        }
        docs.append(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": f"{plan_label}-router", "labels": labels},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": labels},
                    "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
                },
            }
        )
        docs.append(_service(f"{plan_label}-router", labels, port, False))
    header = (
        f"# hetserve export of plan '{dep.name}' for {out.engine} on Kubernetes; see README.md.\n"
        f"# Nodes are selected by the labels {NODE_LABEL} (the plan's node name) and {GPU_LABEL} (its GPU type).\n"
    )
    out.files["manifests.yaml"] = header + yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, width=120)


def readme_section(out: Export, nodes: list[str]) -> list[str]:
    gpu_of = {s.node: s.gpu.name for a in out.asks for s in a.stages}
    lines = [
        "## What to run where",
        "",
        "Label each Kubernetes node with the plan's node name and GPU type, then apply the manifests:",
        "",
        "```bash",
    ]
    for n in nodes:
        lines.append(f"kubectl label node <k8s-node-of-{n}> {NODE_LABEL}={n} {GPU_LABEL}={gpu_of[n]}")
    lines += ["kubectl apply -f manifests.yaml", "```", ""]
    if any(a.multi_node for a in out.asks):
        lines += [
            "Multi-node instances are LeaderWorkerSets: install the LeaderWorkerSet controller",
            "(leaderworkerset.x-k8s.io/v1) first. The leader runs on the instance's first node; the workers",
            "on its other nodes (node affinity), one pod per node. Which worker pod lands on which of those",
            "nodes is the scheduler's choice: when they differ in GPU type the stage order may differ.",
            "",
        ]
    lines += [
        "Pods request whole GPUs from the device plugin (`nvidia.com/gpu`, `amd.com/gpu`), which picks",
        "the GPUs, so the plan's GPU indices are not kept. Images: "
        + ", ".join(sorted({IMAGES[(out.engine, a.vendor)] for a in out.asks}))
        + ".",
        "",
    ]
    return lines
