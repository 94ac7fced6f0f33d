"""`hetserve export --nearest --workload W`: the nearest expressible plan written back as a plan and
simulated beside the planned one, so what an engine's limits cost is a figure."""

from __future__ import annotations

import pytest

from hetserve.deploy.common import asks_from
from hetserve.deploy.export import build, export_plan
from hetserve.deploy.nearest_cost import plan_of_asks, simulate_change
from hetserve.errors import HetserveError
from hetserve.plan import Deployment

from ..conftest import EXAMPLES
from .util import PLANS, deployment

#: A short workload with the chat SLOs: two simulations per plan stay quick.
WORKLOAD = """
arrivals: {kind: poisson, rate: 2.0}
prompt: {kind: lognormal, mean: 600, cv: 0.5, max: 2000}
output: {kind: lognormal, mean: 120, cv: 0.5, max: 400}
slo: {ttft_ms: 2000, tpot_ms: 100}
duration_s: 30
"""


@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.stem)
def test_the_asks_of_a_plan_written_back_give_the_same_plan(path):
    dep = deployment(path)
    again = Deployment(plan_of_asks(dep, asks_from(dep)), dep.cluster, dep.model)
    assert {s.name for s in again.spec.servers} == {s.name for s in dep.spec.servers}
    for name, inst in dep.instances.items():
        other = again.instances[name]
        assert other.role == inst.role and [s.name for s in other.servers] == [s.name for s in inst.servers]
        for a, b in zip(inst.servers, other.servers):
            same = (a.plan.gpus, a.plan.layers, a.plan.layer_bits(), a.plan.kv_dtype, a.plan.kv_layout)
            assert same == (
                b.plan.gpus,
                b.plan.layers,
                b.plan.layer_bits(),
                b.plan.kv_dtype,
                b.plan.kv_layout,
            )
        assert other.kv_capacity_tokens == inst.kv_capacity_tokens
    assert again.gpus_used() == dep.gpus_used()


def test_cross_vendor_pd_nearest_is_simulated_beside_the_plan(write):
    workload = write("w.yaml", WORKLOAD)
    dep = deployment(EXAMPLES / "plans" / "cross-vendor-pd.yaml")
    out = build(dep, "vllm", use_nearest=True)
    assert out.gaps and {a.role for a in out.asks} == {"mixed"}  # KV cannot cross vendors on vLLM
    cost = simulate_change(dep, out.asks, str(workload))
    assert cost.nearest is not None and cost.planned.goodput_rps > 0 and cost.nearest.goodput_rps > 0
    assert cost.nearest.cost_per_hour == pytest.approx(cost.planned.cost_per_hour)  # the same GPUs
    lines = cost.lines()
    assert any(line.startswith("- goodput") and "req/s" in line for line in lines)


def test_a_nearest_plan_that_no_longer_fits_says_why(write, tmp_path):
    workload = write("w.yaml", WORKLOAD)
    out, files = export_plan(
        str(EXAMPLES / "plans" / "hexgen-asymmetric.yaml"),
        "vllm",
        out_dir=str(tmp_path / "x"),
        use_nearest=True,
        workload=str(workload),
    )
    assert out.cost and "cannot run at all" in out.cost[0] and "does not fit" in out.cost[0]
    readme = (tmp_path / "x" / "README.md").read_text()
    assert "cannot run at all" in readme


def test_workload_without_nearest_is_refused():
    with pytest.raises(HetserveError, match="--workload goes with --nearest"):
        export_plan(str(EXAMPLES / "plans" / "cross-vendor-pd.yaml"), "vllm", workload="w.yaml")
