"""Sensitivity files (``hetserve quality --sensitivity``): what the planner reads from them and the
mistakes a user can make in them."""

import pytest

from hetserve.errors import HetserveError
from hetserve.planner.quality import sensitivity, sensitivity_basis
from hetserve.specs.models import load_model
from hetserve.specs.sensitivity import FLOOR_SHARE, SensitivityFile, with_sensitivity

SMALL = {"model": "m", "num_layers": 4, "tokens": 400, "group_size": 64, "base_perplexity": 24.0}


def sens_file(**change):
    return SensitivityFile.model_validate({**SMALL, "change_pct": change})


def test_weights_follow_the_4_bit_change_with_a_floor_and_mean_one():
    s = sens_file(**{"8": [0.0, 0.1, 0.0, 0.0], "4": [4.0, 2.0, -0.5, 0.0]})
    w = s.weights()
    assert sum(w) / len(w) == pytest.approx(1.0)
    assert w[0] == pytest.approx(2 * w[1])  # measured changes keep their ratio
    floor = FLOOR_SHARE * 3.0  # of the mean positive change (4 and 2)
    assert w[2] == pytest.approx(w[3]) and w[2] / w[1] == pytest.approx(floor / 2.0)
    assert all(x > 0 for x in w)  # a layer that measured better is noise, not free to quantise


def test_no_layer_hurt_means_all_alike():
    assert sens_file(**{"4": [0.0, -0.1, 0.0, -0.2]}).weights() == [1.0] * 4


def test_the_8_bit_change_is_used_when_only_it_was_measured():
    w = sens_file(**{"8": [1.0, 1.0, 3.0, 3.0]}).weights()
    assert w == pytest.approx([0.5, 0.5, 1.5, 1.5])


def write_sens(write, layers, change4):
    lines = "\n".join(f"    - {c}" for c in change4)
    return write(
        "sens.yaml",
        f"model: x\nnum_layers: {layers}\ntokens: 400\ngroup_size: 64\nbase_perplexity: 20.0\n"
        f"change_pct:\n  4:\n{lines}\n",
    )


def test_a_file_for_another_model_is_one_message_naming_it_and_the_fix(write):
    path = write_sens(write, 3, [1.0, 2.0, 3.0])
    with pytest.raises(HetserveError) as e:
        with_sensitivity(load_model("smollm2-135m"), path)
    msg = str(e.value)
    assert "sens.yaml" in msg and "30" in msg and "hetserve quality --sensitivity" in msg


@pytest.mark.parametrize(
    "change, field",
    [("change_pct:\n  4: [1.0, 2.0]\n", "change_pct"), ("change_pct:\n  2: [1.0, 2.0, 3.0]\n", "bits")],
)
def test_wrong_counts_and_widths_name_the_field(write, change, field):
    path = write(
        "bad.yaml", "model: x\nnum_layers: 3\ntokens: 400\ngroup_size: 64\nbase_perplexity: 20.0\n" + change
    )
    with pytest.raises(HetserveError) as e:
        with_sensitivity(load_model("smollm2-135m"), path)
    assert "bad.yaml" in str(e.value) and field in str(e.value)


def test_the_planner_uses_the_measured_weights_and_says_so(write):
    model = load_model("smollm2-135m")
    assert "assumed" in sensitivity_basis(model)
    changes = [0.1 * (i % 7) + 0.05 for i in range(model.num_layers)]
    measured = with_sensitivity(model, write_sens(write, model.num_layers, changes))
    w = sensitivity(measured)
    assert w != sensitivity(model) and len(w) == model.num_layers
    assert sorted(range(len(w)), key=w.__getitem__)[0] in [i for i in range(30) if i % 7 == 0]
    assert "measured" in sensitivity_basis(measured) and "sens.yaml" in sensitivity_basis(measured)
