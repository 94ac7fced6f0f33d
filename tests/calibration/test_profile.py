"""``hetserve profile --quick`` on this machine's CPU, and the simulator against real serving."""

import itertools
import json
import sys
from pathlib import Path

import pytest
import yaml

from hetserve.calibration.fit import predict_ms
from hetserve.calibration.measurements import ModelRow
from hetserve.calibration.profile import with_collectives
from hetserve.specs.calibration import load_profile
from hetserve.specs.gpus import CostFactors, builtin_gpus
from hetserve.specs.models import load_model
from tests.conftest import EXAMPLES, REPO

slow = pytest.mark.slow


def test_collectives_come_from_the_split_engine_and_serve_every_format():
    """The all-reduce latency an engine split over two processes meets (rows at TP 1 and TP 2 generated
    from known factors) is recovered within 1%, and every format's factors get it: the bf16 fit has
    no TP rows of its own. The other factors stay the device's."""
    smol, l4 = load_model("smollm2-135m"), builtin_gpus()["l4"]
    truth = CostFactors(compute=0.6, memory=0.7, step_overhead_ms=3.0, allreduce_latency_us=800.0)
    true_gpu = l4.model_copy(update={"efficiency": truth})
    rows = []
    for tp, batch, prompt in itertools.product((1, 2), (1, 8), (16, 64, 256)):
        probe = ModelRow(smol, true_gpu, tp, batch, prompt, 32, 1.0, 1.0, "", "synthetic", "fp32")
        prefill, decode = predict_ms(probe, true_gpu)
        rows.append(ModelRow(smol, l4, tp, batch, prompt, 32, prefill, decode, "", "synthetic", "fp32"))
    start = truth.model_copy(update={"allreduce_latency_us": 100.0})
    device = l4.model_copy(update={"efficiency": start, "efficiency_by_run_dtype": {"bf16": CostFactors()}})
    fitted = with_collectives(device, rows)
    latency = fitted.efficiency.allreduce_latency_us * (2 if fitted.efficiency.allreduce == "ring" else 1)
    assert latency == pytest.approx(1600.0, rel=0.01)  # a ring over 2 ranks is 2 latency steps
    bf16 = fitted.efficiency_by_run_dtype["bf16"]
    assert (bf16.allreduce, bf16.allreduce_latency_us) == (
        fitted.efficiency.allreduce,
        fitted.efficiency.allreduce_latency_us,
    )
    assert fitted.efficiency.compute == 0.6 and bf16.compute == CostFactors().compute


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    from hetserve.cli import main

    out = tmp_path_factory.mktemp("profile") / "this-cpu.yaml"
    assert main(["profile", "--quick", "--out", str(out), "--json"]) == 0
    return out


@slow
def test_quick_profile_describes_the_cpu_and_fits_the_engine(profile):
    p = load_profile(profile)
    assert p.device.name == "this-cpu"
    assert p.device.tflops["fp32"] > 0 and p.device.tflops["bf16"] > 0 and p.device.memory_bw_gb_per_s > 0
    # the engine in fp32 (the main format) and bf16, 9 shapes each, then split over two processes in
    # fp32 at 4 shapes
    engine = [(r.dtype, r.tp) for r in p.measurements.engine]
    assert engine == [("fp32", 1)] * 9 + [("bf16", 1)] * 9 + [("fp32", 2)] * 4
    assert len(p.measurements.gemm) >= 14 and p.measurements.allreduce and p.measurements.kv_handoff
    assert p.calibration.dtype == "fp32" and set(p.calibration.per_dtype) == {"bf16"}
    assert p.measurements.serving is None  # --quick leaves the serving runtime out
    # each format's fitted factors describe its engine steps better than the defaults do
    for fit in (p.calibration, p.calibration.per_dtype["bf16"]):
        assert fit.fit.median_ape_pct < fit.uncalibrated.median_ape_pct
        assert fit.fit.median_ape_pct < 25


@slow
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


@slow
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


@slow
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
