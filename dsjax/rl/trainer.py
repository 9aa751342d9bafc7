"""The GRPO loop: sample questions, roll out G completions each with the KV-cache engine, score them with rule
rewards, and update the policy ``mu`` times per rollout; metrics, plots, checkpoints and exact resume.

Question sampling depends only on (seed, step) and rollouts on (seed, step) too, so a resumed run continues
exactly as the uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dsjax.checkpoint.hf import save_pretrained
from dsjax.data.tokenizer import Tokenizer
from dsjax.infer.engine import generate
from dsjax.rl.grpo import GRPOConfig, group_advantages
from dsjax.rl.rewards import format_reward, score
from dsjax.rl.step import build_batch, make_grpo_step, make_logprob_fn
from dsjax.rl.tasks import Problem, Task
from dsjax.train.checkpoint import TrainCheckpointer
from dsjax.train.metrics import MetricsLog, read_jsonl
from dsjax.train.optim import decay_mask
from dsjax.train.preemption import Preempted, StopGuard
from dsjax.train.step import init_train_state


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLTrainConfig:
    """Loop settings around :class:`GRPOConfig`.

    Attributes:
      steps: rollout + update rounds. questions: questions per round (each gets ``G`` completions).
      template: prompt text with ``{question}``. seed: sampling seed (questions and completions).
      weight_decay, grad_clip, b1, b2: AdamW (constant learning rate ``GRPOConfig.learning_rate``).
      log_every, checkpoint_every, keep_checkpoints: outputs.
      max_runtime_s: stop cleanly (checkpoint, then :class:`~dsjax.train.preemption.Preempted`) after the first
        round that ends this many seconds after the start; 0 = no limit. A SIGTERM does the same.
    """

    steps: int = 100
    questions: int = 8
    template: str = "{question}"
    seed: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.99
    log_every: int = 1
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    max_runtime_s: float = 0.0

    def __post_init__(self):
        if self.max_runtime_s < 0:
            raise ValueError(f"max_runtime_s must be >= 0 (0 = no limit), got {self.max_runtime_s}")


class Rollout(NamedTuple):
    prompts: list[list[int]]  # one per completion (each question's prompt repeated G times)
    completions: list[list[int]]  # generated ids, stop token included when the row stopped
    logprobs: list[list[float]]  # the sampler's log-probability of each generated id
    texts: list[str]  # decoded completions without the stop token
    fields: dict  # reward fields, one entry per completion


def encode_question(tokenizer: Tokenizer, template: str, question: str) -> list[int]:
    return [tokenizer.bos_id, *tokenizer.encode(template.format(question=question))]


def rollout(model, tokenizer: Tokenizer, problems: list[Problem], cfg: GRPOConfig, template: str, seed: int,
            samples: int | None = None) -> Rollout:  # fmt: skip
    """``samples`` (default ``G``) completions per problem at ``cfg.temperature``, batched on the KV cache."""
    g = cfg.G if samples is None else samples
    prompts = [encode_question(tokenizer, template, p.question) for p in problems for _ in range(g)]
    result = generate(model, prompts, max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                      seed=seed, stop_tokens=[tokenizer.eos_id], return_result=True)  # fmt: skip
    outs = result.tokens
    texts = [tokenizer.decode(o[:-1] if o and o[-1] == tokenizer.eos_id else o) for o in outs]
    fields = {k: [p.fields[k] for p in problems for _ in range(g)] for k in problems[0].fields}
    return Rollout(prompts, outs, result.logprobs, texts, fields)


def evaluate(model, tokenizer, task: Task, cfg: GRPOConfig, template: str, *, problems: int = 64,
             samples: int = 4, seed: int = 1234) -> dict:  # fmt: skip
    """Held-out pass@1 (mean accuracy of ``samples`` completions per problem at the rollout temperature) and
    format rate."""
    probs = task.sample(problems, "heldout", np.random.default_rng(seed))
    r = rollout(model, tokenizer, probs, cfg, template, seed, samples=samples)
    accuracy = task.rewards()[0]
    acc = np.asarray([np.nan if v is None else v for v in accuracy.fn(r.prompts, r.texts, **r.fields)], float)
    fmt = np.asarray(format_reward(r.prompts, r.texts), float)
    lengths = [len(c) for c in r.completions]
    return dict(pass1=float(np.nanmean(acc)), format=float(fmt.mean()), length=float(np.mean(lengths)),
                example=r.texts[0])  # fmt: skip


def _optimizer(tc: RLTrainConfig, cfg: GRPOConfig, params) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(cfg.learning_rate, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mask=decay_mask(params)),
    )


def train_grpo(model, tokenizer: Tokenizer, task: Task, cfg: GRPOConfig, tc: RLTrainConfig, out_dir: str, *,
               resume: bool = True, progress: bool = True):  # fmt: skip
    """Run GRPO on ``model`` (updated in place at the end) and write ``metrics.jsonl``, TensorBoard logs,
    ``rl.png``, checkpoints and the final weights (``out_dir/hf``). Returns the final model.

    Raises:
      Preempted: a SIGTERM or ``tc.max_runtime_s`` stopped the run after a round, which is checkpointed; calling
        this again (``resume=True``) continues exactly from it.
    """
    from tqdm import tqdm

    started = time.monotonic()
    os.makedirs(out_dir, exist_ok=True)
    rewards = task.rewards()
    tx = _optimizer(tc, cfg, nnx.state(model, nnx.Param))
    graphdef, state = init_train_state(model, tx)
    ref_params = jax.tree.map(jnp.copy, state.params) if cfg.beta > 0 else None  # frozen reference policy
    logprob = make_logprob_fn(graphdef)
    num_seqs = tc.questions * cfg.G
    step_fn = make_grpo_step(graphdef, cfg, tx, num_seqs)
    ckpt = TrainCheckpointer(os.path.join(out_dir, "checkpoints"), keep=tc.keep_checkpoints,
                             every=tc.checkpoint_every)  # fmt: skip
    start = 0
    if resume and ckpt.latest_step() is not None:
        state, extra = ckpt.restore(state)
        start = int(extra["round"])
        if ref_params is not None:
            ref_params = _load_reference(ref_params, out_dir)
    elif ref_params is not None:
        _save_reference(ref_params, out_dir)
    log = MetricsLog(out_dir, resume_step=start)
    row_len, stopped = None, None
    bar = tqdm(total=tc.steps, initial=start, disable=not progress, dynamic_ncols=True, unit="step")
    with StopGuard(max_runtime_s=tc.max_runtime_s, start_time=started) as guard:
        guard.start(start)
        try:
            for rnd in range(start, tc.steps):
                t0 = time.perf_counter()
                problems = task.sample(tc.questions, "train", np.random.default_rng([tc.seed, rnd]))
                policy = nnx.merge(graphdef, state.params, state.rest)
                r = rollout(policy, tokenizer, problems, cfg, tc.template, seed=tc.seed * 1_000_003 + rnd)
                t1 = time.perf_counter()
                total, per_fn = score(rewards, r.prompts, r.texts, r.fields)
                adv = group_advantages(jnp.asarray(total), cfg.G, scale=cfg.scale_rewards)
                if row_len is None:  # fixed: room for two of the longest possible sequences, a multiple of 64
                    row_len = -(-2 * (max(map(len, r.prompts)) + cfg.max_completion_length) // 64) * 64
                batch = build_batch(r.prompts, r.completions, row_len=row_len, completion_logprobs=r.logprobs)
                batch["advantages"] = adv
                if cfg.mu > 1:  # several iterations: the rollout policy's log-probs stay fixed across them
                    batch["old_logp"] = logprob(state.params, state.rest, batch)
                if ref_params is not None:
                    batch["ref_logp"] = logprob(ref_params, state.rest, batch)
                for _ in range(cfg.mu):
                    state, metrics = step_fn(state, batch)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                groups = total.reshape(-1, cfg.G)
                record = dict(step=rnd + 1, reward=float(np.nanmean(total)), reward_std=float(np.nanstd(total)),
                              frac_reward_zero_std=float(np.mean(np.nanstd(groups, axis=1) == 0)),
                              completion_length=float(np.mean([len(c) for c in r.completions])),
                              rollout_s=t1 - t0, step_s=time.perf_counter() - t0, **metrics)  # fmt: skip
                for name, values in per_fn.items():
                    record[f"reward/{name}"] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
                    record[f"reward/{name}_std"] = float(np.nanstd(values)) if np.isfinite(values).any() else 0.0
                stop = guard.check(rnd + 1)  # after every round, as the sync service requires
                stopped = stop if rnd + 1 < tc.steps else None
                if (rnd + 1) % tc.log_every == 0 or rnd + 1 == tc.steps or stopped:
                    log.write(record)
                bar.set_postfix(reward=f"{record['reward']:.2f}", acc=f"{record.get('reward/accuracy', 0):.2f}")
                bar.update(1)
                ckpt.save(rnd + 1, state, {"round": rnd + 1}, force=rnd + 1 == tc.steps or stopped is not None)
                if stopped is not None:
                    break
        except BaseException:
            try:  # the original error matters, not one from waiting for a save
                ckpt.close()
            except Exception as e:
                logging.getLogger(__name__).warning("while stopping after an error: %s", e)
            raise
        else:
            ckpt.close()  # waits for the last save: raises if it failed
        finally:
            bar.close()
            log.close()
    if stopped is not None:
        raise Preempted(rnd + 1, stopped, ckpt.directory)
    plot_rl(read_jsonl(log.path), out_dir)
    final = nnx.merge(graphdef, state.params, state.rest)
    save_pretrained(final, os.path.join(out_dir, "hf"))
    return final


def _save_reference(ref_params, out_dir: str) -> None:
    # The reference is the starting policy; keep it next to the checkpoints so a resumed run uses the same one.
    flat = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(ref_params)}
    np.savez(os.path.join(out_dir, "reference.npz"), **flat)


def _load_reference(ref_params, out_dir: str):
    path = os.path.join(out_dir, "reference.npz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: cannot resume a beta > 0 run without its reference policy")
    data = np.load(path)
    flat = nnx.to_flat_state(ref_params)
    for k, v in flat:
        v.set_value(jnp.asarray(data["/".join(map(str, k))]))
    return ref_params


def plot_rl(records: list[dict], out_dir: str) -> str | None:
    """``rl.png``: reward, accuracy and format reward, and completion length over the steps."""
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key in ("reward", "reward/accuracy", "reward/format"):
        if key in records[0]:
            axes[0 if key == "reward" else 1].plot(steps, [r[key] for r in records], label=key)
    axes[2].plot(steps, [r["completion_length"] for r in records])
    for ax, title in zip(axes, ("total reward", "accuracy / format (train rollouts)", "completion length (tokens)")):
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    axes[1].legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "rl.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
