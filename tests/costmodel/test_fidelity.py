"""The roofline model against published per-layer measurements (Helix's vLLM profiles)."""

from hetserve.costmodel.fidelity import compare, summarise
from hetserve.specs.gpus import builtin_gpus
from tests.conftest import shared_file


def test_median_error_within_20_percent_per_gpu_and_phase():
    points = compare(shared_file("reference", "helix_layer_profiles.csv"), builtin_gpus())
    summary = summarise(points)
    assert {gpu for gpu, _ in summary} == {"a100-40gb", "l4", "t4", "v100-16gb"}
    for (gpu, phase), s in summary.items():
        assert s["median_ape"] <= 20.0, f"{gpu} {phase}: median error {s['median_ape']:.1f}%"
