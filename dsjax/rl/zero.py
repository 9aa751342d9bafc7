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
import time

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
    """The miniature's settings (defaults: the README's recorded run)."""

    digits: int = 2
    corpus_docs: int = 20_000
    answer_accuracy: float = 0.15
    format_rate: float = 0.6
    pretrain_steps: int = 550
    pretrain_overrides: tuple[str, ...] = ()
    grpo: GRPOConfig = dataclasses.field(
        default_factory=lambda: GRPOConfig(
            G=16, epsilon=0.2, beta=0.0, loss_mode="sequence-mean", max_completion_length=96, learning_rate=1e-4
        )
    )
    rl_steps: int = 100
    questions: int = 8
    eval_problems: int = 128
    eval_samples: int = 4
    seed: int = 0


def run(zc: ZeroConfig, out_dir: str, *, progress: bool = True) -> dict:
    """Pretrain, evaluate, GRPO, evaluate; writes ``results.json``, plots and checkpoints under ``out_dir``."""
    import dsjax
    from dsjax.data.tokenizer import ByteTokenizer
    from dsjax.rl.trainer import RLTrainConfig, evaluate, train_grpo
    from dsjax.train.config import load_run_config
    from dsjax.train.loop import train

    start = time.perf_counter()
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
    base_dir = os.path.join(out_dir, "base")
    train(run_cfg, base_dir, progress=progress)
    model = dsjax.from_pretrained(os.path.join(base_dir, "hf"))
    tok = ByteTokenizer()
    pretrain_s = time.perf_counter() - start

    kw = dict(problems=zc.eval_problems, samples=zc.eval_samples, seed=zc.seed + 1)
    base = evaluate(model, tok, task, zc.grpo, TEMPLATE, **kw)
    tc = RLTrainConfig(steps=zc.rl_steps, questions=zc.questions, template=TEMPLATE, seed=zc.seed,
                       checkpoint_every=max(zc.rl_steps // 2, 1))  # fmt: skip
    model = train_grpo(model, tok, task, zc.grpo, tc, os.path.join(out_dir, "rl"), progress=progress)
    after = evaluate(model, tok, task, zc.grpo, TEMPLATE, **kw)
    results = dict(base_pass1=base["pass1"], rl_pass1=after["pass1"], base_format=base["format"],
                   rl_format=after["format"], base_length=base["length"], rl_length=after["length"],
                   improvement=after["pass1"] / max(base["pass1"], 1e-9), seconds=time.perf_counter() - start,
                   pretrain_seconds=pretrain_s, base_example=base["example"], rl_example=after["example"],
                   config=dataclasses.asdict(zc))  # fmt: skip
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    return results
