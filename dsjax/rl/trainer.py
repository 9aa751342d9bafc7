"""The GRPO loop: sample questions, roll out G completions each with the KV-cache engine, score them with rule
rewards, and update the policy ``mu`` times per rollout; metrics, plots, checkpoints and exact resume.

Question sampling and rollouts depend only on (seed, round, attempt), so a resumed run continues exactly as the
uninterrupted one would. With ``GRPOConfig.dynamic_sampling`` (DAPO) a round keeps drawing further prompts
(``attempt`` 1, 2, ...: one batched ``generate`` call each) until it holds ``questions`` groups whose rewards
differ, and trains on those alone: a group of equal rewards has zero advantage and would only dilute the loss.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dsjax.checkpoint.hf import save_pretrained
from dsjax.data.tokenizer import Tokenizer
from dsjax.infer.engine import generate
from dsjax.rl.grpo import GRPOConfig, group_advantages, overlong_penalty
from dsjax.rl.rewards import Reward, format_reward, score
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
      weight_decay, grad_clip, b1, b2: AdamW (peak learning rate ``GRPOConfig.learning_rate``).
      warmup_steps, min_lr_ratio: the learning rate rises linearly from 0 over ``warmup_steps`` rounds, then
        follows a cosine from the peak down to ``peak * min_lr_ratio`` at round ``steps``; the defaults (0, 1.0)
        keep it constant, as R1 and DAPO do.
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
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0

    def __post_init__(self):
        if self.max_runtime_s < 0:
            raise ValueError(f"max_runtime_s must be >= 0 (0 = no limit), got {self.max_runtime_s}")
        if not 0 <= self.warmup_steps < max(self.steps, 1) or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps}) and "
                             f"min_lr_ratio={self.min_lr_ratio} in [0, 1]")  # fmt: skip

    def learning_rate(self, peak: float, updates_per_step: int = 1) -> float | optax.Schedule:
        """``peak`` itself when constant, else the warmup + cosine schedule over the rounds, in optimizer
        updates (``updates_per_step``: GRPO's ``mu``)."""
        if self.warmup_steps == 0 and self.min_lr_ratio == 1.0:
            return peak
        u = updates_per_step
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak,
            warmup_steps=self.warmup_steps * u,
            decay_steps=self.steps * u,
            end_value=peak * self.min_lr_ratio,
        )


class Rollout(NamedTuple):
    prompts: list[list[int]]  # one per completion (each question's prompt repeated G times)
    completions: list[list[int]]  # generated ids, stop token included when the row stopped
    logprobs: list[list[float]]  # the sampler's log-probability of each generated id
    texts: list[str]  # decoded completions without the stop token
    fields: dict  # reward fields, one entry per completion


def concat_rollouts(parts: list[Rollout]) -> Rollout:
    """One rollout from several (in order)."""
    fields = {k: [v for p in parts for v in p.fields[k]] for k in parts[0].fields}
    return Rollout(*([x for p in parts for x in getattr(p, name)] for name in Rollout._fields[:4]), fields)


def select_groups(r: Rollout, groups: list[int], G: int) -> Rollout:
    """The completions of the given groups (consecutive runs of ``G``), in the given order."""
    idx = [g * G + i for g in groups for i in range(G)]
    pick = lambda xs: [xs[i] for i in idx]
    return Rollout(pick(r.prompts), pick(r.completions), pick(r.logprobs), pick(r.texts),
                   {k: pick(v) for k, v in r.fields.items()})  # fmt: skip


def informative_groups(total: np.ndarray, G: int) -> np.ndarray:
    """Per group of ``G``: do its (non-NaN) rewards differ? Groups that do not have zero advantage."""
    groups = np.asarray(total, np.float64).reshape(-1, G)
    valid = ~np.isnan(groups)
    hi = np.where(valid, groups, -np.inf).max(axis=1)
    lo = np.where(valid, groups, np.inf).min(axis=1)
    return (valid.sum(axis=1) >= 2) & (hi > lo)


class Sampled(NamedTuple):
    """One generate call's scored rollout: ``total`` rewards and each function's (see :func:`score`)."""

    rollout: Rollout
    total: np.ndarray
    per_fn: dict[str, np.ndarray]


def sample_informative(sample: Callable[[int, int], Sampled], *, G: int, questions: int, dynamic: bool,
                       max_rounds: int, batch_multiple: int = 1) -> tuple[Sampled, Sampled, dict]:  # fmt: skip
    """DAPO's dynamic sampling, independent of the model: ``sample(attempt, n)`` rolls out ``n`` prompts (drawn
    from ``attempt``'s own stream) with ``G`` completions each in one batched call.

    Attempt 0 draws ``questions`` prompts. Without ``dynamic`` its groups are trained on as they are. With it,
    only groups whose rewards differ are kept, and while fewer than ``questions`` are kept, up to ``max_rounds``
    further attempts each draw enough prompts for the missing groups at the round's observed informative rate
    (at least half of ``questions``, at most 4 times it, rounded up to fill the engine's power-of-two batch in
    rows that are multiples of ``batch_multiple``); the first ``questions`` informative groups are trained on. A
    round that ends with fewer trains on those (a warning is logged).

    Returns:
      ``(first, train, stats)``: attempt 0's rollout (an unbiased sample of the policy, for the reward metrics),
      the groups to train on, and ``ds_*`` statistics (generate calls, groups sampled / kept, informative rate).

    Raises:
      RuntimeError: ``dynamic`` and no group with a reward spread in any attempt.
    """
    first = sample(0, questions)
    if not dynamic:
        return first, first, {}
    parts, keep = [first], informative_groups(first.total, G)
    sampled, kept = len(keep), int(keep.sum())
    attempt = 0
    while kept < questions and attempt < max_rounds:
        attempt += 1
        rate = max(kept, 1) / sampled  # optimistic when nothing was informative yet: the bound caps the cost
        # At least half a round's prompts: fewer distinct batch sizes, so fewer compiled decode variants.
        n = int(min(max(-(-(questions - kept) // rate), -(-questions // 2)), 4 * questions))
        rows = 1 << (n * G - 1).bit_length()  # the engine pads the batch to a power of two: fill it
        n = max(n, (-(-rows // batch_multiple) * batch_multiple) // G)
        part = sample(attempt, n)
        parts.append(part)
        flags = informative_groups(part.total, G)
        keep = np.concatenate([keep, flags])
        sampled, kept = sampled + len(flags), kept + int(flags.sum())
    if kept == 0:
        raise RuntimeError(
            f"dynamic sampling found no group whose rewards differ in {attempt + 1} generate calls ({sampled} "
            f"groups of {G}): every completion of a group got the same reward. The task is too hard or too easy "
            "for the policy, or a reward function is constant; raise max_resample_rounds or check the rewards."
        )
    if kept < questions:
        logging.getLogger(__name__).warning("dynamic sampling: %d of %d informative groups after %d generate calls",
                                            kept, questions, attempt + 1)  # fmt: skip
    chosen = [int(i) for i in np.flatnonzero(keep)[:questions]]
    whole = concat_rollouts([p.rollout for p in parts])
    total = np.concatenate([p.total for p in parts])
    per_fn = {k: np.concatenate([p.per_fn[k] for p in parts]) for k in first.per_fn}
    idx = np.asarray([g * G + i for g in chosen for i in range(G)])
    train = Sampled(select_groups(whole, chosen, G), total[idx], {k: v[idx] for k, v in per_fn.items()})
    stats = dict(ds_generate_calls=attempt + 1, ds_groups_sampled=sampled, ds_groups_informative=kept,
                 ds_groups_trained=len(chosen), ds_informative_frac=kept / sampled)  # fmt: skip
    return first, train, stats


def score_rollout(rewards: list[Reward], r: Rollout, cfg: GRPOConfig) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Total reward per completion and each function's values (:func:`~dsjax.rl.rewards.score`), plus DAPO's soft
    overlong punishment on the generated token counts (stop token included) when ``cfg.overlong_buffer`` is set,
    reported as its own column ``overlong``."""
    total, per_fn = score(rewards, r.prompts, r.texts, r.fields)
    if cfg.overlong_buffer:
        penalty = overlong_penalty([len(c) for c in r.completions], cfg)
        per_fn["overlong"] = penalty
        total = total + penalty  # a NaN total (every function skipped the item) stays NaN
    return total, per_fn


def sampling_seeds(seed: int, rnd: int, attempt: int) -> tuple[np.random.Generator, int]:
    """The prompt generator and the rollout seed of ``(seed, round, attempt)``; attempt 0 keeps the streams of
    runs without dynamic sampling."""
    if attempt == 0:
        return np.random.default_rng([seed, rnd]), seed * 1_000_003 + rnd
    ss = np.random.SeedSequence([seed, rnd, attempt])
    return np.random.default_rng(ss), int(ss.generate_state(1, np.uint32)[0] >> 1)  # a non-negative int32


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
    """Held-out pass@1 (mean accuracy of ``samples`` completions per problem at the rollout temperature), format
    rate and mean completion length over ``problems`` drawn at random from the held-out split (a draw may repeat
    a problem); ``transcripts`` lists every completion (question, reference answer, text, accuracy, format),
    problem by problem, for reading what the model writes."""
    probs = task.sample(problems, "heldout", np.random.default_rng(seed))
    r = rollout(model, tokenizer, probs, cfg, template, seed, samples=samples)
    accuracy = task.rewards()[0]
    acc = np.asarray([np.nan if v is None else v for v in accuracy.fn(r.prompts, r.texts, **r.fields)], float)
    fmt = np.asarray(format_reward(r.prompts, r.texts), float)
    lengths = [len(c) for c in r.completions]
    questions = [p.question for p in probs for _ in range(samples)]
    answers = [p.answer for p in probs for _ in range(samples)]
    transcripts = [dict(question=q, answer=a, completion=t, accuracy=float(x), format=float(f))
                   for q, a, t, x, f in zip(questions, answers, r.texts, acc, fmt)]  # fmt: skip
    return dict(pass1=float(np.nanmean(acc)), format=float(fmt.mean()), length=float(np.mean(lengths)),
                example=r.texts[0], transcripts=transcripts, samples=samples)  # fmt: skip


def _optimizer(tc: RLTrainConfig, cfg: GRPOConfig, params) -> optax.GradientTransformation:
    """``optax.adamw`` as its three parts, the moments as one flat vector (``optax.flatten``): the loop's state
    lives on one device, and one fused update of every weight costs less than one small update per leaf (the
    same arithmetic, element for element; 3.6 ms vs 15 ms for bench grpo's tiny model, the optimizer alone)."""
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.flatten(optax.scale_by_adam(b1=tc.b1, b2=tc.b2)),
        optax.add_decayed_weights(tc.weight_decay, decay_mask(params)),
        optax.scale_by_learning_rate(tc.learning_rate(cfg.learning_rate, cfg.mu)),
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
    # The trained policy is the sampling one, softmax(logits / T): old, reference and current log-probs alike.
    num_seqs = tc.questions * cfg.G
    # The head only at completion targets: a round's rollouts hold at most this many (prompts and packing
    # padding skip the largest matmul of a small model).
    head = dict(temperature=cfg.temperature, completion_tokens=num_seqs * cfg.max_completion_length)
    logprob = make_logprob_fn(graphdef, **head)
    step_fn = make_grpo_step(graphdef, cfg, tx, num_seqs, **head)
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
                policy = nnx.merge(graphdef, state.params, state.rest)

                def sample(attempt: int, n: int, rnd=rnd, policy=policy) -> Sampled:
                    rng, seed = sampling_seeds(tc.seed, rnd, attempt)
                    r = rollout(policy, tokenizer, task.sample(n, "train", rng), cfg, tc.template, seed=seed)
                    return Sampled(r, *score_rollout(rewards, r, cfg))

                first, train, ds_stats = sample_informative(sample, G=cfg.G, questions=tc.questions,
                                                            dynamic=cfg.dynamic_sampling,
                                                            max_rounds=cfg.max_resample_rounds)  # fmt: skip
                r, total = train.rollout, train.total
                t1 = time.perf_counter()
                adv = group_advantages(jnp.asarray(total), cfg.G, scale=cfg.scale_rewards)
                if len(total) < num_seqs:  # a short dynamic-sampling round: the missing completions are absent
                    adv = jnp.pad(adv, (0, num_seqs - len(total)))
                # Rows fit the longest possible sequence (shorter ones share rows, first fit), a multiple of 16;
                # they grow only if a prompt is longer. Longer rows would pack more, but attention within a row
                # is quadratic in its length: at bench grpo's shapes rows of 2 sequences cost 1.6x rows of 1.
                need = -(-(max(map(len, r.prompts)) + cfg.max_completion_length) // 16) * 16
                row_len = need if row_len is None else max(row_len, need)
                batch = build_batch(r.prompts, r.completions, row_len=row_len, completion_logprobs=r.logprobs)
                batch["advantages"] = adv
                if cfg.mu > 1:  # several iterations: the rollout policy's log-probs stay fixed across them
                    batch["old_logp"] = logprob(state.params, state.rest, batch)
                if ref_params is not None:
                    batch["ref_logp"] = logprob(ref_params, state.rest, batch)
                for _ in range(cfg.mu):
                    state, metrics = step_fn(state, batch)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                # Reward statistics describe the policy: attempt 0's prompts, before any informative-group filter.
                first_total = first.total
                record = dict(step=rnd + 1, reward=float(np.nanmean(first_total)),
                              reward_std=float(np.nanstd(first_total)),
                              frac_reward_zero_std=float(np.mean(~informative_groups(first_total, cfg.G))),
                              completion_length=float(np.mean([len(c) for c in first.rollout.completions])),
                              reward_trained=float(np.nanmean(total)), rollout_s=t1 - t0,
                              step_s=time.perf_counter() - t0, **ds_stats, **metrics)  # fmt: skip
                for name, values in first.per_fn.items():
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
