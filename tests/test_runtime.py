"""The scripts' allocator setup: one re-execution with mimalloc preloaded, opt-out, no loop."""

import os
import subprocess
import sys

import pytest

from dsjax.runtime import mimalloc_library

# Imports only dsjax.runtime (no jax), so the re-executed interpreter starts in well under a second.
SCRIPT = """
import os, sys
sys.modules["dsjax"] = type(sys)("dsjax")  # skip the package __init__ (jax): only runtime.py is needed
sys.modules["dsjax"].__path__ = [{pkg!r}]
from dsjax.runtime import active_allocator, preload_allocator
print("start", flush=True)
preload_allocator()
print(active_allocator(), os.environ.get("LD_PRELOAD", ""))
"""


def _run(extra_env: dict) -> list[str]:
    pkg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dsjax")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "DSJAX_ALLOCATOR")}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(pkg=pkg)],
        env={**env, **extra_env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.split("\n")


@pytest.mark.skipif(sys.platform != "linux" or mimalloc_library() is None, reason="mimalloc wheel is Linux-only")
def test_preload_allocator_reexecutes_once_with_mimalloc():
    lines = _run({})
    # "start" twice: the first process printed it, then was replaced by one with mimalloc loaded, which
    # found it preloaded and went on (a loop would time out).
    assert lines.count("start") == 2, lines
    allocator, preload = lines[2].split(" ", 1)
    assert allocator == "mimalloc" and preload.startswith(mimalloc_library())


def test_allocator_opt_out_and_existing_preload_are_respected():
    lines = _run({"DSJAX_ALLOCATOR": "system"})
    assert lines[:2] == ["start", "system "], lines
    if mimalloc_library() is not None:  # a user's own preload is kept, not replaced or re-executed
        lines = _run({"LD_PRELOAD": mimalloc_library()})
        assert lines.count("start") == 1 and lines[1] == f"mimalloc {mimalloc_library()}", lines
