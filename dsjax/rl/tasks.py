"""RL tasks: procedural problem generators with disjoint train / held-out splits, and a JSONL loader.

A task yields :class:`Problem` s (question text, reference answer, and the fields its reward functions read) and
names its rewards. Splits are decided by a stable hash of each problem, so a held-out problem never appears in
training whatever the seed or the number of problems drawn.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import NamedTuple, Protocol

import numpy as np

from dsjax.rl.rewards import (
    Reward,
    accuracy_reward,
    countdown_reward,
    format_reward,
    safe_arithmetic,
)

SPLITS = ("train", "heldout")

# R1-Zero's template (R1 Table 1). Small byte-level models use a shorter one (see scripts/r1_zero.py).
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {question}. Assistant:"
)


class Problem(NamedTuple):
    question: str
    answer: str
    fields: dict  # passed to the reward functions (always includes "answer")


class Task(Protocol):
    def sample(self, n: int, split: str, rng: np.random.Generator) -> list[Problem]: ...

    def rewards(self) -> list[Reward]: ...


def _heldout(key: str, fraction: float) -> bool:
    return zlib.crc32(key.encode()) % 10_000 < fraction * 10_000


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; choose one of {SPLITS}")


def default_rewards() -> list[Reward]:
    """R1's rule rewards: accuracy (weight 1) and format (weight 0.5). (``tag_count_reward`` is a denser format
    signal for models that rarely produce the format; with a strong weight it can crowd out accuracy: seen in the
    miniature, where format went to 100% while accuracy fell to 0 at a high learning rate.)"""
    return [Reward(accuracy_reward, 1.0, "accuracy"), Reward(format_reward, 0.5, "format")]


class ArithmeticTask:
    """``a + b`` / ``a - b`` / ``a * b`` with ``digits``-digit operands; the answer is the integer result."""

    def __init__(self, digits: int = 2, ops: str = "+-", heldout_fraction: float = 0.1):
        if digits < 1 or not ops or set(ops) - set("+-*"):
            raise ValueError(f"ArithmeticTask: digits={digits} must be >= 1 and ops={ops!r} a subset of '+-*'")
        self.digits, self.ops, self.heldout_fraction = digits, ops, heldout_fraction

    def problem(self, a: int, op: str, b: int) -> Problem:
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        return Problem(f"{a}{op}{b}", str(result), {"answer": str(result)})

    def sample(self, n: int, split: str, rng: np.random.Generator) -> list[Problem]:
        _check_split(split)
        lo, hi = 10 ** (self.digits - 1) if self.digits > 1 else 0, 10**self.digits
        out = []
        while len(out) < n:
            a, b = (int(x) for x in rng.integers(lo, hi, 2))
            op = self.ops[int(rng.integers(len(self.ops)))]
            if _heldout(f"{a}{op}{b}", self.heldout_fraction) == (split == "heldout"):
                out.append(self.problem(a, op, b))
        return out

    def rewards(self) -> list[Reward]:
        return default_rewards()


class CountdownTask:
    """Reach ``target`` with each of ``count`` numbers exactly once and ``+ - *`` (TinyZero's Countdown)."""

    def __init__(self, count: int = 3, max_number: int = 20, heldout_fraction: float = 0.1):
        if count < 2 or max_number < 2:
            raise ValueError(f"CountdownTask: count={count} and max_number={max_number} must be >= 2")
        self.count, self.max_number, self.heldout_fraction = count, max_number, heldout_fraction

    def sample(self, n: int, split: str, rng: np.random.Generator) -> list[Problem]:
        _check_split(split)
        out = []
        while len(out) < n:
            nums = [int(x) for x in rng.integers(1, self.max_number + 1, self.count)]
            expr = str(nums[0])
            for x in nums[1:]:
                expr = f"({expr}{'+-*'[int(rng.integers(3))]}{x})"
            target = int(safe_arithmetic(expr)[0])
            key = f"{sorted(nums)}={target}"
            if target > 0 and _heldout(key, self.heldout_fraction) == (split == "heldout"):
                question = f"Using the numbers {nums}, create an equation that equals {target}"
                out.append(Problem(question, expr, {"answer": expr, "numbers": nums, "target": target}))
        return out

    def rewards(self) -> list[Reward]:
        return [Reward(countdown_reward, 1.0, "accuracy"), Reward(format_reward, 0.5, "format")]


class JsonlTask:
    """Problems from a JSONL file (one object per line, e.g. GSM8K), split by a hash of the question.

    GSM8K-style answers (``reasoning ... #### 72``) are reduced to the text after the last ``####``.
    """

    def __init__(self, path: str | os.PathLike, *, question_key: str = "question", answer_key: str = "answer",
                 heldout_fraction: float = 0.1):  # fmt: skip
        self.problems = load_jsonl(path, question_key=question_key, answer_key=answer_key)
        self.heldout_fraction = heldout_fraction
        self._by_split = {s: [p for p in self.problems if _heldout(p.question, heldout_fraction) == (s == "heldout")]
                          for s in SPLITS}  # fmt: skip

    def sample(self, n: int, split: str, rng: np.random.Generator) -> list[Problem]:
        _check_split(split)
        pool = self._by_split[split]
        if not pool:
            raise ValueError(f"the {split} split of this JSONL task is empty ({len(self.problems)} problems)")
        return [pool[int(i)] for i in rng.integers(len(pool), size=n)]

    def rewards(self) -> list[Reward]:
        return default_rewards()


def load_jsonl(path, *, question_key: str = "question", answer_key: str = "answer") -> list[Problem]:
    """Read problems; raises ValueError naming the line for bad JSON or missing keys."""
    problems = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e})") from None
            if not isinstance(row, dict) or question_key not in row or answer_key not in row:
                raise ValueError(f"{path}:{number}: needs the keys {question_key!r} and {answer_key!r}")
            answer = str(row[answer_key])
            if "####" in answer:
                answer = answer.rsplit("####", 1)[1].strip()
            fields = {k: v for k, v in row.items() if k not in (question_key, answer_key)}
            problems.append(Problem(str(row[question_key]), answer, {**fields, "answer": answer}))
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems
