import pytest

from ..conftest import EXAMPLES
from .util import PLANS, deployment, exported, flag


@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.stem)
def test_every_plan_exports(path):
    out, refused = exported(path, "sglang")
    dep = deployment(path)
    if refused:
        assert "SGLang cannot express instance '" in refused
    by_name = {a.name: a for a in out.asks}
    ports_per_node: dict[str, set] = {}
    for step in (s for s in out.steps if s.engine):
        a = by_name[step.instance]
        argv = step.argv
        assert argv[:5] == ["python", "-m", "sglang.launch_server", "--model-path", out.model]
        assert flag(argv, "--tp") == str(a.tp) and flag(argv, "--pp-size") == str(a.pp)
        if a.expert_parallel:
            assert "--enable-dp-attention" in argv
            assert flag(argv, "--dp") == flag(argv, "--ep-size") == str(a.tp)
        else:
            assert "--ep-size" not in argv and "--enable-dp-attention" not in argv
        assert flag(argv, "--max-running-requests") == str(a.max_batch_size)
        assert flag(argv, "--chunked-prefill-size") == str(a.chunk_size or -1)
        assert 0 < float(flag(argv, "--mem-fraction-static")) <= 0.9
        if a.pp > 1:
            part = [int(x) for x in step.env["SGLANG_PP_LAYER_PARTITION"].split(",")]
            assert part == a.layer_partition and sum(part) == dep.model.num_layers
        assert step.env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, a.gpus_on(step.node)))
        if a.multi_node:
            assert flag(argv, "--nnodes") == str(len(a.nodes))
            assert flag(argv, "--node-rank") == str(a.nodes.index(step.node))
            # SGLang puts pp_size / nnodes stages on each node
            assert len(a.stages_on(step.node)) == a.pp // len(a.nodes)
        if step.node == a.head:
            port = flag(argv, "--port")
            assert port not in ports_per_node.setdefault(step.node, set())
            ports_per_node[step.node].add(port)
        if a.role == "mixed":
            assert "--disaggregation-mode" not in argv
        else:
            assert flag(argv, "--disaggregation-mode") == a.role
            assert flag(argv, "--disaggregation-transfer-backend") == "nixl"
    pd = [a for a in out.asks if a.role != "mixed"]
    assert ("router.sh" in out.files) == bool(pd)


def test_router_and_fp8_kv_flag():
    out, refused = exported(EXAMPLES / "plans" / "splitwise-pd.yaml", "sglang")
    assert refused is None
    (router,) = [s for s in out.steps if s.instance == "router"]
    argv = router.argv
    assert argv[:4] == ["python", "-m", "sglang_router.launch_router", "--pd-disaggregation"]
    assert argv.count("--prefill") == 3 and argv.count("--decode") == 4
    assert "python -m sglang_router.launch_router --pd-disaggregation" in out.files["router.sh"]
    from hetserve.deploy.sglang import CAPS

    assert CAPS.fp8_kv == "fp8_e5m2"
