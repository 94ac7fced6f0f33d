import subprocess

import pytest

from ..conftest import EXAMPLES


def test_refusal_names_instance_and_feature(run_cli, tmp_path):
    code, out, err = run_cli(
        "export", EXAMPLES / "serve" / "smollm2-pipeline.yaml", "--to", "vllm", "--out", tmp_path
    )
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "instance 'chain'" in err and "asymmetric TP between stages" in err
    assert not list(tmp_path.iterdir())


def test_nearest_writes_scripts_and_readme(run_cli, tmp_path):
    plan = EXAMPLES / "serve" / "smollm2-pipeline.yaml"
    code, out, err = run_cli("export", plan, "--to", "vllm", "--out", tmp_path, "--nearest")
    assert code == 0, err
    assert "nearest: instance 'chain': asymmetric TP" in err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["README.md", "l4-box.sh", "t4-box.sh"]
    readme = (tmp_path / "README.md").read_text()
    assert "TP 1/2/1 -> 1" in readme and "NODE_L4_BOX_HOST" in readme and "./t4-box.sh" in readme
    for script in tmp_path.glob("*.sh"):
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


@pytest.mark.parametrize("target", ["vllm", "sglang", "k8s"])
def test_plain_plan_needs_no_nearest(run_cli, tmp_path, target):
    code, out, err = run_cli(
        "export", EXAMPLES / "serve" / "smollm2-replicas.yaml", "--to", target, "--out", tmp_path
    )
    assert code == 0 and err == ""
    assert (tmp_path / "README.md").exists()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["export", "missing.yaml", "--to", "vllm"], ["missing.yaml", "not found"]),
        (["export", str(EXAMPLES / "serve" / "smollm2-tp2.yaml"), "--to", "ray"], ["unknown target 'ray'"]),
        (
            ["export", str(EXAMPLES / "serve" / "smollm2-tp2.yaml"), "--to", "k8s", "--engine", "trt"],
            ["unknown engine 'trt'"],
        ),
    ],
)
def test_cli_errors_are_one_line(run_cli, argv, words):
    code, out, err = run_cli(*argv)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert all(w in err for w in words)
