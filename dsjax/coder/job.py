"""The code main job in miniature, like R1-Zero's: pretrain a small DeepSeek-V3-architecture model on a
synthetic code corpus (with DeepSeek-Coder's 50% fill-in-the-middle), then GRPO with the execution reward alone,
measuring held-out pass@1 (and single-line infilling) before and after. ``scripts/code_rl.py`` runs it.

The corpus and tasks are :mod:`dsjax.coder.tasks`: small functions whose bodies in the corpus are right only
some of the time; the reward is the fraction of a task's assertions that the completed function passes, run in
the sandbox. Held-out tasks never appear in the corpus or the RL prompts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from dsjax.coder.tasks import CodeTask, corpus, humaneval_fields, write_humaneval_jsonl
from dsjax.rl.grpo import GRPOConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class CodeJobConfig:
    """The job's settings (defaults: the README's recorded run)."""

    corpus_docs: int = 20_000
    accuracy: float = 0.3  # share of corpus bodies that are right
    fim_rate: float = 0.5  # DeepSeek-Coder's
    # All FIM documents in SPM layout: there the middle directly continues the prefix, so the FIM half of the
    # corpus still shows bodies right after their prompts (the PSM layout separates them by the suffix).
    fim_spm_rate: float = 1.0
    pretrain_steps: int = 500
    pretrain_overrides: tuple[str, ...] = ()
    grpo: GRPOConfig = dataclasses.field(
        default_factory=lambda: GRPOConfig(
            G=16, epsilon=0.2, beta=0.0, loss_mode="sequence-mean", max_completion_length=48, learning_rate=1e-4
        )
    )
    rl_steps: int = 60
    questions: int = 8
    eval_samples: int = 4
    seed: int = 0


def evaluate_tasks(model, tokenizer, problems, *, samples: int, temperature: float, max_new_tokens: int, seed: int,
                   sandbox) -> dict:  # fmt: skip
    """pass@1 (mean over ``samples`` completions per problem at ``temperature``), per-status counts and an
    example transcript, for problems in :mod:`dsjax.coder.tasks` form."""
    from dsjax.coder.evaluation import run_completions, sample_completions, summarize
    from dsjax.coder.humaneval import Problem as EvalProblem

    as_eval = [EvalProblem(**humaneval_fields(p, i)) for i, p in enumerate(problems)]
    completions = sample_completions(model, tokenizer, [p.prompt for p in as_eval], samples=samples,
                                     temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                                     truncate=False)  # fmt: skip
    results = run_completions(as_eval, completions, sandbox)
    summary = summarize(results, [1])
    lengths = [len(tokenizer.encode(c)) for cs in completions for c in cs]
    examples = [dict(prompt=p.prompt, completion=r.completions[0], status=r.statuses[0])
                for p, r in zip(as_eval[:6], results[:6])]  # fmt: skip
    return dict(pass1=summary["pass@1"], statuses=summary["statuses"], length=float(np.mean(lengths)),
                examples=examples)  # fmt: skip


def evaluate_infilling(model, tokenizer, problems, *, sandbox, max_new_tokens: int, mode: str) -> dict:
    """Single-line infilling on the held-out tasks, greedy: each task's body is one line, asked for as the
    middle between the prompt (prefix) and an empty suffix; the fraction of tasks whose program passes."""
    from dsjax.coder.infill import infill
    from dsjax.rl.rewards import code_pass_reward

    middles = infill(model, tokenizer, [(p.question, "") for p in problems], max_new_tokens=max_new_tokens,
                     mode=mode)  # fmt: skip
    first_lines = [m.split("\n", 1)[0] + "\n" for m in middles]
    fields = {k: [p.fields[k] for p in problems] for k in ("prompt", "tests", "entry_point")}
    passed = code_pass_reward(None, first_lines, sandbox=sandbox, **fields)
    return dict(pass1=float(np.mean(passed)), example=first_lines[0])


def run(jc: CodeJobConfig, out_dir: str, *, progress: bool = True) -> dict:
    """Pretrain, evaluate, GRPO, evaluate; writes ``results.json``, ``heldout.jsonl`` (HumanEval format),
    transcripts, plots and checkpoints under ``out_dir``."""
    import jax.numpy as jnp

    import dsjax
    from dsjax.data.tokenizer import ByteTokenizer
    from dsjax.rl.rewards import shared_sandbox
    from dsjax.rl.trainer import RLTrainConfig, train_grpo
    from dsjax.train.config import load_run_config
    from dsjax.train.loop import train

    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    task = CodeTask(seed=jc.seed)
    rng = np.random.default_rng(jc.seed)
    corpus_path = os.path.join(out_dir, "corpus.jsonl")
    with open(corpus_path, "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in corpus(task, jc.corpus_docs, rng, accuracy=jc.accuracy))
    heldout = task.problems["heldout"]
    write_humaneval_jsonl(heldout, os.path.join(out_dir, "heldout.jsonl"))

    overrides = [f"train.steps={jc.pretrain_steps}", f"data.corpus={corpus_path}", f"data.fim_rate={jc.fim_rate}",
                 f"data.fim_spm_rate={jc.fim_spm_rate}", "train.checkpoint_every=1000000",
                 *jc.pretrain_overrides]  # fmt: skip
    base_dir = os.path.join(out_dir, "base")
    run_cfg = load_run_config("configs/code_base.yaml", overrides)
    train(run_cfg, base_dir, progress=progress)
    # The policy trains in the base run's compute dtype (float32): loaded as bf16 (from_pretrained's default),
    # AdamW's small updates round away and the sampler's and trainer's log-probabilities drift apart.
    model = dsjax.from_pretrained(os.path.join(base_dir, "hf"), dtype=jnp.dtype(run_cfg.train.compute_dtype))
    tok = ByteTokenizer()
    pretrain_s = time.perf_counter() - start

    g = jc.grpo
    sandbox = shared_sandbox()  # the pool the GRPO reward runs in too
    kw = dict(samples=jc.eval_samples, temperature=g.temperature, max_new_tokens=g.max_completion_length,
              seed=jc.seed + 1, sandbox=sandbox)  # fmt: skip
    mode = "spm" if jc.fim_spm_rate >= 0.5 else "psm"  # the layout most of its FIM documents had
    infill_kw = dict(sandbox=sandbox, max_new_tokens=g.max_completion_length, mode=mode)
    base = evaluate_tasks(model, tok, heldout, **kw)
    base_infill = evaluate_infilling(model, tok, heldout, **infill_kw)
    tc = RLTrainConfig(steps=jc.rl_steps, questions=jc.questions, template="{question}", seed=jc.seed,
                       checkpoint_every=max(jc.rl_steps // 2, 1))  # fmt: skip
    model = train_grpo(model, tok, task, g, tc, os.path.join(out_dir, "rl"), progress=progress)
    after = evaluate_tasks(model, tok, heldout, **kw)
    after_infill = evaluate_infilling(model, tok, heldout, **infill_kw)
    with open(os.path.join(out_dir, "transcripts.json"), "w") as f:
        json.dump(dict(base=base["examples"], rl=after["examples"]), f, indent=2)
    results = dict(heldout_tasks=len(heldout), base_pass1=base["pass1"], rl_pass1=after["pass1"],
                   base_statuses=base["statuses"], rl_statuses=after["statuses"], base_length=base["length"],
                   rl_length=after["length"], base_infill_pass1=base_infill["pass1"],
                   rl_infill_pass1=after_infill["pass1"], improvement=after["pass1"] / max(base["pass1"], 1e-9),
                   seconds=time.perf_counter() - start, pretrain_seconds=pretrain_s,
                   config=dataclasses.asdict(jc))  # fmt: skip
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    return results
