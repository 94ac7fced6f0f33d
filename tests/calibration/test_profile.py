"""``hetserve profile --quick`` on this machine's CPU, and the simulator against real serving."""

import json
import sys
from pathlib import Path

import pytest
import yaml

from hetserve.specs.calibration import load_profile
from tests.conftest import EXAMPLES, REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    from hetserve.cli import main

    out = tmp_path_factory.mktemp("profile") / "this-cpu.yaml"
    assert main(["profile", "--quick", "--out", str(out), "--json"]) == 0
    return out


def test_quick_profile_describes_the_cpu_and_fits_the_engine(profile):
    p = load_profile(profile)
    assert p.device.name == "this-cpu"
    assert p.device.tflops["fp32"] > 0 and p.device.tflops["bf16"] > 0 and p.device.memory_bw_gb_per_s > 0
    # the engine in fp32 (the main format) and bf16, 9 shapes each
    assert [r.dtype for r in p.measurements.engine] == ["fp32"] * 9 + ["bf16"] * 9
    assert len(p.measurements.gemm) >= 14 and p.measurements.allreduce and p.measurements.kv_handoff
    assert p.calibration.dtype == "fp32" and set(p.calibration.per_dtype) == {"bf16"}
    assert p.measurements.serving is None  # --quick leaves the serving runtime out
    # each format's fitted factors describe its engine steps better than the defaults do
    for fit in (p.calibration, p.calibration.per_dtype["bf16"]):
        assert fit.fit.median_ape_pct < fit.uncalibrated.median_ape_pct
        assert fit.fit.median_ape_pct < 25


def test_the_bf16_steps_are_described_by_their_own_fit(profile):
    """The bf16 engine's steps are predicted better by the bf16 fit than by the fp32 factors timing a bf16
    server (one factor set for every format: what a profile gave before fits per format)."""
    from hetserve.calibration.fit import errors
    from hetserve.calibration.measurements import engine_rows

    p = load_profile(profile)
    bf16 = [e for e in p.measurements.engine if e.dtype == "bf16"]
    rows = engine_rows(bf16, p.device, p.engine, str(profile))
    calibrated = p.calibration.apply_to(p.device)
    fp32_for_all = p.device.model_copy(
        update={"efficiency": p.calibration.factors, "efficiency_by_run_dtype": {}}
    )
    assert errors(rows, calibrated).median_ape < errors(rows, fp32_for_all).median_ape


def test_profiled_device_is_a_gpu_type_for_cluster_files_and_calibrate(profile, write, run_cli, tmp_path):
    from hetserve.specs.clusters import Cluster

    cluster = write("c.yaml", f"include: [{profile}]\nnodes:\n  - {{name: box, gpu: this-cpu, count: 2}}\n")
    c = Cluster.load(cluster)
    calibration = load_profile(profile).calibration
    assert c.nodes["box"].gpu.efficiency == calibration.factors
    assert c.nodes["box"].gpu.factors_for("bf16") == calibration.per_dtype["bf16"].factors
    code, out, err = run_cli("calibrate", "--measurements", profile, "--out", tmp_path / "c.yaml")
    assert code == 0, err
    assert "this-cpu" in yaml.safe_load((tmp_path / "c.yaml").read_text())["gpus"]


def test_simulated_replicas_plan_matches_serving(profile, tmp_path):
    """One small plan served for real and simulated on the profiled CPU with the same requests: the
    medians agree within 40% (a loose bound: CI machines are shared)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import sim_vs_serve
    from serve_plans import run_plan

    class Args:
        duration, rate, seed = 40.0, 0.25, 0

    plan = EXAMPLES / "serve" / "smollm2-replicas.yaml"
    measured = run_plan(plan, Args, sim_vs_serve.WORKLOAD, sim_vs_serve.KV_CACHE_GB)
    simulated = json.loads(
        sim_vs_serve.hetserve(
            "simulate",
            "--plan",
            str(sim_vs_serve.sim_plan(plan, Path(profile), tmp_path)),
            "--workload",
            str(sim_vs_serve.WORKLOAD),
            "--duration",
            "40",
            "--rate",
            "0.25",
            "--json",
        )
    )
    assert measured["completed"] == simulated["completed"] > 0
    for metric in ("ttft_p50_ms", "tpot_p50_ms", "e2e_p50_ms", "throughput_tok_s"):
        assert simulated[metric] == pytest.approx(measured[metric], rel=0.4), metric
