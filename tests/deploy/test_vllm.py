import json

import pytest

from .util import PLANS, deployment, exported, flag


def _engine_steps(out):
    return [s for s in out.steps if s.engine]


@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.stem)
def test_every_plan_exports(path):
    out, refused = exported(path, "vllm")
    dep = deployment(path)
    if refused:
        assert "vLLM cannot express instance '" in refused and "--nearest" in refused
    assert "README.md" in out.files
    by_name = {a.name: a for a in out.asks}
    ports_per_node: dict[str, set] = {}
    for step in _engine_steps(out):
        a = by_name[step.instance]
        argv = step.argv
        assert argv[:3] == ["vllm", "serve", out.model]
        if a.expert_parallel:  # data-parallel attention and experts over the stage's GPUs
            assert flag(argv, "--tensor-parallel-size") == "1" and "--enable-expert-parallel" in argv
            assert flag(argv, "--data-parallel-size") == str(a.tp)
        else:
            assert (
                flag(argv, "--tensor-parallel-size") == str(a.tp) and "--enable-expert-parallel" not in argv
            )
        assert flag(argv, "--pipeline-parallel-size") == str(a.pp)
        assert flag(argv, "--max-num-batched-tokens") == str(a.max_batch_tokens)
        assert flag(argv, "--block-size") == str(a.block_size)
        assert 0 < float(flag(argv, "--gpu-memory-utilization")) <= 0.9
        assert ("--enable-chunked-prefill" in argv) == (a.chunk_size is not None)
        assert ("--quantization" in argv) == (a.bits == 8)
        assert (flag(argv, "--kv-cache-dtype") == "fp8") == (a.kv_dtype == "fp8")
        # layers: the partition covers the model, stage by stage as the plan (or --nearest) says
        if a.pp > 1:
            part = [int(x) for x in step.env["VLLM_PP_LAYER_PARTITION"].split(",")]
            assert part == [s.layers[1] - s.layers[0] for s in a.stages]
            assert sum(part) == dep.model.num_layers
        assert step.env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, a.gpus_on(a.head)))
        port = flag(argv, "--port")
        assert port not in ports_per_node.setdefault(step.node, set())
        ports_per_node[step.node].add(port)
        if a.role != "mixed":
            cfg = json.loads(flag(argv, "--kv-transfer-config"))
            assert cfg == {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
        else:
            assert "--kv-transfer-config" not in argv
        if a.multi_node:
            assert flag(argv, "--distributed-executor-backend") == "ray"
            rays = [s for s in out.steps if s.instance == a.name and s.argv[:2] == ["ray", "start"]]
            assert [s.node for s in rays] == a.nodes
            assert "--head" in rays[0].argv and all(s.argv[2].startswith("--address=") for s in rays[1:])
            for s in rays:
                assert s.env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, a.gpus_on(s.node)))
    # the plan's instances, unless --nearest dropped one for sharing a server
    names = {a.name for a in out.asks}
    assert names <= set(dep.instances) and names


def test_plan_that_vllm_expresses_as_is():
    from ..conftest import EXAMPLES

    out, refused = exported(EXAMPLES / "plans" / "bench-32gpu.yaml", "vllm")
    assert refused is None
    roles = {s.instance: s for s in _engine_steps(out)}
    assert "--kv-transfer-config" in roles["prefill-h100"].argv
    assert "--kv-transfer-config" in roles["decode-a100-0"].argv
    pipe = roles["pipe-l4"]
    assert pipe.env["VLLM_PP_LAYER_PARTITION"] == "16,16"
    assert flag(pipe.argv, "--max-num-seqs") == "32"  # 64 over 2 micro-batches
    script = out.files["l4-0.sh"]
    assert "set -euo pipefail" in script and "ray start --head --port=6379" in script
    assert 'ray start "--address=${NODE_L4_0_HOST:-l4-0}:6379"' in out.files["l4-1.sh"]


def test_uniform_8bit_and_fp8_kv(write):
    from hetserve.deploy.export import build
    from hetserve.plan import load_plan

    from ..conftest import EXAMPLES

    text = (EXAMPLES / "serve" / "smollm2-tp2.yaml").read_text()
    text = text.replace("kv_dtype: fp32", "kv_dtype: fp8, bits: 8").replace(
        "cluster: ../clusters", "cluster: clusters"
    )
    write("clusters/smollm2-lab.yaml", (EXAMPLES / "clusters" / "smollm2-lab.yaml").read_text())
    plan = write("p.yaml", text)
    out = build(load_plan(plan), "vllm")
    (step,) = [s for s in out.steps if s.engine]
    assert flag(step.argv, "--quantization") == "fp8"
    assert flag(step.argv, "--kv-cache-dtype") == "fp8"
    assert flag(step.argv, "--dtype") == "auto"


def test_expert_parallel_plan_exports_as_is_with_its_flags():
    from ..conftest import EXAMPLES

    out, refused = exported(EXAMPLES / "plans" / "deepseek-expert-parallel.yaml", "vllm")
    assert refused is None
    (step,) = _engine_steps(out)
    assert flag(step.argv, "--data-parallel-size") == "8" and "--enable-expert-parallel" in step.argv
    assert flag(step.argv, "--quantization") == "fp8"


def test_expert_parallelism_on_some_stages_is_a_gap_and_nearest_turns_it_off():
    from hetserve.deploy.common import asks_from
    from hetserve.deploy.gaps import instance_gaps, nearest
    from hetserve.deploy.vllm import CAPS
    from hetserve.plan import deployment_from_dict

    from ..conftest import EXAMPLES

    base = deployment(EXAMPLES / "plans" / "deepseek-expert-parallel.yaml")
    plan = {
        "name": "half-ep",
        "model": "deepseek-v3",
        "cluster": "-",
        "servers": [
            {
                "name": "a",
                "node": "mi300x",
                "gpus": [0, 1, 2, 3],
                "layers": [0, 31],
                "bits": 8,
                "expert_parallel": True,
            },
            {"name": "b", "node": "mi300x", "gpus": [4, 5, 6, 7], "layers": [31, 61], "bits": 8},
        ],
        "instances": [{"name": "ds", "role": "mixed", "chain": ["a", "b"], "chunk_size": 2048}],
    }
    dep = deployment_from_dict(plan, base.cluster, base.model)
    (ask,) = asks_from(dep)
    assert ask.expert_parallel is None
    gaps = instance_gaps(ask, CAPS)
    assert [g.feature for g in gaps] == ["expert parallelism on some stages only"]
    (fixed,) = nearest(dep, [ask], CAPS)
    assert fixed.expert_parallel is False and "expert parallelism off" in fixed.changes[0]
