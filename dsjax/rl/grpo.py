"""GRPO (DeepSeekMath §4.1, R1 Eq. 1-3) as pure functions: advantages, the clipped objective with the k3 KL
estimator, and the three loss aggregations.

Token arrays are ``[rows, T]`` and may pack several sequences per row: ``seq_bt`` gives each completion token its
sequence index (``-1`` for prompt tokens and padding), so one code path serves packed and unpacked batches and
aggregates per sequence exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

LossMode = Literal["sequence-mean", "token-mean", "dr_grpo"]
LOSS_MODES = ("sequence-mean", "token-mean", "dr_grpo")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    """GRPO's hyperparameters, named after the papers' symbols; defaults are DeepSeek-R1-Zero's (R1 §2.2.1).

    Attributes:
      G: completions sampled per question (the group).
      epsilon: clip range of the ratio, below 1 (``1 - epsilon``); R1-Zero used 10.
      epsilon_high: clip range above 1 (``1 + epsilon_high``); None = ``epsilon`` (DAPO's clip-higher: 0.28).
      beta: weight of the k3 KL penalty to the frozen reference policy (R1-Zero 0.001; 0 skips the reference).
      mu: optimisation iterations per rollout batch (old log-probs fixed across them).
      loss_mode: ``sequence-mean`` (mean over each completion's tokens, then over completions; DeepSeekMath/R1),
        ``token-mean`` (over all completion tokens of the batch; DAPO) or ``dr_grpo`` (sum / (completions x
        max_completion_length); Dr. GRPO).
      scale_rewards: divide the group-centred rewards by the group's std (Dr. GRPO turns this off).
      temperature: rollout sampling temperature.
      max_completion_length: tokens generated per completion at most.
      learning_rate: policy learning rate (R1-Zero: 3e-6; tiny models want far more).
      log_ratio_clamp: log-ratios are clamped to this magnitude before exponentiating (avoids inf on outliers).
    """

    G: int = 16
    epsilon: float = 10.0
    epsilon_high: float | None = None
    beta: float = 0.001
    mu: int = 1
    loss_mode: LossMode = "sequence-mean"
    scale_rewards: bool = True
    temperature: float = 1.0
    max_completion_length: int = 1024
    learning_rate: float = 3e-6
    log_ratio_clamp: float = 20.0

    def __post_init__(self):
        checks = [
            (self.G >= 2, f"G={self.G}: a group needs at least 2 completions"),
            (self.epsilon > 0, f"epsilon={self.epsilon} must be > 0"),
            (self.epsilon_high is None or self.epsilon_high > 0, f"epsilon_high={self.epsilon_high} must be > 0"),
            (self.beta >= 0, f"beta={self.beta} must be >= 0"),
            (self.mu >= 1, f"mu={self.mu} must be >= 1"),
            (self.loss_mode in LOSS_MODES, f"loss_mode={self.loss_mode!r}; choose one of {LOSS_MODES}"),
            (self.temperature > 0, f"temperature={self.temperature} must be > 0 for sampling"),
            (self.max_completion_length >= 1, f"max_completion_length={self.max_completion_length} must be >= 1"),
            (self.learning_rate > 0, f"learning_rate={self.learning_rate} must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"GRPOConfig: {message}")

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def group_advantages(rewards_n: jax.Array, G: int, *, scale: bool = True, eps: float = 1e-4) -> jax.Array:
    """``A_i = (r_i - mean(r)) / (std(r) + eps)`` within each consecutive group of ``G`` (outcome supervision).

    NaN rewards (a reward function skipped the item) are left out of their group's statistics and get
    advantage 0; so does every member of a group whose rewards are all equal (no learning signal).
    """
    r = rewards_n.astype(jnp.float32).reshape(-1, G)
    valid = ~jnp.isnan(r)
    n = jnp.maximum(valid.sum(-1, keepdims=True), 1)
    r0 = jnp.where(valid, r, 0.0)
    mean = r0.sum(-1, keepdims=True) / n
    centred = jnp.where(valid, r - mean, 0.0)
    if scale:
        std = jnp.sqrt((centred**2).sum(-1, keepdims=True) / n)
        centred = centred / (std + eps)
    return centred.reshape(-1)


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Per-token k3 estimator of KL(pi_theta || pi_ref): ``exp(ref - logp) - (ref - logp) - 1`` (>= 0, unbiased)."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def per_token_objective(logp, old_logp, ref_logp, adv_bt, cfg: GRPOConfig, log_ratio_clamp: float | None = None):
    """Per-token loss ``-min(rho A, clip(rho, 1 - eps, 1 + eps_high) A) + beta * KL`` and the clip indicator.

    ``ref_logp`` may be None when ``beta == 0``.
    """
    clamp = cfg.log_ratio_clamp if log_ratio_clamp is None else log_ratio_clamp
    ratio = jnp.exp(jnp.clip(logp - old_logp, -clamp, clamp))
    clipped_ratio = jnp.clip(ratio, 1.0 - cfg.epsilon, 1.0 + cfg.clip_high)
    surrogate = jnp.minimum(ratio * adv_bt, clipped_ratio * adv_bt)
    loss = -surrogate
    kl = jnp.zeros_like(logp)
    if cfg.beta > 0:
        kl = k3_kl(logp, ref_logp)
        loss = loss + cfg.beta * kl
    clipped = (ratio * adv_bt) != surrogate  # the clipped branch was taken (the gradient is cut)
    return loss, kl, clipped


def aggregate(values_bt: jax.Array, seq_bt: jax.Array, num_seqs: int, mode: str, max_len: int) -> jax.Array:
    """Reduce per-token values over completion tokens (``seq_bt >= 0``) by ``mode`` (see :class:`GRPOConfig`).

    ``num_seqs`` (static) is the number of completions in the batch; sequences with no token count as absent.
    """
    mask = seq_bt >= 0
    v = jnp.where(mask, values_bt.astype(jnp.float32), 0.0)
    if mode == "token-mean":
        return v.sum() / jnp.maximum(mask.sum(), 1)
    if mode == "dr_grpo":
        return v.sum() / (num_seqs * max_len)
    if mode != "sequence-mean":
        raise ValueError(f"loss_mode={mode!r}; choose one of {LOSS_MODES}")
    ids = jnp.where(mask, seq_bt, num_seqs).reshape(-1)  # padding goes to an extra bucket, dropped below
    sums = jax.ops.segment_sum(v.reshape(-1), ids, num_segments=num_seqs + 1)[:num_seqs]
    counts = jax.ops.segment_sum(mask.reshape(-1).astype(jnp.float32), ids, num_segments=num_seqs + 1)[:num_seqs]
    present = counts > 0
    return jnp.sum(jnp.where(present, sums / jnp.maximum(counts, 1), 0.0)) / jnp.maximum(present.sum(), 1)


def grpo_loss(logp_bt, old_logp_bt, ref_logp_bt, seq_bt, advantages_n, cfg: GRPOConfig, num_seqs: int):
    """The GRPO loss of a (possibly packed) batch and its metrics.

    Args:
      logp_bt: log-probs of the taken tokens under the current policy (differentiable).
      old_logp_bt: the same under the rollout policy (constant across the ``mu`` iterations).
      ref_logp_bt: under the frozen reference (ignored when ``beta == 0``).
      seq_bt: completion index of each token, ``-1`` where no loss applies.
      advantages_n: one advantage per completion.
    """
    adv = advantages_n[jnp.maximum(seq_bt, 0)]
    loss_bt, kl_bt, clipped_bt = per_token_objective(logp_bt, old_logp_bt, ref_logp_bt, adv, cfg)
    agg = lambda x: aggregate(x, seq_bt, num_seqs, cfg.loss_mode, cfg.max_completion_length)
    mask = seq_bt >= 0
    n_tokens = jnp.maximum(mask.sum(), 1)
    metrics = dict(
        kl=jnp.where(mask, kl_bt, 0.0).sum() / n_tokens,
        clipped_fraction=jnp.where(mask, clipped_bt, False).sum() / n_tokens,
        ratio_mean=jnp.where(mask, jnp.exp(logp_bt - old_logp_bt), 0.0).sum() / n_tokens,
    )
    return agg(loss_bt), metrics
