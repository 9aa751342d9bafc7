"""Rule-based rewards (R1 §2.2.2): answer accuracy, output format, tag counting; and how they are combined.

A reward function is ``fn(prompts, completions, **example_fields) -> list[float | None]`` (one entry per
completion; ``example_fields`` are the dataset's columns, repeated per completion). ``None`` means "cannot
judge this item" (e.g. an unparseable reference answer): the item is left out of that function's statistics
and of its group's advantage baseline. A function that raises is logged and skipped for the whole batch; the
run goes on. The rule rewards treat completions as text only; the code rewards run them, always in the
sandbox (:mod:`dsjax.coder.sandbox`), never in this process.
"""

from __future__ import annotations

import ast
import logging
import operator
import re
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)

RewardFn = Callable[..., list[float | None]]

# open-r1's anchored format, with DOTALL so reasoning may span lines (without it the reward is always 0), and
# block contents that may not contain the tags themselves, so repeated blocks do not match.
_NO_TAG = r"(?:(?!</?think>|</?answer>).)*"
FORMAT_RE = re.compile(rf"^\s*<think>\n{_NO_TAG}\n</think>\n<answer>\n{_NO_TAG}\n</answer>\s*$", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_TAGS = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")


def extract_answer(completion: str) -> str | None:
    """The text inside the last ``<answer>...</answer>`` pair (stripped), or None: text outside the tags is
    never taken as an answer."""
    found = _ANSWER_RE.findall(completion)
    return found[-1].strip() if found else None


def format_reward(prompts, completions, **_) -> list[float]:
    """1.0 when the whole completion is ``<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>``, else 0.0."""
    return [1.0 if FORMAT_RE.match(c) else 0.0 for c in completions]


def tag_count_reward(prompts, completions, **_) -> list[float]:
    """0.25 for each of the four tag lines present exactly once (repeating blocks earns nothing)."""
    return [sum(0.25 for tag in _TAGS if c.count(tag) == 1) for c in completions]


def _number(text: str) -> Fraction | None:
    t = text.strip().replace(",", "").replace(" ", "")
    if re.fullmatch(r"[-+]?\d+(\.\d+)?", t) or re.fullmatch(r"[-+]?\d+/\d+", t):
        try:
            return Fraction(t)
        except (ValueError, ZeroDivisionError):
            return None
    return None


def answers_match(prediction: str, gold: str) -> bool | None:
    """Does ``prediction`` state ``gold``? Plain numbers compare exactly as rationals, other text by normalised
    equality, then by the ``math-verify`` package (LaTeX, expressions, sets). None if gold cannot be parsed."""
    p, g = _number(prediction), _number(gold)
    if p is not None and g is not None:
        return p == g
    if " ".join(prediction.split()) == " ".join(gold.split()):
        return True
    from math_verify import parse, verify  # lazy: only maths datasets need sympy

    gold_parsed = parse(gold if "$" in gold or "\\" in gold else f"${gold}$")
    if not gold_parsed:
        return None
    return bool(verify(gold_parsed, parse(prediction if "$" in prediction else f"${prediction}$")))


def accuracy_reward(prompts, completions, *, answer: Sequence[str], **_) -> list[float | None]:
    """1.0 when the answer inside the tags matches the reference ``answer`` field, 0.0 when it does not or is
    missing, None when the reference cannot be parsed or verification fails."""
    out: list[float | None] = []
    for completion, gold in zip(completions, answer):
        predicted = extract_answer(completion)
        if predicted is None:
            out.append(0.0)
            continue
        try:
            match = answers_match(predicted, str(gold))
        except Exception as e:  # a verifier bug must not stop the run
            log.warning("accuracy_reward: verification failed for %r vs %r: %s", predicted, gold, e)
            match = None
        out.append(None if match is None else float(match))
    return out


# ---- Countdown -----------------------------------------------------------------------------------------------
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def safe_arithmetic(expression: str) -> tuple[Fraction, list[int]] | None:
    """Value and integer literals of an expression made only of non-negative integers, ``+ - * /`` and
    parentheses, computed exactly with rationals by walking its syntax tree; None for anything else (names,
    calls, powers, division by zero, over-long input). Nothing is executed."""
    if len(expression) > 200:
        return None
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError):
        return None
    literals: list[int] = []

    def value(node) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
            literals.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ZeroDivisionError
            return _OPS[type(node.op)](left, right)
        raise ValueError("disallowed syntax")

    try:
        return value(tree.body), literals
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


def countdown_reward(prompts, completions, *, numbers: Sequence[Sequence[int]], target: Sequence[int], **_):
    """1.0 when the answer is an expression using each given number exactly once that equals ``target``."""
    out = []
    for completion, nums, goal in zip(completions, numbers, target):
        predicted = extract_answer(completion)
        result = safe_arithmetic(predicted) if predicted else None
        ok = result is not None and sorted(result[1]) == sorted(nums) and result[0] == goal
        out.append(1.0 if ok else 0.0)
    return out


# ---- code execution ----------------------------------------------------------------------------------------
_SANDBOX = None


def shared_sandbox():
    """The process-wide sandbox pool the code rewards use (started on first use, closed at exit)."""
    global _SANDBOX
    if _SANDBOX is None:
        # Imported here: the sandbox is a standalone module (no dsjax imports), needed only by code rewards.
        from dsjax.coder.sandbox import Sandbox, SandboxConfig

        _SANDBOX = Sandbox(SandboxConfig(timeout_s=5.0))
    return _SANDBOX


def _test_program(prompt: str, completion: str, tests: Sequence[str], entry_point: str) -> str:
    check = "def check(candidate):\n" + "".join(f"    {t}\n" for t in tests)
    return f"{prompt}{completion}\n\n{check}\ncheck({entry_point})\n"


def _run_deduplicated(programs: list[str], sandbox) -> list[bool]:
    # G samples of one prompt are often identical: run each distinct program once.
    unique = list(dict.fromkeys(programs))
    passed = dict(zip(unique, (r.passed for r in sandbox.run_many(unique))))
    return [passed[p] for p in programs]


def code_tests_reward(prompts, completions, *, prompt: Sequence[str], tests: Sequence[Sequence[str]],
                      entry_point: Sequence[str], sandbox=None, **_) -> list[float | None]:  # fmt: skip
    """Fraction of a task's assertions that the completed program passes, each assertion run as its own
    program in the sandbox (so one failing assertion does not hide the others).

    Fields: ``prompt`` (the function's signature and docstring, which the completion continues), ``tests``
    (assertion lines calling ``candidate``) and ``entry_point`` (the function's name). None when a task has no
    tests. Any completion is safe to score: it runs in the sandbox under its time, memory and process limits.
    """
    sandbox = sandbox or shared_sandbox()
    programs, owner = [], []
    for i, (head, completion, checks, name) in enumerate(zip(prompt, completions, tests, entry_point)):
        for t in checks:
            programs.append(_test_program(head, str(completion), [t], name))
            owner.append(i)
    passed = _run_deduplicated(programs, sandbox)
    totals, counts = np.zeros(len(completions)), np.zeros(len(completions))
    for i, ok in zip(owner, passed):
        totals[i] += ok
        counts[i] += 1
    return [None if n == 0 else float(t / n) for t, n in zip(totals, counts)]


def code_pass_reward(prompts, completions, *, prompt: Sequence[str], tests: Sequence[Sequence[str]],
                     entry_point: Sequence[str], sandbox=None, **_) -> list[float | None]:  # fmt: skip
    """1.0 when the completed program passes all of its task's assertions (one program), else 0.0; None when
    a task has no tests. The binary variant of :func:`code_tests_reward` (HumanEval's pass criterion)."""
    sandbox = sandbox or shared_sandbox()
    judged = [i for i, checks in enumerate(tests) if len(checks)]
    programs = [_test_program(prompt[i], str(completions[i]), tests[i], entry_point[i]) for i in judged]
    out: list[float | None] = [None] * len(completions)
    for i, ok in zip(judged, _run_deduplicated(programs, sandbox)):
        out[i] = float(ok)
    return out


# ---- combining -------------------------------------------------------------------------------------------
class Reward(NamedTuple):
    """A reward function with its weight and the name its metrics are logged under."""

    fn: RewardFn
    weight: float = 1.0
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or getattr(self.fn, "__name__", "reward")


def score(rewards: Sequence[Reward], prompts, completions, fields: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Weighted sum of the reward functions per completion (NaN entries skipped; NaN if every function skipped
    the item) and each function's raw values (NaN for None / a failed function)."""
    n = len(completions)
    per_fn: dict[str, np.ndarray] = {}
    for reward in rewards:
        try:
            values = reward.fn(prompts, completions, **fields)
            if len(values) != n:
                raise ValueError(f"returned {len(values)} values for {n} completions")
            arr = np.array([np.nan if v is None else float(v) for v in values], np.float64)
        except Exception as e:  # logged; the run goes on without this function
            log.warning("reward %s failed and is skipped for this batch: %s", reward.label, e)
            arr = np.full(n, np.nan)
        per_fn[reward.label] = arr
    stacked = np.stack([per_fn[r.label] * r.weight for r in rewards])
    all_nan = np.all(np.isnan(stacked), axis=0)
    total = np.where(all_nan, np.nan, np.nansum(stacked, axis=0))
    return total, per_fn
