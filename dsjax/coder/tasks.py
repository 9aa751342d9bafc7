"""A procedural family of small Python programming tasks in HumanEval's format, for the code main job.

Each task is a function signature and a one-line docstring (the prompt); the model writes the body. Tasks come
from six templates (an affine map, counting a character, a thresholded sum, repeating a string, taking a
prefix, the maximum plus a constant); a task's constants are default values of its parameters
(``def scale_shift(x, a=7, b=12):``), and its 4 assertions call it with the first argument only, on inputs
chosen so that the typical slips (``>=`` for ``>``, ``min`` for ``max``, the wrong end of a slice, an operator
mixed up) fail some of them. Splits are decided by a stable hash of the prompt, so a held-out task never
appears in training data.

Why the constants are parameters rather than literals in the docstring: the 4-layer model of the job, in its
pretraining budget (500-800 steps of 16 x 128 tokens), learned no copying from context at all. With the
constants written in the docstring (``Return x * 7 + 12.``) and every corpus body right (600 steps, no FIM),
its loss on the body's digits
stayed at the prior's (2.2 nats per digit, as on the docstring's own digits), and on a bare copy task
(``copy qwerty -> qwerty``) it had not learned to copy after 200 steps either. A family that needs copying
would need a larger or longer-trained base model.

The pretraining corpus (:func:`corpus`) is code "from the web" in miniature: each training task with a body
that is right only ``accuracy`` of the time and otherwise has one of those slips. The base model therefore knows
the shape of every solution but is careless with the details; execution feedback is what can fix that.
"""

from __future__ import annotations

import json
import os
import string
import zlib
from collections.abc import Callable

import numpy as np

from dsjax.rl.rewards import Reward, code_tests_reward
from dsjax.rl.tasks import SPLITS, Problem

# (name, signature with {constants}, docstring, correct body, constants, wrong bodies, inputs: rng -> args)
_Template = tuple[str, str, str, str, list, list, Callable | None]


def _ints(rng, n, lo=-9, hi=30):
    return [int(v) for v in rng.integers(lo, hi, size=n)]


def _templates() -> list[_Template]:
    letters = list(string.ascii_lowercase)
    return [
        ("scale_shift", "x, a={a}, b={b}", "Return x times a plus b.", "return x * a + b",
         [dict(a=a, b=b) for a in range(2, 10) for b in range(10, 30)],
         ["return x * b + a", "return x + a * b", "return x * a - b", "return (x + a) * b", "return x * a",
          "return x * (a + b)"],
         lambda rng: [[0], [1], [int(rng.integers(2, 9))], [int(rng.integers(-9, -1))]]),
        ("count_char", "s, ch={ch!r}", "Return how many times ch occurs in s.", "return s.count(ch)",
         [dict(ch=ch) for ch in letters], ["return len(s)", "return s.count(ch) + 1", "return s.find(ch)",
                                           "return s.index(ch)", "return s.count(s[0])"],
         None),  # inputs depend on ch: see _inputs
        ("sum_above", "xs, c={c}", "Return the sum of the items of xs greater than c.",
         "return sum(v for v in xs if v > c)", [dict(c=c) for c in range(10, 100)],
         ["return sum(v for v in xs if v >= c)", "return sum(v for v in xs if v < c)", "return sum(xs)",
          "return len([v for v in xs if v > c])", "return sum(v for v in xs if v > c + 1)"],
         None),
        ("repeat", "s, n={n}", "Return s repeated n times.", "return s * n", [dict(n=n) for n in range(2, 10)],
         ["return s * (n + 1)", "return s * (n - 1)", "return s * n + s", "return s + s", "return s[:n]"],
         lambda rng: [["".join(rng.choice(letters, size=int(rng.integers(1, 4))))] for _ in range(3)] + [[""]]),
        ("first_items", "xs, n={n}", "Return the first n items of xs.", "return xs[:n]",
         [dict(n=n) for n in range(2, 10)],
         ["return xs[n:]", "return xs[:n - 1]", "return xs[:n + 1]", "return xs[-n:]", "return xs[n]"],
         None),
        ("max_plus", "xs, c={c}", "Return the largest item of xs plus c.", "return max(xs) + c",
         [dict(c=c) for c in range(10, 100)],
         ["return min(xs) + c", "return max(xs) - c", "return max(xs) + c + 1", "return xs[0] + c",
          "return max(xs) + 1"],
         lambda rng: [[_ints(rng, int(rng.integers(2, 6)))] for _ in range(4)]),
    ]  # fmt: skip


def _inputs(name: str, const: dict, rng: np.random.Generator, fixed: Callable | None) -> list[list]:
    if fixed is not None:
        return fixed(rng)
    if name == "count_char":  # strings with 0 to several copies of ch, and one starting with another letter
        ch, other = const["ch"], "z" if const["ch"] != "z" else "y"
        return [[f"{other}{ch}b{ch}"], [f"{other}xyz"], [f"{ch}{ch}{ch}"], [f"{other}{ch}q{ch}r{ch}"]]
    if name == "sum_above":  # lists straddling the threshold, one containing it exactly (catches >=)
        c = const["c"]
        return [[[c, c + 2, c - 3, c + 5]], [[c + 1, c - 1]], [_ints(rng, 5, c - 10, c + 10)], [[c - 4]]]
    n = const["n"]  # first_items: longer and shorter lists than n
    return [[list(range(1, n + 4))], [_ints(rng, n + 2)], [_ints(rng, max(n - 1, 1))], [list(range(20, 20 + n))]]


class CodeTask:
    """The six-template task family (382 tasks: 307 train, 75 held out); each problem's ``fields`` hold
    ``prompt``, ``tests`` (assertions on ``candidate``), ``entry_point`` and ``answer`` (the canonical body)."""

    def __init__(self, heldout_fraction: float = 0.2, seed: int = 0):
        if not 0 < heldout_fraction < 1:
            raise ValueError(f"heldout_fraction={heldout_fraction} must lie in (0, 1)")
        self.heldout_fraction = heldout_fraction
        self.problems: dict[str, list[Problem]] = {s: [] for s in SPLITS}
        self._slips: dict[str, list[str]] = {}
        rng = np.random.default_rng(seed)  # fixes the test inputs; the split does not depend on it
        for name, signature, doc, body, consts, slips, inputs in _templates():
            for const in consts:
                p = _problem(name, signature.format(**const), doc, body, _inputs(name, const, rng, inputs))
                split = "heldout" if zlib.crc32(p.question.encode()) % 10_000 < heldout_fraction * 10_000 else "train"
                self.problems[split].append(p)
                # A slip can coincide with the right answer for some constants (``s + s`` for n = 2): keep only
                # the ones the tests tell apart.
                wrong = [f"    {b}\n" for b in slips]
                self._slips[p.question] = [b for b in wrong if _tests_passed(p, b) < len(p.fields["tests"])]

    def sample(self, n: int, split: str, rng: np.random.Generator) -> list[Problem]:
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; choose one of {SPLITS}")
        pool = self.problems[split]
        return [pool[int(i)] for i in rng.integers(len(pool), size=n)]

    def rewards(self) -> list[Reward]:
        """Fraction of the assertions passed, run in the sandbox (graded: a slip that fails one test in four
        still earns 0.75)."""
        return [Reward(code_tests_reward, 1.0, "tests")]

    def slips(self, problem: Problem) -> list[str]:
        """Wrong bodies of the kind the corpus holds for ``problem`` (each fails at least one of its tests)."""
        if problem.question not in self._slips:
            raise ValueError(f"not a task of this family: {problem.question!r}")
        return self._slips[problem.question]


def _problem(name: str, arg: str, doc: str, body: str, inputs: list[list]) -> Problem:
    prompt = f'def {name}({arg}):\n    """{doc}"""\n'
    solution = f"    {body}\n"
    scope: dict = {}
    exec(prompt + solution, scope)  # our own canonical solution, to compute the expected outputs
    fn = scope[name]
    tests = [f"assert candidate({', '.join(map(repr, args))}) == {fn(*args)!r}" for args in inputs]
    return Problem(prompt, solution, {"answer": solution, "prompt": prompt, "tests": tests, "entry_point": name})


def _tests_passed(problem: Problem, body: str) -> int:
    # Our own slip bodies only (never model output): run in this process to filter the corpus's slips.
    scope: dict = {}
    exec(problem.question + body, scope)
    passed = 0
    for test in problem.fields["tests"]:
        try:
            exec(test, {"candidate": scope[problem.fields["entry_point"]]})
            passed += 1
        except Exception:
            pass
    return passed


def corpus(task: CodeTask, n: int, rng: np.random.Generator, *, accuracy: float) -> list[str]:
    """``n`` training documents: a training task's prompt and a body that is right with probability
    ``accuracy``, else one of the template's slips (uniformly)."""
    pool = task.problems["train"]
    docs = []
    for i in rng.integers(len(pool), size=n):
        p = pool[int(i)]
        body = p.answer if rng.random() < accuracy else str(rng.choice(task.slips(p)))
        docs.append(p.question + body)
    return docs


def humaneval_fields(problem: Problem, index: int) -> dict:
    """``problem`` as HumanEval's fields (task_id, prompt, canonical_solution, test, entry_point): its assertions
    become the body of ``check(candidate)``."""
    test = "def check(candidate):\n" + "".join(f"    {t}\n" for t in problem.fields["tests"])
    return dict(task_id=f"dsjax-code/{index}", prompt=problem.question, canonical_solution=problem.answer,
                test=test, entry_point=problem.fields["entry_point"])  # fmt: skip


def write_humaneval_jsonl(problems: list[Problem], path: str | os.PathLike) -> None:
    """Write problems in HumanEval's JSONL format, which ``scripts/eval_code.py --problems PATH`` reads."""
    with open(path, "w") as f:
        f.writelines(json.dumps(humaneval_fields(p, i)) + "\n" for i, p in enumerate(problems))
