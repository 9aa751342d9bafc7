"""R1-Zero in miniature: pretrain a small DeepSeek-V3-architecture base model on a synthetic corpus, then improve
it with GRPO and rule rewards alone (no supervised fine-tuning on answers), evaluating held-out pass@1 before and
after. ``scripts/r1_zero.py`` runs it.

The corpus is what a base model sees on the web, in miniature: worked additions whose digit-by-digit reasoning
is right, and question/answer dialogues in the ``<think>``/``<answer>`` format whose final answers are often
wrong or missing (copied from sloppy sources). The base model therefore can compute sums in its reasoning but
rarely commits to the right answer in the right place; rewarding exactly that is what RL has to discover.
Only training-split problems appear in the corpus; evaluation uses held-out problems.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time

import jax.numpy as jnp
import numpy as np

from dsjax.rl.grpo import GRPOConfig
from dsjax.rl.tasks import ArithmeticTask, Problem

TEMPLATE = "User: {question}\nAssistant:"


def worked_reasoning(a: int, b: int) -> str:
    """Digit-by-digit addition, least significant digit first: ``7+8=15\\n4+3+1=8``."""
    lines, carry, i = [], 0, 0
    da, db = str(a)[::-1], str(b)[::-1]
    while i < max(len(da), len(db)):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        terms = [str(x), str(y)] + (["1"] if carry else [])
        total = x + y + carry
        lines.append(f"{'+'.join(terms)}={total}")
        carry, i = total // 10, i + 1
    return "\n".join(lines)


def corpus(
    problems: list[Problem], rng: np.random.Generator, *, answer_accuracy: float, format_rate: float
) -> list[str]:
    """One document per problem: a worked equation (half of them) or a dialogue in the R1 format.

    Dialogues reason correctly (digit sums, then ``so <sum>``) but state the right final answer only with
    probability ``answer_accuracy``, otherwise a plausible slip (a dropped carry, an off-by-one or off-by-ten
    digit); they use the ``<think>``/``<answer>`` tags with probability ``format_rate``, else plain prose.
    """
    docs = []
    for p in problems:
        a, b = (int(x) for x in p.question.split("+"))
        reasoning, result = worked_reasoning(a, b), a + b
        if rng.random() < 0.5:
            docs.append(f"{a}+{b}:\n{reasoning}\nso {a}+{b}={result}")
            continue
        shown = result if rng.random() < answer_accuracy else _slip(a, b, rng)
        prompt = TEMPLATE.format(question=p.question)
        if rng.random() < format_rate:
            docs.append(f"{prompt} <think>\n{reasoning}\nso {result}\n</think>\n<answer>\n{shown}\n</answer>")
        else:
            docs.append(f"{prompt} {reasoning}\nso {result}\nThe answer is {shown}.")
    return docs


def _slip(a: int, b: int, rng: np.random.Generator) -> int:
    """A wrong sum of the kind people write: the carry dropped, or one digit off by one."""
    result = a + b
    no_carry = int("".join(str((int(x) + int(y)) % 10) for x, y in zip(f"{a:03d}", f"{b:03d}")))
    candidates = {no_carry, result + 1, result - 1, result + 10, result - 10} - {result}
    return int(rng.choice(sorted(candidates)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ZeroConfig:
    """The miniature's settings.

    The time budget (about 14 minutes on two CPU cores) is split between pretraining and GRPO. The base
    model's arithmetic at the rollout temperature is what GRPO starts from: after 550 pretraining steps the
    reasoning ends in the right sum in 43% of samples at temperature 1, after 800 in ~83%, while the base model's
    pass@1 stays low (14-19%: it rarely commits to the sum it reached; the corpus's answers are right 10%
    of the time, which puts it near R1-Zero's starting point, 15.6% on AIME). GRPO then learns the format
    and to commit to its sum within ~60 steps (pass@1 ~75%, the reasoning's ceiling) and, in the next 60, also
    sharpens the arithmetic itself (right sums 83% -> 91%, pass@1 89% on 512 problems). The policy trains in
    float32: one GRPO step (128 completions) costs about as much as 9 pretraining steps. Learning rate 1e-4: at
    2e-4 the reasoning degrades (60% right sums after 80 steps), at 3e-4 the format reached 98% within 10 steps
    while accuracy fell to 0 by step 20. DAPO's options: token-level loss, clip-higher, dynamic sampling (once
    the format is learnt most groups are all wrong or all right and carry no signal) and soft overlong
    punishment (the format needs at most 65 tokens; the punishment starts after 80).
    """

    digits: int = 2
    corpus_docs: int = 20_000
    answer_accuracy: float = 0.10
    format_rate: float = 0.6
    pretrain_steps: int = 800
    pretrain_overrides: tuple[str, ...] = ()
    grpo: GRPOConfig = dataclasses.field(
        default_factory=lambda: GRPOConfig.dapo(
            G=16, max_completion_length=96, overlong_buffer=16, learning_rate=1e-4, max_resample_rounds=1
        )
    )
    rl_steps: int = 120
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0
    questions: int = 8
    eval_problems: int = 512
    eval_samples: int = 4
    transcripts: int = 12
    seed: int = 0


def run(zc: ZeroConfig, out_dir: str, *, progress: bool = True, base_model: str | None = None) -> dict:
    """Pretrain, evaluate, GRPO, evaluate. Writes under ``out_dir``: ``results.json``, ``r1_zero.png`` (the R1
    paper's curves: accuracy and mean response length over the RL steps), ``transcripts_base.md`` and
    ``transcripts_rl.md`` (the same held-out problems and sampling seed before and after RL), ``base/`` (the
    pretraining run) and ``rl/`` (the GRPO run).

    ``base_model``: an HF checkpoint directory (an earlier run's ``base/hf``) to start from instead of
    pretraining, for trying RL settings on one base model; the pretraining fields of ``zc`` are then unused.

    The model is loaded in the pretraining's compute dtype (float32): GRPO's AdamW updates the weights in their
    own dtype, and in bf16 an update below ~0.4% of a weight rounds away."""
    import dsjax
    from dsjax.data.tokenizer import ByteTokenizer
    from dsjax.rl.trainer import RLTrainConfig, evaluate, train_grpo
    from dsjax.train.config import load_run_config
    from dsjax.train.loop import train
    from dsjax.train.metrics import read_jsonl

    start, cpu_start = time.perf_counter(), time.process_time()
    os.makedirs(out_dir, exist_ok=True)
    task = ArithmeticTask(digits=zc.digits, ops="+")
    rng = np.random.default_rng(zc.seed)
    docs = corpus(task.sample(zc.corpus_docs, "train", rng), rng, answer_accuracy=zc.answer_accuracy,
                  format_rate=zc.format_rate)  # fmt: skip
    corpus_path = os.path.join(out_dir, "corpus.jsonl")
    with open(corpus_path, "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)

    overrides = [f"train.steps={zc.pretrain_steps}", f"data.corpus={corpus_path}", "data.fim_rate=0.0",
                 "train.checkpoint_every=1000000", *zc.pretrain_overrides]  # fmt: skip
    run_cfg = load_run_config("configs/r1_zero_base.yaml", overrides)
    if base_model is None:
        base_dir = os.path.join(out_dir, "base")
        train(run_cfg, base_dir, progress=progress)
        base_model = os.path.join(base_dir, "hf")
    model = dsjax.from_pretrained(base_model, dtype=jnp.dtype(run_cfg.train.compute_dtype))
    tok = ByteTokenizer()
    pretrain_s = time.perf_counter() - start

    kw = dict(problems=zc.eval_problems, samples=zc.eval_samples, seed=zc.seed + 1)
    base = evaluate(model, tok, task, zc.grpo, TEMPLATE, **kw)
    write_transcripts(base, os.path.join(out_dir, "transcripts_base.md"), "Base model (before RL)", zc.transcripts)
    rl_start = time.perf_counter()
    tc = RLTrainConfig(steps=zc.rl_steps, questions=zc.questions, template=TEMPLATE, seed=zc.seed,
                       checkpoint_every=max(zc.rl_steps // 2, 1), warmup_steps=zc.warmup_steps,
                       min_lr_ratio=zc.min_lr_ratio)  # fmt: skip
    rl_dir = os.path.join(out_dir, "rl")
    model = train_grpo(model, tok, task, zc.grpo, tc, rl_dir, progress=progress)
    rl_s = time.perf_counter() - rl_start
    after = evaluate(model, tok, task, zc.grpo, TEMPLATE, **kw)
    write_transcripts(after, os.path.join(out_dir, "transcripts_rl.md"), "After GRPO", zc.transcripts)
    records = read_jsonl(os.path.join(rl_dir, "metrics.jsonl"))
    plot_r1_zero(records, base, after, os.path.join(out_dir, "r1_zero.png"))
    windows = _windows(records, max(zc.rl_steps // 5, 1))
    results = dict(base_pass1=base["pass1"], rl_pass1=after["pass1"], base_format=base["format"],
                   rl_format=after["format"], base_length=base["length"], rl_length=after["length"],
                   improvement=after["pass1"] / max(base["pass1"], 1e-9), seconds=time.perf_counter() - start,
                   cpu_seconds=time.process_time() - cpu_start, pretrain_seconds=pretrain_s, rl_seconds=rl_s,
                   train_accuracy_windows=windows["reward/accuracy"], train_format_windows=windows["reward/format"],
                   train_length_windows=windows["completion_length"],
                   base_reasoning_correct=reasoning_correct(base["transcripts"]),
                   rl_reasoning_correct=reasoning_correct(after["transcripts"]), base_example=base["example"],
                   rl_example=after["example"], config=dataclasses.asdict(zc))  # fmt: skip
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    return results


def reasoning_correct(transcripts: list[dict]) -> float:
    """Share of completions whose reasoning ends in the right sum (the last ``so N``), wherever the answer is:
    the ceiling that copying it into ``<answer>`` would reach."""
    ok = [bool(m) and m[-1] == t["answer"] for t in transcripts for m in [re.findall(r"\bso (-?\d+)", t["completion"])]]
    return float(np.mean(ok)) if ok else float("nan")


def _windows(records: list[dict], size: int) -> dict[str, list[float]]:
    """Means of the train-rollout metrics over consecutive windows of ``size`` steps (rounded)."""
    out = {}
    for key in ("reward/accuracy", "reward/format", "completion_length"):
        values = [r.get(key, float("nan")) for r in records]
        out[key] = [round(float(np.nanmean(values[i : i + size])), 4) for i in range(0, len(values), size)]
    return out


def write_transcripts(evaluation: dict, path: str, title: str, problems: int) -> None:
    """The first ``problems`` held-out problems' completions (all samples) as Markdown, marked right or wrong."""
    rows = evaluation["transcripts"]
    samples = evaluation["samples"]  # (not rows per distinct question: a random draw may repeat a problem)
    summary = (
        f"held-out pass@1 {evaluation['pass1']:.1%}, format {evaluation['format']:.1%}, mean length "
        f"{evaluation['length']:.1f} tokens; {samples} samples per problem at the rollout temperature."
    )
    lines = [f"# {title}", "", summary, ""]
    for r in rows[: problems * samples]:
        verdict = "correct" if r["accuracy"] == 1.0 else "wrong"
        lines += [f"## {r['question']} = {r['answer']}: {verdict}, format {'ok' if r['format'] else 'no'}", "",
                  "```", f"{TEMPLATE.format(question=r['question'])}{r['completion']}", "```", ""]  # fmt: skip
    with open(path, "w") as f:
        f.write("\n".join(lines))


def plot_r1_zero(records: list[dict], base: dict, after: dict, path: str) -> None:
    """R1's two curves (its Figures 2 and 3), in miniature: accuracy over the RL steps (train rollouts, and the
    held-out pass@1 before and after) and the mean response length in tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.asarray([r["step"] for r in records])
    smooth = lambda v, k=10: np.convolve(v, np.ones(k) / k, mode="valid") if len(v) >= k else np.asarray(v)
    acc = np.asarray([r.get("reward/accuracy", np.nan) for r in records])
    length = np.asarray([r["completion_length"] for r in records])
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax0.plot(steps, acc, color="C0", alpha=0.25, lw=0.8)
    ax0.plot(steps[len(steps) - len(smooth(acc)) :], smooth(acc), color="C0", label="train rollouts (10-step mean)")
    ax0.plot([0, steps[-1]], [base["pass1"], after["pass1"]], "o--", color="C3", label="held-out pass@1")
    ax0.set_ylim(0, 1)
    ax0.set_title("accuracy during RL")
    ax0.legend(loc="lower right")
    ax1.plot(steps, length, color="C2", alpha=0.25, lw=0.8)
    ax1.plot(steps[len(steps) - len(smooth(length)) :], smooth(length), color="C2")
    ax1.set_title("mean response length (tokens)")
    for ax in (ax0, ax1):
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
