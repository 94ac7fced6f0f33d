"""A GPU type's calibration is fitted per format its measurements ran in: each format's factors are
recovered from rows they generated, the main fit is the format with the most rows (or the one asked
for), and ``hetserve calibrate`` writes every fit where the cost model picks it up."""

import dataclasses
import itertools

import pytest

from hetserve.calibration.fit import errors, predict_ms
from hetserve.calibration.measurements import ModelRow
from hetserve.calibration.per_dtype import calibrate_gpu, main_run_dtype
from hetserve.errors import HetserveError
from hetserve.specs.gpus import CostFactors, builtin_gpus
from hetserve.specs.models import load_model

L4 = builtin_gpus()["l4"]
SMOL = load_model("smollm2-135m")
#: Two engines' worth of truth on one device: fp32 steps bound by the GEMMs, bf16 steps by slow reads.
FP32 = CostFactors(compute=0.6, memory=0.7, gemm_half_rows=40.0, step_overhead_ms=3.0)
BF16 = CostFactors(compute=0.4, memory=0.15, gemm_half_rows=120.0, step_overhead_ms=6.0)


def rows_of(run_dtype, truth, batches=(1, 2, 4, 8), prompts=(16, 64, 256, 1024)):
    """Whole-model rows of SmolLM2-135M the cost model predicts with ``truth`` for ``run_dtype``."""
    true_gpu = L4.model_copy(update={"efficiency_by_run_dtype": {run_dtype: truth}})
    out = []
    for batch, prompt in itertools.product(batches, prompts):
        probe = ModelRow(SMOL, true_gpu, 1, batch, prompt, 32, 1.0, 1.0, "", "synthetic", run_dtype)
        prefill, decode = predict_ms(probe, true_gpu)
        out.append(ModelRow(SMOL, L4, 1, batch, prompt, 32, prefill, decode, "", "synthetic", run_dtype))
    return out


@pytest.fixture(scope="module")
def two_formats():
    rows = rows_of("fp32", FP32) + rows_of("bf16", BF16)
    return rows, calibrate_gpu(rows, L4, engine="hetserve", source="synthetic", main="fp32")


def test_each_format_gets_the_factors_of_its_own_rows(two_formats):
    rows, calibration = two_formats
    assert calibration.dtype == "fp32" and set(calibration.per_dtype) == {"bf16"}
    assert calibration.rows == calibration.per_dtype["bf16"].rows == 16
    for fit, truth in ((calibration, FP32), (calibration.per_dtype["bf16"], BF16)):
        assert fit.fit.median_ape_pct < 1.0
        # the step times are what the fit must reproduce; the factors behind them come close
        assert fit.factors.step_overhead_ms == pytest.approx(truth.step_overhead_ms, rel=0.1)
    calibrated = calibration.apply_to(L4)
    assert errors(rows, calibrated).median_ape < 1.0
    # one factor set for both formats (what a single fit gives every server) misses the bf16 steps
    fp32_only = L4.model_copy(update={"efficiency": calibration.factors})
    bf16_rows = [r for r in rows if r.run_dtype == "bf16"]
    assert errors(bf16_rows, fp32_only).median_ape > 20 * errors(bf16_rows, calibrated).median_ape


def test_main_format_is_the_one_asked_for_else_the_one_with_most_rows():
    groups = {"bf16": [1, 2], "fp32": [1, 2, 3]}
    assert main_run_dtype(groups) == "fp32"
    assert main_run_dtype(groups, "bf16") == "bf16"
    assert main_run_dtype({"bf16": [1], "fp32": [2]}) == "bf16"  # a tie: the first one measured
    with pytest.raises(HetserveError, match="no measurement ran in fp16"):
        main_run_dtype(groups, "fp16")


def test_all_of_a_formats_rows_held_out_is_a_clear_error():
    fp32, bf16 = rows_of("fp32", FP32), rows_of("bf16", BF16)
    with pytest.raises(HetserveError, match="every bf16 measurement of l4 is held out"):
        calibrate_gpu(fp32, L4, engine="", source="synthetic", held=bf16[:3])


def test_calibrate_writes_a_fit_per_format_that_clusters_apply(run_cli, write, tmp_path):
    lines = ["model,gpu,tp,batch,prompt,output,prefill_ms,decode_ms,dtype"]
    for row in rows_of("fp32", FP32) + rows_of("bf16", BF16, batches=(1, 2, 4), prompts=(16, 64, 256)):
        lines.append(
            f"smollm2-135m,l4,1,{row.batch},{row.prompt},32,{row.prefill_ms},{row.decode_ms},{row.run_dtype}"
        )
    measurements = write("m.csv", "\n".join(lines) + "\n")
    code, out, err = run_cli("calibrate", "--measurements", measurements, "--out", tmp_path / "calib.yaml")
    assert code == 0, err
    assert "l4 (fp32)" in out and "l4 (bf16)" in out
    from hetserve.specs.calibration import load_calibration
    from hetserve.specs.clusters import Cluster

    calibration = load_calibration(tmp_path / "calib.yaml")
    entry = calibration.gpus["l4"]
    assert entry.dtype == "fp32" and entry.rows == 16 and entry.per_dtype["bf16"].rows == 9
    cluster = write("c.yaml", "gpus:\n  l4: {calibration: calib.yaml}\nnodes:\n  - {name: a, gpu: l4}\n")
    gpu = Cluster.load(cluster).nodes["a"].gpu
    assert gpu.factors_for("bf16") == entry.per_dtype["bf16"].factors
    assert gpu.factors_for("fp32") == gpu.factors_for("fp16") == entry.factors


def test_profile_refuses_a_format_given_twice_before_measuring(run_cli, tmp_path):
    code, _, err = run_cli("profile", "--dtypes", "float32", "float32", "--out", tmp_path / "p.yaml")
    assert code == 2 and "Traceback" not in err
    assert "--dtypes float32 float32: give each of float32, bfloat16, float16 at most once" in err
    assert not (tmp_path / "p.yaml").exists()


def test_the_measured_serving_overhead_is_held_in_the_step_overhead():
    """Rows of the engine in-process, lacking 10 ms per step of the serving runtime: every format's fit
    keeps the other factors and adds the 10 ms to its per-step time (it may not trade them for the GEMM
    curve, which fits a single model's steps about as well)."""
    in_process = rows_of("fp32", FP32) + rows_of("bf16", BF16)
    served = [dataclasses.replace(r, serving_overhead_ms=10.0) for r in in_process]
    assert served[0].values == (
        ("prefill", in_process[0].prefill_ms + 10),
        ("decode", in_process[0].decode_ms + 10),
    )
    plain = calibrate_gpu(in_process, L4, engine="", source="synthetic", main="fp32")
    with_serving = calibrate_gpu(served, L4, engine="", source="synthetic", main="fp32")
    for before, after in ((plain, with_serving), (plain.per_dtype["bf16"], with_serving.per_dtype["bf16"])):
        assert after.factors.step_overhead_ms == pytest.approx(
            before.factors.step_overhead_ms + 10.0, abs=0.05
        )
        assert after.factors.compute == pytest.approx(before.factors.compute, rel=0.01)
        assert after.factors.memory == pytest.approx(before.factors.memory, rel=0.01)
