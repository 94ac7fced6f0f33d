"""Every generated vLLM command line of the SmolLM2 plans, parsed by vLLM's own argument parser.

vLLM is not a dependency of hetserve: the parser runs in a separate interpreter named by
HETSERVE_VLLM_PYTHON (a virtual environment with vllm installed); the test skips without it.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from .util import SMOLLM2, exported

PARSE = r"""
import json, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
try:
    from vllm.entrypoints.openai.cli_args import make_arg_parser
except ImportError:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.engine.arg_utils import EngineArgs

out = []
for argv in json.load(sys.stdin):
    parser = make_arg_parser(FlexibleArgumentParser())
    ns = parser.parse_args(argv)
    args = EngineArgs.from_cli_args(ns)
    out.append({
        "model": ns.model_tag, "port": ns.port, "tp": args.tensor_parallel_size,
        "pp": args.pipeline_parallel_size, "block_size": args.block_size,
        "kv_role": args.kv_transfer_config.kv_role if args.kv_transfer_config else None,
        "max_num_seqs": args.max_num_seqs,
    })
print(json.dumps(out))
"""


def _python() -> str:
    python = os.environ.get("HETSERVE_VLLM_PYTHON")
    if not python:
        pytest.skip("set HETSERVE_VLLM_PYTHON to a Python interpreter with vllm installed to run this test")
    if not Path(python).exists():
        pytest.skip(f"HETSERVE_VLLM_PYTHON={python} does not exist")
    return python


def test_vllm_parses_every_smollm2_command():
    python = _python()
    commands = []
    for path in SMOLLM2:
        out, _ = exported(path, "vllm")
        for step in out.steps:
            if step.engine:
                assert step.argv[:2] == ["vllm", "serve"]
                commands.append((step, step.argv[2:]))
    assert commands
    proc = subprocess.run(
        [python, "-c", PARSE],
        input=json.dumps([argv for _, argv in commands]),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    parsed = json.loads(proc.stdout.strip().splitlines()[-1])
    for (_, argv), got in zip(commands, parsed):
        assert got["model"] == argv[0]
        assert str(got["port"]) == argv[argv.index("--port") + 1]
        assert str(got["tp"]) == argv[argv.index("--tensor-parallel-size") + 1]
        assert str(got["pp"]) == argv[argv.index("--pipeline-parallel-size") + 1]
        assert str(got["block_size"]) == argv[argv.index("--block-size") + 1]
        assert got["kv_role"] == ("kv_both" if "--kv-transfer-config" in argv else None)
