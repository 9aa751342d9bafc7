"""Code evaluation: the pass@k estimator, the code task family, the execution rewards, and scripts/eval_code.py
end to end on a checkpoint made here."""

import dataclasses
import importlib.util
import json
import math
import pathlib
import sys

import numpy as np
import pytest

from dsjax.coder.passk import mean_pass_at_k, pass_at_k
from dsjax.coder.tasks import CodeTask, corpus, write_humaneval_jsonl
from dsjax.rl.rewards import Reward, code_pass_reward, code_tests_reward, score

ROOT = pathlib.Path(__file__).parents[1]


# ---- pass@k ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (10, 3, 5, 1 - 21 / 252),  # C(7,5)/C(10,5) = 21/252: 0.91667, the reference's worked example
        (10, 3, 1, 0.3),  # pass@1 is the fraction correct
        (5, 0, 3, 0.0),
        (5, 5, 5, 1.0),
        (4, 1, 4, 1.0),  # n - c < k: every draw of 4 holds the correct one
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (200, 1, 100, 0.5),  # one correct among 200, half drawn
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_pass_at_k_equals_binomial_closed_form():
    for n in range(1, 30):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


@pytest.mark.parametrize("n, c, k", [(0, 0, 1), (3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)])
def test_pass_at_k_rejects_bad_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_pass_at_k_drops_k_above_samples():
    out = mean_pass_at_k([10, 10], [3, 0], [1, 10, 100])
    assert set(out) == {"pass@1", "pass@10"}
    assert out["pass@1"] == pytest.approx(0.15) and out["pass@10"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mean_pass_at_k([], [], [1])


# ---- the task family -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def task():
    return CodeTask(seed=0)


def test_code_task_splits_are_disjoint_and_deterministic(task):
    train = {p.question for p in task.problems["train"]}
    heldout = {p.question for p in task.problems["heldout"]}
    assert not train & heldout and len(heldout) > 50 and len(train) > 250
    assert [p.fields["tests"] for p in CodeTask(seed=0).problems["heldout"]] == [
        p.fields["tests"] for p in task.problems["heldout"]
    ]
    docs = corpus(task, 300, np.random.default_rng(0), accuracy=0.3)
    assert all(any(d.startswith(q) for q in train) for d in docs)  # no held-out prompt in the corpus
    right = sum(any(d == p.question + p.answer for p in task.problems["train"]) for d in docs)
    assert 0.2 < right / len(docs) < 0.4


@pytest.fixture(scope="module")
def sandbox():
    from dsjax.coder.sandbox import Sandbox

    with Sandbox(timeout_s=2.0, workers=2) as sb:
        yield sb


def test_code_rewards_in_the_sandbox(task, sandbox):
    problems = task.problems["heldout"][:6]
    completions, expect_fraction = [], []
    for p in problems:
        completions.append(p.answer)
        expect_fraction.append(1.0)
        slip = task.slips(p)[0]
        completions.append(slip)
        expect_fraction.append(None)  # somewhere in [0, 1): checked below
    # Hostile or broken output: must score 0, never hang or crash the scorer.
    hostile = ["    while True: pass\n", "    return (\n", "    import os; os._exit(0)\n", "\x00\x01garbage"]
    completions += hostile
    rows = [p for p in problems for _ in range(2)] + [problems[0]] * len(hostile)
    fields = {k: [p.fields[k] for p in rows] for k in ("prompt", "tests", "entry_point", "answer")}
    graded = code_tests_reward(None, completions, sandbox=sandbox, **fields)
    binary = code_pass_reward(None, completions, sandbox=sandbox, **fields)
    for i, (g, b) in enumerate(zip(graded, binary)):
        if i < 2 * len(problems) and i % 2 == 0:
            assert g == 1.0 and b == 1.0
        elif i < 2 * len(problems):
            assert 0.0 <= g < 1.0 and b == 0.0
        else:
            assert g == 0.0 and b == 0.0, completions[i]
    # The fraction is per assertion, the same as running each assertion here on our own (trusted) slips.
    from dsjax.coder.tasks import _tests_passed

    rows = [(p, slip) for p in task.problems["train"][::40] for slip in task.slips(p)]
    one = {k: [p.fields[k] for p, _ in rows] for k in ("prompt", "tests", "entry_point")}
    graded = code_tests_reward(None, [slip for _, slip in rows], sandbox=sandbox, **one)
    assert graded == [_tests_passed(p, slip) / len(p.fields["tests"]) for p, slip in rows]
    assert any(0 < g < 1 for g in graded)  # the family has partially right slips
    # No tests: cannot judge (None), and score() combines as for any reward.
    untested = dict(prompt=["def f():\n"], tests=[[]], entry_point=["f"], sandbox=sandbox)
    assert code_tests_reward(None, ["x"], **untested) == [None]
    total, per_fn = score([Reward(code_tests_reward, 1.0, "tests")], None, completions[:2],
                          {k: v[:2] for k, v in fields.items()})  # fmt: skip
    assert total[0] == 1.0 and "tests" in per_fn


def test_humaneval_jsonl_round_trip(task, tmp_path):
    from dsjax.coder.humaneval import program, read_problems

    path = tmp_path / "tasks.jsonl"
    write_humaneval_jsonl(task.problems["heldout"][:5], path)
    problems = read_problems(path)
    assert [q.prompt for q in problems] == [p.question for p in task.problems["heldout"][:5]]
    src = program(problems[0], problems[0].canonical_solution)
    scope: dict = {}
    exec(src, scope)  # our own canonical solution and tests: raises if the assembled program were wrong


# ---- scripts/eval_code.py end to end --------------------------------------------------------------------------
def _script(name):
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import dsjax

    path = tmp_path_factory.mktemp("ckpt")
    cfg = dataclasses.replace(dsjax.ModelConfig.tiny(), vocab_size=264)  # the byte tokenizer's ids
    dsjax.save_pretrained(dsjax.create_model(cfg, seed=0), path)
    return path


@pytest.mark.parametrize("mode", ["complete", "infill-line"])
def test_eval_code_script_end_to_end(checkpoint, task, tmp_path, capsys, mode):
    problems = tmp_path / "tasks.jsonl"
    write_humaneval_jsonl(task.problems["heldout"][:3], problems)
    out = tmp_path / "out"
    args = ["--checkpoint", str(checkpoint), "--problems", str(problems), "--mode", mode, "--max-new-tokens", "8",
            "--out", str(out), "--json", "--timeout", "5", "--workers", "2"]  # fmt: skip
    if mode == "complete":
        args += ["--samples", "2", "--temperature", "1.0", "--k", "1,2,5"]
    assert _script("eval_code").main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert summary["problems"] == len(rows) == 3 and summary["mode"] == mode
    expected_k = {"pass@1", "pass@2"} if mode == "complete" else {"pass@1"}
    assert {k for k in summary if k.startswith("pass@")} == expected_k  # pass@5 left out: only 2 samples
    n = 2 if mode == "complete" else 1
    assert all(len(r["statuses"]) == n and r["passed"] == r["statuses"].count("passed") for r in rows)
    assert sum(summary["statuses"].values()) == 3 * n


def test_eval_code_rejects_bad_arguments(checkpoint):
    script = _script("eval_code")
    for bad in (["--k", "0"], ["--k", "a,b"], ["--samples", "3"], ["--problems", "/nonexistent.jsonl"]):
        with pytest.raises(SystemExit, match="error"):
            script.main(["--checkpoint", str(checkpoint), *bad])
