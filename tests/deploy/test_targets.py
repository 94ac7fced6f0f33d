"""`hetserve plan --target vllm|sglang`: the planner keeps to what the engine runs, so the plan it writes
exports to that engine as it is (no --nearest), and a cluster the engine cannot use is one clear error."""

from __future__ import annotations

import pytest

from hetserve.deploy.common import asks_from
from hetserve.deploy.export import build
from hetserve.deploy.gaps import plan_gaps
from hetserve.deploy.targets import ENGINE_CAPS, engine_target
from hetserve.errors import HetserveError
from hetserve.planner.search import Planner
from hetserve.planner.templates import TemplateFactory
from hetserve.specs.clusters import Cluster
from hetserve.specs.models import load_model
from hetserve.specs.workloads import Workload

from ..conftest import EXAMPLES

#: T4s and V100s with Llama-2-13B: unrestricted, the planner mixes 16/8/4-bit layers in one instance.
CLUSTER = EXAMPLES / "clusters" / "llmpq-t4-v100.yaml"
MODEL = "llama-2-13b"


def plan(target: str | None, cluster=CLUSTER, model: str = MODEL):
    planner = Planner(
        Cluster.load(cluster),
        load_model(model),
        Workload.load(EXAMPLES / "workloads" / "chat.yaml"),
        "goodput",
        cluster_ref=str(cluster),
        model_ref=model,
        quality=0.3,
        time_limit=8.0,
        target=engine_target(target) if target else None,
    )
    return planner.run()


def test_without_a_target_the_plan_needs_hetserves_runtime():
    """The case the flag exists for: the unrestricted plan has something vLLM cannot express."""
    result = plan(None)
    assert plan_gaps(asks_from(result.deployment), ENGINE_CAPS["vllm"])


@pytest.mark.parametrize("target", ["vllm", "sglang"])
def test_a_targeted_plan_exports_unchanged(target):
    result = plan(target)
    dep = result.deployment
    assert plan_gaps(asks_from(dep), ENGINE_CAPS[target]) == []
    for srv in dep.servers.values():
        assert len(set(srv.plan.layer_bits())) == 1  # one weight format per server
    for inst in dep.instances.values():
        assert len({s.plan.tp for s in inst.servers}) == 1  # one TP degree per instance
    out = build(dep, target)  # refuses (raises) if the engine cannot express the plan
    assert out.gaps == [] and out.files


def test_templates_kept_for_an_engine_have_one_tp_and_one_weight_format():
    cluster, model = Cluster.load(CLUSTER), load_model(MODEL)
    w = Workload.load(EXAMPLES / "workloads" / "chat.yaml")
    prompt, output, _ = w.length_stats(w.slo.percentile, 0)
    templates = TemplateFactory(cluster, model, prompt, output, w.slo, 0.3).all()
    target = engine_target("vllm")
    kept = [t for t in templates if target.template_ok(t)]
    assert 0 < len(kept) < len(templates)
    for t in kept:
        assert len({s.tp for s in t.stages}) == 1
        assert len({b for s in t.stages for b in s.bits}) == 1


def test_a_cluster_the_engine_cannot_use_is_one_error_naming_the_flag(write):
    cluster = write("ascend.yaml", "name: ascend-only\nnodes:\n  - {name: a, gpu: ascend-910b, count: 8}\n")
    with pytest.raises(HetserveError, match="--target: no instance"):
        plan("vllm", cluster=cluster, model="llama-3.1-8b")
    with pytest.raises(HetserveError, match="--target: unknown engine 'trt'"):
        engine_target("trt")
