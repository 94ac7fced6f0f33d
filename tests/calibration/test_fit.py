"""Fitting cost factors: known factors are recovered from data they generated, the published Helix
profiles are predicted on rows the fit never saw, and bad measurement files get one clear line."""

import itertools

import pytest

from hetserve.calibration.fit import errors, fit_gpu, holdout_split, predict_ms
from hetserve.calibration.measurements import ModelRow, read_csv
from hetserve.specs.gpus import builtin_gpus
from hetserve.specs.models import load_model
from tests.conftest import shared_file

GPUS = builtin_gpus()
L4 = GPUS["l4"]
TRUTH = {
    "compute": 0.55,
    "memory": 0.72,
    "gemm_half_rows": 96.0,
    "overlap": 0.6,
    "layer_overhead_us": 35.0,
    "step_overhead_ms": 4.0,
    "attention_compute": 0.3,
    "attention_memory": 0.5,
    "allreduce_latency_us": 40.0,
    "collective": 0.35,
}


def synthetic_rows(gpu, truth, tps=(1, 2, 4)):
    """Full-model rows the cost model predicts with ``truth``: the data a perfect engine would give. Two
    models of different depth, so per-layer and per-step overheads can be told apart."""
    true_gpu = gpu.model_copy(update={"efficiency": gpu.efficiency.model_copy(update=truth)})
    rows = []
    grid = itertools.product(("llama-3.1-8b", "llama-2-13b"), tps, (1, 4, 16, 64), (64, 512, 2048), (32, 512))
    for name, tp, batch, prompt, output in grid:
        model = load_model(name)
        probe = ModelRow(model, true_gpu, tp, batch, prompt, output, 1.0, 1.0, "", "synthetic")
        prefill, decode = predict_ms(probe, true_gpu)
        rows.append(ModelRow(model, gpu, tp, batch, prompt, output, prefill, decode, "", "synthetic"))
    return rows


def test_known_factors_are_recovered_within_one_percent():
    fit = fit_gpu(synthetic_rows(L4, TRUTH), L4)
    for name, value in TRUTH.items():
        assert getattr(fit.factors, name) == pytest.approx(value, rel=0.01), name
    assert fit.error.median_ape < 0.1


def test_without_tp_rows_collective_factors_stay_default():
    fit = fit_gpu(synthetic_rows(L4, TRUTH, tps=(1,)), L4)
    assert "collective" not in fit.fitted
    assert fit.factors.collective == L4.efficiency.collective
    assert fit.factors.compute == pytest.approx(TRUTH["compute"], rel=0.01)


def test_too_few_rows_is_a_clear_error():
    from hetserve.errors import HetserveError

    with pytest.raises(HetserveError, match="too few to fit"):
        fit_gpu(synthetic_rows(L4, TRUTH)[:3], L4)


def test_holdout_by_largest_value_and_by_name():
    rows = synthetic_rows(L4, TRUTH)
    fit_rows, held = holdout_split(rows, by="tp")
    assert {r.tp for r in held} == {4} and {r.tp for r in fit_rows} == {1, 2}
    fit_rows, held = holdout_split(rows, by="batch=16")
    assert {r.batch for r in held} == {16}
    fit_rows, held = holdout_split(rows, fraction=0.25, seed=3)
    assert len(held) == round(0.25 * len(rows)) and len(fit_rows) + len(held) == len(rows)
    assert holdout_split(rows, fraction=0.25, seed=3)[1] == held  # the same seed, the same rows


def test_fit_on_tp_1_2_predicts_tp_4():
    fit_rows, held = holdout_split(synthetic_rows(L4, TRUTH), by="tp")
    fit = fit_gpu(fit_rows, L4)
    fitted = L4.model_copy(update={"efficiency": fit.factors})
    assert errors(held, fitted).median_ape < 1.0


def test_helix_profiles_held_out_error():
    """Calibrated on a random 70% of the published per-layer profiles, the other 30% are predicted with
    a median error under 15% for every GPU and phase, and a smaller p90 error than the defaults'."""
    rows = read_csv(shared_file("reference", "helix_layer_profiles.csv"), GPUS)
    fit_rows, held = holdout_split(rows, fraction=0.3, seed=0)
    for name in sorted({r.gpu.name for r in rows}):
        gpu = GPUS[name]
        fit = fit_gpu([r for r in fit_rows if r.gpu.name == name], gpu)
        theirs = [r for r in held if r.gpu.name == name]
        after = errors(theirs, gpu.model_copy(update={"efficiency": fit.factors}))
        for phase, (_, median, _) in after.by_phase.items():
            assert median <= 15.0, (name, phase)
        assert after.p90_ape < errors(theirs, gpu).p90_ape, name


GOOD = "model,gpu,tp,batch,prompt,output,prefill_ms,decode_ms\n"


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "model,gpu,tp,batch,prompt,output,prefill_ms\nllama-3.1-8b,l4,1,1,64,32,10\n",
            "missing column(s) decode_ms",
        ),
        (GOOD + "llama-3.1-8b,l4,1,1,64,32,ten,2\n", "row 2, column 'prefill_ms': 'ten' is not a number"),
        (GOOD + "llama-3.1-8b,l4x,1,1,64,32,10,2\n", "row 2, column 'gpu': unknown GPU 'l4x'"),
        (GOOD + "llama-9,l4,1,1,64,32,10,2\n", "row 2, column 'model'"),
        (
            GOOD + "llama-3.1-8b,l4,1,1,64,32,10,2\nllama-3.1-8b,l4,1,1,64,32,-3,2\n",
            "row 3, column 'prefill_ms'",
        ),
        (GOOD + "llama-3.1-8b,l4,1,1,64,32,10,2\n", "too few to fit"),
        (GOOD + "llama-3.1-8b,l4,0,1,64,32,10,2\n", "row 2, column 'tp'"),
    ],
)
def test_bad_measurement_files(run_cli, write, tmp_path, text, message):
    path = write("m.csv", text)
    code, out, err = run_cli("calibrate", "--measurements", path, "--out", tmp_path / "c.yaml")
    assert code == 2
    assert message in err and str(path) in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c.yaml").exists()


def test_calibrate_cli_writes_a_file_estimate_and_simulate_use(run_cli, write, tmp_path):
    rows = synthetic_rows(L4, TRUTH, tps=(1, 2))
    lines = [GOOD.strip()] + [
        f"{r.model.name},l4,{r.tp},{r.batch},{r.prompt},{r.output},{r.prefill_ms},{r.decode_ms}" for r in rows
    ]
    data = write("m.csv", "\n".join(lines) + "\n")
    calib = tmp_path / "calib.yaml"
    code, out, err = run_cli("calibrate", "--measurements", data, "--holdout-by", "batch", "--out", calib)
    assert code == 0, err
    assert "wrote" in out and calib.exists()
    args = ("estimate", "--model", "llama-3.1-8b", "--gpu", "l4", "--batch", "4", "--json")
    _, default, _ = run_cli(*args)
    _, calibrated, _ = run_cli(*args, "--calibration", calib)
    import json

    truth_row = ModelRow(load_model("llama-3.1-8b"), L4, 1, 4, 512, 128, 1, 1, "", "")
    truth_gpu = L4.model_copy(update={"efficiency": L4.efficiency.model_copy(update=TRUTH)})
    want = predict_ms(truth_row, truth_gpu)[0]
    assert json.loads(calibrated)["prefill_ms"] == pytest.approx(want, rel=0.02)
    assert json.loads(default)["prefill_ms"] != pytest.approx(want, rel=0.02)
    # a calibration naming no GPU in use is refused with the names it has
    code, _, err = run_cli("estimate", "--model", "llama-3.1-8b", "--gpu", "t4", "--calibration", calib)
    assert code == 2 and "covers l4" in err
