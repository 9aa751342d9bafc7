"""Multi-host: the training script under ``jax.distributed`` with two CPU processes on localhost (4 simulated
devices each, Gloo collectives) gives the losses of one process with 8 devices, and resumes exactly from the
checkpoint the two processes wrote together."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from dsjax.train.metrics import read_jsonl

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
TIMEOUT_S = 600  # all processes together; a run takes about a minute on 2 CPU cores
STEPS = 6
REWIND_TO = 4  # the 2-process run then resumes from its step-4 checkpoint and recomputes steps 5 and 6


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _tail(path, n=4000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]


def _run_all(jobs: dict[str, list[str]], log_dir, worker: str = WORKER) -> dict[str, dict]:
    """Start every worker at once; return each one's last stdout line as JSON. If one fails or time runs out,
    kill the rest (a process whose peer died would otherwise wait in a collective) and show their stderr."""
    procs, logs = {}, {}
    for name, args in jobs.items():
        out, err = log_dir / f"{name}.out", log_dir / f"{name}.err"
        logs[name] = (out, err)
        with open(out, "w") as fo, open(err, "w") as fe:
            procs[name] = subprocess.Popen([sys.executable, worker, *args], stdout=fo, stderr=fe)

    def report(what: str) -> str:
        parts = [what]
        for name, p in procs.items():
            parts.append(f"--- {name} (exit {p.returncode}) stderr:\n{_tail(logs[name][1])}")
        return "\n".join(parts)

    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs.values()):
            failed = [n for n, p in procs.items() if p.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                for p in procs.values():
                    if p.poll() is None:
                        p.kill()
                for p in procs.values():
                    p.wait()
                pytest.fail(report(f"{failed} failed" if failed else f"timed out after {TIMEOUT_S} s"))
            time.sleep(0.2)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode for p in procs.values()):
        pytest.fail(report("a worker failed"))
    results = {}
    for name, (out, _) in logs.items():
        lines = [line for line in out.read_text().splitlines() if line.strip()]
        assert lines, report(f"{name} printed nothing")
        results[name] = json.loads(lines[-1])
    return results


@pytest.mark.slow
def test_two_processes_match_one_and_resume(tmp_path):
    port = _free_port()
    single, multi = tmp_path / "single", tmp_path / "multi"
    jobs = {"single": ["--process-id", "0", "--num-processes", "1", "--out", str(single)]}
    for i in range(2):
        jobs[f"proc{i}"] = [
            *("--process-id", str(i), "--num-processes", "2", "--port", str(port), "--out", str(multi)),
            *("--rewind-to", str(REWIND_TO)),
        ]
    res = _run_all(jobs, tmp_path)
    one, procs = res["single"], [res["proc0"], res["proc1"]]

    steps = list(range(1, STEPS + 1))
    assert one["steps"] == steps and one["process_count"] == 1
    for i, r in enumerate(procs):
        assert (r["process_index"], r["process_count"], r["steps"]) == (i, 2, steps)
    # The metrics are replicated: both processes see the same values.
    assert procs[0]["loss"] == procs[1]["loss"] and procs[0]["load"] == procs[1]["load"]

    # Same initial weights and the same global batch: the first step (before any update) routes the same
    # tokens to the same experts. From then on the two runs differ only in how cross-process reductions
    # (Gloo's all-reduce, not the in-process one) order their float sums: agreement to float32 rounding.
    assert procs[0]["load"][0] == one["load"][0]
    np.testing.assert_allclose(procs[0]["loss"], one["loss"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(procs[0]["ce"], one["ce"], rtol=1e-6, atol=0)

    # Resume from the checkpoint both processes wrote (weights, optimizer, data position): same process count,
    # same reductions, so the recomputed steps repeat the uninterrupted ones exactly.
    for r in procs:
        assert r["resumed"]["steps"] == steps[REWIND_TO:]
        assert r["resumed"]["loss"] == r["loss"][REWIND_TO:]
    assert max(int(name) for name in os.listdir(multi / "checkpoints") if name.isdigit()) == STEPS
    # Process 0 alone writes the run's files: every logged step appears once, also after the resume.
    assert [r["step"] for r in read_jsonl(str(multi / "metrics.jsonl"))] == steps
