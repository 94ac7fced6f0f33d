"""``hetserve export``: a plan as launch scripts (vLLM, SGLang) or Kubernetes manifests, with a README."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..errors import HetserveError
from ..plan import Deployment, load_plan
from . import k8s, sglang, vllm
from .common import (
    Export,
    Step,
    asks_from,
    assign_ports,
    hf_model_id,
    host_var,
    shell_join,
)
from .gaps import nearest, plan_gaps, refuse

TARGETS = ("vllm", "sglang", "k8s")
ENGINES = {"vllm": vllm, "sglang": sglang}


def build(
    dep: Deployment,
    target: str,
    engine: str | None = None,
    use_nearest: bool = False,
    checkpoint: str | None = None,
) -> Export:
    """Everything ``target`` needs for the plan, in memory (``write`` puts it on disk).

    Raises HetserveError (naming the instance and the feature) when the target cannot express the
    plan and ``use_nearest`` is false.
    """
    if target not in TARGETS:
        raise HetserveError(f"--to: unknown target '{target}'; use one of {', '.join(TARGETS)}")
    engine = engine or (target if target != "k8s" else "vllm")
    if engine not in ENGINES:
        raise HetserveError(f"--engine: unknown engine '{engine}'; use vllm or sglang")
    if target != "k8s" and engine != target:
        raise HetserveError(f"--engine {engine} does not go with --to {target}; --engine is for --to k8s")
    mod = ENGINES[engine]
    caps = mod.CAPS
    if target == "k8s":
        # a LeaderWorkerSet gives every worker pod one GPU request: equal stages (of one TP) per node
        caps = replace(caps, even_stages_per_node=True)
    what = f"{caps.name} on Kubernetes" if target == "k8s" else caps.name
    asks = asks_from(dep)
    gaps = plan_gaps(asks, caps, checkpoint=checkpoint is not None)
    if gaps and not use_nearest:
        raise refuse(gaps, what)
    if gaps:
        asks = nearest(dep, asks, caps, checkpoint=checkpoint is not None)
        left = plan_gaps(asks, caps, checkpoint=checkpoint is not None)
        if left:
            raise HetserveError(f"--nearest: {what} still cannot express {left[0].line()}")
    model = checkpoint or hf_model_id(dep)
    out = Export(target=target, engine=engine, model=model, asks=asks, gaps=gaps)
    ports = assign_ports(asks)
    mod.export(out, asks, ports, dep.spec.model, dep.model.max_position_embeddings)
    if target == "k8s":
        k8s.export(out, dep, asks, ports)
    else:
        out.files.update(scripts(out, dep))
    out.files["README.md"] = readme(out, dep, gaps)
    return out


def write(out: Export, directory: str | Path) -> list[Path]:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in out.files.items():
        path = d / name
        path.write_text(text)
        if name.endswith(".sh"):
            path.chmod(0o755)
        written.append(path)
    return written


def export_plan(
    plan: str,
    target: str,
    engine: str | None = None,
    out_dir: str | None = None,
    use_nearest: bool = False,
    checkpoint: str | None = None,
    workload: str | None = None,
) -> tuple[Export, list[Path]]:
    """Export ``plan``; with ``use_nearest`` and ``workload``, the README also gives what the nearest
    plan's changes cost in simulation."""
    if target not in TARGETS:
        raise HetserveError(f"--to: unknown target '{target}'; use one of {', '.join(TARGETS)}")
    if workload is not None and not use_nearest:
        raise HetserveError(
            "--workload goes with --nearest: it simulates what the nearest plan's changes cost"
        )
    dep = load_plan(plan)
    out = build(dep, target, engine, use_nearest, checkpoint)
    if out.gaps and workload is not None:
        from .nearest_cost import simulate_change

        out.cost = simulate_change(dep, out.asks, workload).lines()
        out.files["README.md"] = readme(out, dep, out.gaps)
    directory = out_dir or f"{Path(plan).stem}-{target if target != 'k8s' else 'k8s-' + out.engine}"
    return out, write(out, directory)


# ---- launch scripts ----------------------------------------------------------------------------------
_RAY_WAIT = """wait_for_ray_gpus() {  # ADDRESS GPUS: until the Ray cluster at ADDRESS has GPUS GPUs
  until python3 -c "import ray, sys; ray.init(address='$1', logging_level='ERROR'); \\
sys.exit(0 if ray.cluster_resources().get('GPU', 0) >= $2 else 1)" >/dev/null 2>&1; do
    echo "waiting for $2 GPUs in the Ray cluster at $1 ..."; sleep 5
  done
}
"""


def _render_step(step: Step, model: str) -> list[str]:
    lines = [f"# {c}" for c in step.comment]
    if step.wait_gpus:
        lines.append(f'wait_for_ray_gpus "{step.wait_gpus[0]}" {step.wait_gpus[1]}')
    argv = ["${MODEL}" if a == model else a for a in step.argv]
    env = " ".join(f"{k}={shell_join([v])}" for k, v in step.env.items())
    cmd = (env + " " if env else "") + shell_join(argv)
    if step.retry:
        lines += [f"until {cmd}; do", '  echo "retrying in 5 s ..."; sleep 5', "done"]
    elif step.background:
        lines += [f"{cmd} &", "pids+=($!)"]
    else:
        lines.append(cmd)
    return lines + [""]


def scripts(out: Export, dep: Deployment) -> dict[str, str]:
    files = {}
    by_node: dict[str, list[Step]] = {}
    for s in out.steps:
        by_node.setdefault(s.node, []).append(s)
    for node, steps in by_node.items():
        what = (
            f"node {node}" if node != "router" else "the P/D router (any machine that reaches the instances)"
        )
        head = [
            "#!/usr/bin/env bash",
            f"# hetserve export of plan '{dep.name}' for {out.engine}: {what}.",
            "# Node addresses come from NODE_<NAME>_HOST variables (default: the node's name); see README.md.",
            "set -euo pipefail",
            "",
            f'MODEL="${{HETSERVE_MODEL:-{out.model}}}"',
            "pids=()",
            'trap \'for p in ${pids[@]+"${pids[@]}"}; do kill "$p" 2>/dev/null || true; done\' EXIT',
            "",
        ]
        if any(s.wait_gpus for s in steps):
            head += [_RAY_WAIT]
        body = [line for s in steps for line in _render_step(s, out.model)]
        tail = ["# keep serving until a server exits", 'if [ "${#pids[@]}" -gt 0 ]; then wait -n; fi', ""]
        files[f"{node}.sh"] = "\n".join(head + body + tail)
    return files


# ---- README --------------------------------------------------------------------------------------------
def _instance_table(out: Export) -> list[str]:
    rows = [
        "| instance | role | nodes | TP x PP | layers per stage | URL |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for a in out.asks:
        rows.append(
            f"| {a.name} | {a.role} | {', '.join(a.nodes)} | {a.tp} x {a.pp} | "
            f"{', '.join(map(str, a.layer_partition))} | {out.urls.get(a.name, '')} |"
        )
    return rows


def readme(out: Export, dep: Deployment, gaps) -> str:
    nodes = sorted({n for a in out.asks for n in a.nodes})
    lines = [
        f"# Plan '{dep.name}' on {out.engine if out.target != 'k8s' else out.engine + ' (Kubernetes)'}",
        "",
        f"Exported by `hetserve export --to {out.target}"
        + (f" --engine {out.engine}" if out.target == "k8s" else "")
        + "` from the plan's "
        f"{len(dep.instances)} instance(s); model `{out.model}` (override with `HETSERVE_MODEL`"
        + (")." if out.target != "k8s" else " in the scripts, or edit the manifests)."),
        "See docs/deploy.md in hetserve for what each flag means and the limits of each target.",
        "",
        "## Instances",
        "",
        *_instance_table(out),
        "",
    ]
    if out.target == "k8s":
        lines += k8s.readme_section(out, nodes)
    else:
        lines += [
            "## What to run where",
            "",
            "Node names are not host names: each script reads the address of every node it talks to",
            "from a variable, with the node's name as the default. Set them on every machine, e.g.:",
            "",
            "```bash",
            *[f"export {host_var(n)}=10.0.0.{i + 1}   # node {n}" for i, n in enumerate(nodes)],
            "```",
            "",
        ]
        scripts_ = sorted(f for f in out.files if f.endswith(".sh"))
        for f in scripts_:
            node = f[:-3]
            if node == "router":
                lines.append(
                    f"- `./{f}` on any machine that reaches the instances: the P/D router (port 30000)."
                )
            else:
                here = [a.name for a in out.asks if node in a.nodes]
                lines.append(f"- `./{f}` on node `{node}`: instances {', '.join(here)}.")
        lines += [""]
        if any(a.multi_node for a in out.asks) and out.engine == "vllm":
            lines += [
                "Multi-node instances run on Ray: the head node's script starts the Ray head and waits until",
                "every worker node has joined with its GPUs; the worker nodes' scripts join it (retrying until",
                "the head is up). Start them in any order. Stop Ray afterwards with `ray stop` on each node.",
                "",
            ]
        if any(a.multi_node for a in out.asks) and out.engine == "sglang":
            lines += [
                "Multi-node instances run one `launch_server` per node (`--nnodes`, `--node-rank`, `--dist-init-addr`",
                "on the head node); only node rank 0 serves HTTP. Start every node's script.",
                "",
            ]
        lines += [
            "Every script runs its servers in the background, waits, and stops the others when one exits.",
            "",
        ]
    lines += ["## Sending traffic", ""]
    pd = [a for a in out.asks if a.role != "mixed"]
    mixed = [a for a in out.asks if a.role == "mixed"]
    if mixed:
        lines += [
            "Each mixed instance is an OpenAI-compatible server at its URL above, e.g.:",
            "",
            "```bash",
            f"curl {out.urls[mixed[0].name]}/v1/completions -H 'Content-Type: application/json' \\",
            f'  -d \'{{"model": "{dep.spec.model}", "prompt": "Hello", "max_tokens": 16}}\'',
            "```",
            "",
            f"Spread requests over them as the plan's routing says ({dep.spec.routing.policy}); the engines do",
            "not route between instances.",
            "",
        ]
    if pd and out.engine == "sglang":
        lines += [
            "P/D instances sit behind the router (`router.sh`): send requests to port 30000 of its machine.",
            "",
        ]
    elif pd:
        lines += [
            "P/D instances need a proxy in front: it sends each request to a prefill instance (with",
            "`kv_transfer_params` asking for a remote decode and `max_tokens` 1), then to a decode instance",
            "with the `kv_transfer_params` the prefill returned. vLLM's disaggregated-serving examples ship",
            "such a proxy; point it at the prefill and decode URLs above.",
            "",
        ]
    changed = [a for a in out.asks if a.changes]
    if gaps:
        engine = ENGINES[out.engine].CAPS.name + (" on Kubernetes" if out.target == "k8s" else "")
        lines += ["## Changes from the plan (--nearest)", "", f"{engine} cannot express:", ""]
        lines += [f"- {g.line()}" for g in gaps]
        lines += ["", "so this export serves the nearest plan it can express:", ""]
        for a in changed:
            lines += [f"- instance `{a.name}`:"] + [f"  - {c}" for c in a.changes]
        dropped = {g.instance for g in gaps} - {a.name for a in out.asks}
        for name in sorted(dropped):
            lines.append(f"- instance `{name}`: not exported (its servers are taken by another instance)")
        lines.append("")
        lines += (
            out.cost
            if out.cost
            else [
                "What these changes cost: `hetserve export ... --nearest --workload W` simulates both plans."
            ]
        )
        lines.append("")
    warn = [(a.name, w) for a in out.asks for w in a.warnings]
    notes = [(n, x) for n, xs in out.notes.items() for x in xs]
    if warn or notes:
        lines += ["## Differences in behaviour", ""]
        lines += [f"- `{n}`: warning: {w}" for n, w in warn]
        lines += [f"- `{n}`: {x}" for n, x in notes]
        lines.append("")
    return "\n".join(lines)
