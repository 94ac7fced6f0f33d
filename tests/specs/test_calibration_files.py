"""A calibration reaches every place the cost model runs: simulate, plans (recorded and re-used) and
cluster files (per GPU type, and profiled devices through include)."""

import json

import yaml

from hetserve.plan import load_plan, save_plan
from tests.conftest import EXAMPLES

PLAN = EXAMPLES / "serve" / "smollm2-replicas.yaml"
CALIBRATION = """
version: 1
gpus:
  l4:
    factors: {compute: 0.45, memory: 0.8, step_overhead_ms: 40.0}
    fitted: [step_overhead_ms]
    rows: 10
    fit: {n: 10, median_ape_pct: 1.0, p90_ape_pct: 2.0}
"""


def test_simulate_with_calibration_is_slower_by_the_step_overhead(run_cli, write):
    # both GPU types slowed down, or the router would move every request to the uncalibrated one
    calib = write("calib.yaml", CALIBRATION + "  t4:" + CALIBRATION.split("  l4:")[1])
    workload = EXAMPLES / "workloads" / "chat.yaml"
    args = ("simulate", "--plan", PLAN, "--workload", workload, "--duration", "20", "--rate", "0.2", "--json")
    code, base, err = run_cli(*args)
    assert code == 0, err
    code, slow, err = run_cli(*args, "--calibration", calib)
    assert code == 0, err
    assert json.loads(slow)["tpot_p50_ms"] > json.loads(base)["tpot_p50_ms"] + 10


def test_plan_records_its_calibration_and_load_plan_uses_it(write, tmp_path):
    calib = write("calib.yaml", CALIBRATION)
    dep = load_plan(PLAN, calibration=calib)
    l4 = dep.servers["r0"].node.gpu
    assert l4.efficiency.step_overhead_ms == 40.0
    out = tmp_path / "sub" / "plan.yaml"
    out.parent.mkdir()
    save_plan(dep.spec, out, cluster_path=PLAN.parent / dep.spec.cluster, calibration_path=calib)
    assert yaml.safe_load(out.read_text())["calibration"] == "../calib.yaml"
    again = load_plan(out)
    assert again.servers["r0"].node.gpu.efficiency.step_overhead_ms == 40.0
    assert again.servers["r1"].node.gpu.efficiency.step_overhead_ms == 0.0  # t4 is not calibrated
    calib.unlink()
    import pytest

    from hetserve.errors import HetserveError

    with pytest.raises(HetserveError, match="calibration: file .* not found"):
        load_plan(out)


def test_cluster_file_names_a_calibration_per_gpu_type(write):
    from hetserve.specs.clusters import Cluster

    write("calib.yaml", CALIBRATION)
    cluster = write(
        "c.yaml",
        "gpus:\n  l4: {calibration: calib.yaml}\nnodes:\n  - {name: a, gpu: l4}\n  - {name: b, gpu: t4}\n",
    )
    c = Cluster.load(cluster)
    assert c.nodes["a"].gpu.efficiency.step_overhead_ms == 40.0
    assert c.nodes["b"].gpu.efficiency.step_overhead_ms == 0.0
    bad = write("bad.yaml", "gpus:\n  l4: {calibration: missing.yaml}\nnodes:\n  - {name: a, gpu: l4}\n")
    import pytest

    from hetserve.errors import HetserveError

    with pytest.raises(
        HetserveError, match=r"gpus.l4.calibration: calibration file .*missing.yaml not found"
    ):
        Cluster.load(bad)


def test_compare_times_every_cluster_with_the_calibration(write):
    from hetserve.compare import LoadedScenario

    calib = write("calib.yaml", CALIBRATION)
    scenario = LoadedScenario(EXAMPLES / "scenarios" / "helix-24.yaml", str(calib))
    l4 = [n.gpu for n in scenario.cluster.nodes.values() if n.gpu.name == "l4"]
    assert l4 and all(g.efficiency.step_overhead_ms == 40.0 for g in l4)
    plain = LoadedScenario(EXAMPLES / "scenarios" / "helix-24.yaml")
    assert all(n.gpu.efficiency.step_overhead_ms == 0.0 for n in plain.cluster.nodes.values())
