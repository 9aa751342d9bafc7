"""Run one of the repository's scripts as a user would and read the JSON object its ``--json`` prints last."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_json_script(args: list[str], timeout: int) -> dict:
    """``python ARGS`` from the repository root on one CPU device, XLA's backend optimisation off as in this
    suite (compiles dominate); fails with the script's stderr, else returns its last output line as JSON."""
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
    out = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
