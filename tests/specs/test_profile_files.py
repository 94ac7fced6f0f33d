"""Profile and calibration files with a fit per format: they round-trip, a cluster file's device gets
every fit, files written before fits per format still load, and a file from a newer format or with a
contradiction is one clear error naming it."""

import pytest

from hetserve.calibration.cli import write_yaml
from hetserve.errors import HetserveError
from hetserve.specs.calibration import FactorFit, ServedSteps, load_calibration, load_device, load_profile
from hetserve.specs.clusters import Cluster
from hetserve.specs.gpus import CostFactors

#: A profile as `hetserve profile` wrote it before fits per format (version 1: one factor set; the
#: measurement lists cut short).
VERSION_1 = """\
version: 1
device:
  name: this-cpu
  vendor: other
  memory_gb: 25.3
  memory_bw_gb_per_s: 25.0
  tflops: {fp32: 0.096, bf16: 0.096}
  fabric: {kind: none, gb_per_s: 2.35, latency_us: 203.5}
  tdp_w: 65.0
  price_per_hour: 0.0
  weight_dtypes: []
  kv_dtypes: [fp32, bf16, fp16]
  efficiency: {compute: 1.0, memory: 0.8, gemm_half_rows: 18.29, gemm_rows_exponent: 0.4095, overlap: 1.0,
    layer_overhead_us: 20.0, step_overhead_ms: 0.0, allreduce: ring, allreduce_latency_us: 203.5, collective: 0.498}
  sources: {tflops: 'measured by hetserve profile on vm, 2026-12-04 (torch matmul, 1 thread(s))'}
  notes: x86_64; torch 2.13.0+cpu; the engine serves in float32
engine: hetserve
threads: 1
measurements:
  gemm:
  - {dtype: fp32, rows: 1, k: 576, n: 1536, ms: 0.059, tflops: 0.030}
  copy_gb_per_s: 25.0
  engine:
  - {model: smollm2-135m, tp: 1, batch: 1, prompt: 16, output: 8, prefill_ms: 109.2, decode_ms: 49.4, dtype: fp32}
  - {model: smollm2-135m, tp: 1, batch: 1, prompt: 64, output: 8, prefill_ms: 246.4, decode_ms: 49.6, dtype: fp32}
calibration:
  factors: {compute: 1.0, memory: 0.4738, gemm_half_rows: 90.14, gemm_rows_exponent: 0.5697, overlap: 1.0,
    attention_compute: 0.1279, attention_memory: 0.02588, layer_overhead_us: 0.0, step_overhead_ms: 0.0}
  fitted: [compute, memory, gemm_half_rows, gemm_rows_exponent, overlap, layer_overhead_us, step_overhead_ms]
  engine: hetserve
  rows: 9
  fit: {n: 18, median_ape_pct: 4.8, p90_ape_pct: 12.36}
"""
BF16 = CostFactors(compute=0.76, memory=0.2, gemm_half_rows=177.7, overlap=0.56, step_overhead_ms=2.5)


def two_format_profile(path):
    """The version 1 profile rewritten as this hetserve writes it, with a bf16 fit besides the fp32 one."""
    old = load_profile(path)
    bf16_fit = FactorFit(factors=BF16, fitted=["compute"], engine="hetserve", rows=9, fit=old.calibration.fit)
    calibration = old.calibration.model_copy(update={"dtype": "fp32", "per_dtype": {"bf16": bf16_fit}})
    device = old.device.model_copy(update={"efficiency_by_run_dtype": {"bf16": CostFactors()}})
    serving = ServedSteps(
        dtype="fp32",
        prompt=128,
        output=32,
        served_tpot_ms=[58.0, 57.5, 60.1],
        engine_step_ms=[47.2, 50.3, 46.0],
    )
    measurements = old.measurements.model_copy(update={"serving": serving})
    return old.model_copy(
        update={"version": 2, "device": device, "calibration": calibration, "measurements": measurements}
    )


def test_a_version_1_profile_loads_with_one_factor_set_for_every_format(write):
    path = write("old.yaml", VERSION_1)
    device = load_device(path, "include[0]", None)
    old = load_profile(path)
    factors = old.calibration.factors
    assert old.measurements.serving is None and old.measurements.serving_overhead_ms == 0.0
    assert device.efficiency == factors
    assert device.factors_for("bf16") == device.factors_for("fp16") == device.factors_for("fp32") == factors


def test_a_profile_with_a_fit_per_format_round_trips_and_reaches_the_cluster(write, tmp_path):
    profile = two_format_profile(write("old.yaml", VERSION_1))
    out = tmp_path / "this-cpu.yaml"
    write_yaml(profile.model_dump(mode="json", exclude_none=True), str(out), "hetserve device profile")
    again = load_profile(out)
    assert again == profile
    # the median of the pairs' differences: 10.8, 7.2, 14.1
    assert again.measurements.serving_overhead_ms == pytest.approx(10.8)
    cluster = write("c.yaml", f"include: [{out}]\nnodes:\n  - {{name: box, gpu: this-cpu}}\n")
    gpu = Cluster.load(cluster).nodes["box"].gpu
    # the fitted factors replace the micro-benchmarks' in the device entry, per format
    assert gpu.factors_for("bf16") == BF16
    assert gpu.factors_for("fp32") == gpu.factors_for("fp16") == profile.calibration.factors


def test_a_file_of_a_newer_format_is_one_error_naming_it(write, run_cli, tmp_path):
    path = write("new.yaml", VERSION_1.replace("version: 1", "version: 3"))
    with pytest.raises(HetserveError, match=r"new.yaml: version: a format this hetserve does not read"):
        load_profile(path)
    code, _, err = run_cli("calibrate", "--measurements", path, "--out", tmp_path / "c.yaml")
    assert code == 2 and "Traceback" not in err
    assert "new.yaml: version:" in err and "write the file again" in err


def test_the_main_format_repeated_among_the_others_is_refused(write):
    calibration = """\
version: 2
gpus:
  l4:
    factors: {compute: 0.45}
    fitted: [compute]
    rows: 10
    fit: {n: 10, median_ape_pct: 1.0, p90_ape_pct: 2.0}
    dtype: fp16
    per_dtype:
      fp16:
        factors: {compute: 0.3}
        fitted: [compute]
        rows: 10
        fit: {n: 10, median_ape_pct: 1.0, p90_ape_pct: 2.0}
"""
    with pytest.raises(HetserveError, match=r"calib.yaml: .*per_dtype.fp16: fp16 is the main format"):
        load_calibration(write("calib.yaml", calibration))


def test_a_cluster_file_sets_factors_for_one_format(write):
    cluster = write(
        "c.yaml",
        "gpus:\n  l4: {efficiency_by_run_dtype: {bf16: {compute: 0.2, step_overhead_ms: 5.0}}}\n"
        "nodes:\n  - {name: a, gpu: l4}\n",
    )
    gpu = Cluster.load(cluster).nodes["a"].gpu
    assert gpu.factors_for("bf16") == CostFactors(compute=0.2, step_overhead_ms=5.0)
    assert gpu.factors_for("fp16") == gpu.efficiency
    bad = write("bad.yaml", "gpus:\n  l4: {efficiency_by_run_dtype: {fp8: {compute: 0.2}}}\nnodes: []\n")
    with pytest.raises(HetserveError, match=r"efficiency_by_run_dtype\.fp8"):
        Cluster.load(bad)


def test_a_serving_runtime_measured_faster_than_the_engine_adds_nothing():
    noise = ServedSteps(dtype="bf16", prompt=128, output=32, served_tpot_ms=[50.0], engine_step_ms=[51.0])
    assert noise.overhead_ms == 0.0


def test_serving_measurements_come_in_pairs(write):
    unpaired = VERSION_1.replace(
        "  copy_gb_per_s: 25.0\n",
        "  copy_gb_per_s: 25.0\n  serving: {dtype: fp32, prompt: 128, output: 32, served_tpot_ms: [58.0, 57.5], "
        "engine_step_ms: [47.2]}\n",
    )
    with pytest.raises(HetserveError, match=r"old.yaml: measurements.serving: .*they are pairs"):
        load_profile(write("old.yaml", unpaired))


def test_a_request_pays_its_first_token_difference_less_the_time_per_step():
    """Served first tokens 30-45 ms after the in-process first step, steps 10 ms apart: 25 ms per
    request beyond its first step's overhead (the medians); not measured (an older profile): none."""
    steps = ServedSteps(
        dtype="fp32",
        prompt=128,
        output=32,
        served_tpot_ms=[60.0, 61.0, 59.0],
        engine_step_ms=[50.0, 51.0, 49.0],
        served_ttft_ms=[330.0, 345.0, 335.0],
        engine_first_step_ms=[300.0, 300.0, 300.0],
    )
    assert steps.overhead_ms == pytest.approx(10.0)
    assert steps.request_overhead_ms == pytest.approx(25.0)
    older = steps.model_copy(update={"served_ttft_ms": [], "engine_first_step_ms": []})
    assert older.request_overhead_ms == 0.0
    with pytest.raises(ValueError, match="they are pairs"):
        ServedSteps.model_validate({**steps.model_dump(), "engine_first_step_ms": [300.0]})
