"""GRPO and its successors as one configurable loss: advantages, the clipped objective with the k3 KL estimator,
the loss aggregations, sequence-level importance ratios (GSPO), DAPO's soft overlong punishment and truncated
importance sampling against the rollout engine's log-probs.

Token arrays are ``[rows, T]`` and may pack several sequences per row: ``seq_bt`` gives each completion token its
sequence index (``-1`` for prompt tokens and padding), so one code path serves packed and unpacked batches and
aggregates per sequence exactly.

The objectives are settings of :class:`GRPOConfig` (presets :meth:`GRPOConfig.dapo`, :meth:`GRPOConfig.dr_grpo`,
:meth:`GRPOConfig.gspo`; the defaults are DeepSeek-R1-Zero's GRPO):

- GRPO (DeepSeekMath Eq. 3, R1 Eq. 1): ``rho_t = pi/pi_old`` per token, ``-min(rho A, clip(rho, 1-eps, 1+eps) A)
  + beta k3``, mean over each completion's tokens, then over completions; ``A = (r - mean) / std`` per group.
- DAPO (arXiv 2503.14476): clip-higher (``epsilon_high``), token-level mean over the batch, no KL, dynamic
  sampling (the trainer's), soft overlong punishment (:func:`overlong_penalty`, added to the rewards).
- Dr. GRPO (arXiv 2503.20783): ``A = r - mean`` (no std) and ``sum / (completions x max_completion_length)``.
- GSPO (arXiv 2507.18071): one ratio per sequence, ``s_i = exp(mean_t log(pi/pi_old))``, clipped per sequence
  (``importance_level="sequence"``); GSPO-token (``"sequence_token"``) uses ``s_it = sg[s_i] pi_t / sg[pi_t]``:
  the same value, the gradient flowing through each token's own log-prob.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

LossMode = Literal["sequence-mean", "token-mean", "dr_grpo"]
LOSS_MODES = ("sequence-mean", "token-mean", "dr_grpo")
IMPORTANCE_LEVELS = ("token", "sequence", "sequence_token")
TIS_LEVELS = (None, "token", "sequence")
TIS_MODES = ("truncate", "mask")


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
      max_completion_length: tokens generated per completion at most (DAPO's ``L_max``).
      learning_rate: policy learning rate (R1-Zero: 3e-6; tiny models want far more).
      log_ratio_clamp: log-ratios are clamped to this magnitude before exponentiating (avoids inf on outliers).
      importance_level: ``token`` (GRPO's per-token ratio), ``sequence`` (GSPO: the length-normalised sequence
        ratio ``exp(mean_t log(pi/pi_old))`` clipped per sequence) or ``sequence_token`` (GSPO-token: that ratio's
        value with per-token gradients; equals ``sequence`` when the advantage is per sequence, as here).
      overlong_buffer: DAPO's ``L_cache``: completions longer than ``max_completion_length - overlong_buffer``
        tokens are penalised linearly up to ``-overlong_penalty`` at ``max_completion_length`` (see
        :func:`overlong_penalty`; the trainer adds it to the rewards). 0 = off.
      overlong_penalty: the penalty at (and beyond) ``max_completion_length``.
      dynamic_sampling: DAPO's dynamic sampling, done by the trainer: keep drawing prompts until the round has
        ``questions`` groups whose rewards differ (all-equal groups have zero advantage), training on those only.
      max_resample_rounds: extra generate calls a round may make for dynamic sampling before it trains on what it
        has.
      tis: truncated importance sampling against the rollout engine (``None``, ``"token"`` or ``"sequence"``):
        the policy-gradient term of each token is weighted by ``pi_old / pi_sampler`` (the trainer's old
        log-probs against ``batch["sampler_logp"]``; per token, or the product over the sequence), without
        gradient, to correct for a sampler that differs numerically from the trainer (bf16 or FP8 inference,
        another kernel). See :func:`tis_weights`.
      tis_threshold: the weight's cap ``C`` (>= 1).
      tis_mode: ``truncate`` (weight ``min(w, C)``, Yao et al.'s TIS) or ``mask`` (weight ``w`` where ``w <= C``,
        else 0: the token, or the whole sequence, drops out of the policy gradient).
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
    importance_level: Literal["token", "sequence", "sequence_token"] = "token"
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    dynamic_sampling: bool = False
    max_resample_rounds: int = 4
    tis: Literal["token", "sequence"] | None = None
    tis_threshold: float = 2.0
    tis_mode: Literal["truncate", "mask"] = "truncate"

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
            (self.log_ratio_clamp > 0, f"log_ratio_clamp={self.log_ratio_clamp} must be > 0"),
            (
                self.importance_level in IMPORTANCE_LEVELS,
                f"importance_level={self.importance_level!r}; choose one of {IMPORTANCE_LEVELS}",
            ),
            (
                _is_int(self.overlong_buffer) and 0 <= self.overlong_buffer < self.max_completion_length,
                f"overlong_buffer={self.overlong_buffer!r} must be an int in [0, max_completion_length="
                f"{self.max_completion_length}) (0 = off)",
            ),
            (self.overlong_penalty >= 0, f"overlong_penalty={self.overlong_penalty} must be >= 0"),
            (isinstance(self.dynamic_sampling, bool), f"dynamic_sampling={self.dynamic_sampling!r} must be a bool"),
            (
                _is_int(self.max_resample_rounds) and self.max_resample_rounds >= 0,
                f"max_resample_rounds={self.max_resample_rounds!r} must be an int >= 0",
            ),
            (self.tis in TIS_LEVELS, f"tis={self.tis!r}; choose one of {TIS_LEVELS}"),
            # A cap below 1 would down-weight tokens on which sampler and trainer agree exactly.
            (self.tis_threshold >= 1, f"tis_threshold={self.tis_threshold} must be >= 1"),
            (self.tis_mode in TIS_MODES, f"tis_mode={self.tis_mode!r}; choose one of {TIS_MODES}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"GRPOConfig: {message}")

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @classmethod
    def dapo(cls, **overrides) -> GRPOConfig:
        """DAPO (arXiv 2503.14476 §3-4): clip-higher (0.2 / 0.28), token-level loss, no KL, dynamic sampling and
        soft overlong punishment over the last fifth of the length budget (the paper: 4,096 of 20,480 tokens),
        16 samples per prompt, learning rate 1e-6. ``overrides`` replace any field."""
        length = overrides.get("max_completion_length", cls.max_completion_length)
        base = dict(G=16, epsilon=0.2, epsilon_high=0.28, beta=0.0, loss_mode="token-mean", scale_rewards=True,
                    dynamic_sampling=True, overlong_buffer=length // 5, overlong_penalty=1.0,
                    learning_rate=1e-6)  # fmt: skip
        return cls(**{**base, **overrides})

    @classmethod
    def dr_grpo(cls, **overrides) -> GRPOConfig:
        """Dr. GRPO (arXiv 2503.20783 §3.2; Oat-Zero's settings): no std in the advantage, no length normalisation
        (a constant ``completions x max_completion_length`` normaliser), no KL, clip 0.2, 8 samples, 1e-6."""
        base = dict(G=8, epsilon=0.2, beta=0.0, loss_mode="dr_grpo", scale_rewards=False, learning_rate=1e-6)
        return cls(**{**base, **overrides})

    @classmethod
    def gspo(cls, **overrides) -> GRPOConfig:
        """GSPO (arXiv 2507.18071 §4): the sequence-level ratio clipped to ``[1 - 3e-4, 1 + 4e-4]`` (ranges on the
        length-normalised ratio are orders of magnitude below token-level ones), sequence-mean loss, no KL.
        ``importance_level="sequence_token"`` gives GSPO-token."""
        base = dict(epsilon=3e-4, epsilon_high=4e-4, beta=0.0, loss_mode="sequence-mean", importance_level="sequence")
        return cls(**{**base, **overrides})


def _is_int(x) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def overlong_penalty(lengths, cfg: GRPOConfig) -> np.ndarray:
    """DAPO's soft overlong punishment (arXiv 2503.14476 Eq. 13), in tokens, to be added to each reward.

    With ``L_max = cfg.max_completion_length`` and ``L_cache = cfg.overlong_buffer``: 0 for ``len <= L_max -
    L_cache``, ``(L_max - L_cache - len) / L_cache`` inside the buffer (falling linearly to -1), -1 beyond
    ``L_max``; scaled by ``cfg.overlong_penalty``. All zeros when ``overlong_buffer == 0``.

    Args:
      lengths: completion lengths in generated tokens (stop token included), any shape.

    Returns:
      float64 array of ``lengths``' shape (0 or negative).
    """
    lengths = np.asarray(lengths, np.float64)
    l_max, l_cache = cfg.max_completion_length, cfg.overlong_buffer
    if l_cache == 0:
        return np.zeros_like(lengths)
    expected = l_max - l_cache
    shaped = np.where(lengths <= expected, 0.0, np.where(lengths <= l_max, (expected - lengths) / l_cache, -1.0))
    return shaped * cfg.overlong_penalty


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


def _per_sequence(values_bt, seq_bt, num_seqs: int):
    """Per-sequence sums and token counts of ``values_bt`` over completion tokens, ``[num_seqs]`` each."""
    mask = seq_bt >= 0
    ids = jnp.where(mask, seq_bt, num_seqs).reshape(-1)  # padding goes to an extra bucket, dropped
    v = jnp.where(mask, values_bt, 0.0).reshape(-1)
    sums = jax.ops.segment_sum(v, ids, num_segments=num_seqs + 1)[:num_seqs]
    counts = jax.ops.segment_sum(mask.reshape(-1).astype(jnp.float32), ids, num_segments=num_seqs + 1)[:num_seqs]
    return sums, counts


def sequence_mean(values_bt, seq_bt, num_seqs: int) -> jax.Array:
    """Each token's sequence mean of ``values_bt`` (``[rows, T]``; 0 where ``seq_bt < 0``)."""
    sums, counts = _per_sequence(values_bt, seq_bt, num_seqs)
    means = sums / jnp.maximum(counts, 1)
    return jnp.where(seq_bt >= 0, means[jnp.maximum(seq_bt, 0)], 0.0)


def importance_ratio(logp, old_logp, cfg: GRPOConfig, seq_bt=None, num_seqs: int | None = None,
                     log_ratio_clamp: float | None = None) -> jax.Array:  # fmt: skip
    """The importance ratio each token's surrogate uses, by ``cfg.importance_level``.

    ``token``: ``exp(logp - old)``. ``sequence``: GSPO's ``s_i = exp(mean_t (logp - old))`` of the token's
    sequence (its gradient spreads over the sequence's tokens). ``sequence_token``: ``sg[s_i] * exp(logp -
    sg[logp])``, the value ``s_i`` with the gradient of ``s_i * logp_t``. Log-ratios are clamped to
    ``log_ratio_clamp`` (default ``cfg.log_ratio_clamp``) before exponentiating.
    """
    clamp = cfg.log_ratio_clamp if log_ratio_clamp is None else log_ratio_clamp
    log_ratio = logp - old_logp
    if cfg.importance_level == "token":
        return jnp.exp(jnp.clip(log_ratio, -clamp, clamp))
    if seq_bt is None or num_seqs is None:
        raise ValueError(f"importance_level={cfg.importance_level!r} needs seq_bt and num_seqs")
    seq_log_ratio = jnp.clip(sequence_mean(log_ratio, seq_bt, num_seqs), -clamp, clamp)
    if cfg.importance_level == "sequence":
        return jnp.exp(seq_log_ratio)
    return jnp.exp(jax.lax.stop_gradient(seq_log_ratio) + logp - jax.lax.stop_gradient(logp))


def per_token_objective(logp, old_logp, ref_logp, adv_bt, cfg: GRPOConfig, log_ratio_clamp: float | None = None, *,
                        seq_bt=None, num_seqs: int | None = None, weights_bt=None):  # fmt: skip
    """Per-token loss ``-w min(rho A, clip(rho, 1 - eps, 1 + eps_high) A) + beta * KL`` and the clip indicator.

    ``rho`` is :func:`importance_ratio` (the sequence levels need ``seq_bt`` and ``num_seqs``). ``weights_bt``
    (default 1) are importance weights against the sampler (:func:`tis_weights`), applied without gradient to the
    policy-gradient term only: the KL term is a regulariser of the current policy, not an expectation over the
    sampler. ``ref_logp`` may be None when ``beta == 0``. Returns ``(loss, kl, clipped)``.
    """
    ratio = importance_ratio(logp, old_logp, cfg, seq_bt, num_seqs, log_ratio_clamp)
    clipped_ratio = jnp.clip(ratio, 1.0 - cfg.epsilon, 1.0 + cfg.clip_high)
    surrogate = jnp.minimum(ratio * adv_bt, clipped_ratio * adv_bt)
    if weights_bt is not None:
        surrogate = jax.lax.stop_gradient(weights_bt) * surrogate
    loss = -surrogate
    kl = jnp.zeros_like(logp)
    if cfg.beta > 0:
        kl = k3_kl(logp, ref_logp)
        loss = loss + cfg.beta * kl
    clipped = (ratio * adv_bt) != jnp.minimum(ratio * adv_bt, clipped_ratio * adv_bt)  # the gradient is cut
    return loss, kl, clipped


def tis_weights(old_logp_bt, sampler_logp_bt, seq_bt, num_seqs: int, cfg: GRPOConfig):
    """Importance weights of the rollout tokens, ``pi_old / pi_sampler``, capped per ``cfg.tis_mode``.

    The rollout engine samples from ``pi_sampler`` (its own numerics: bf16 or FP8 weights, another attention
    kernel), while the objective assumes samples from the trainer's ``pi_old``; weighting each token's policy
    gradient by ``w = pi_old / pi_sampler`` corrects the expectation, and capping ``w`` at ``C =
    cfg.tis_threshold`` bounds the variance (truncated IS, Yao et al. 2025; ``mask`` rejects instead).

    ``cfg.tis == "token"``: ``w_t = exp(old_t - sampler_t)``. ``"sequence"``: one weight per completion,
    ``w_i = exp(sum_t (old_t - sampler_t))`` (the sequence's likelihood ratio), on each of its tokens.
    ``truncate``: ``min(w, C)``; ``mask``: ``w`` where ``w <= C``, else 0. Log-ratios are clamped to
    ``cfg.log_ratio_clamp``. Weights are 0 outside completion tokens.

    Returns:
      ``(weights [rows, T], metrics)`` with the raw ratio's spread over the tokens (``"token"``) or completions
      (``"sequence"``): ``tis_ratio_mean``, ``tis_ratio_min``, ``tis_ratio_max`` and ``tis_capped_fraction``
      (share above ``C``: truncated or masked).
    """
    if cfg.tis is None:
        raise ValueError("tis_weights needs cfg.tis = 'token' or 'sequence'")
    mask = seq_bt >= 0
    log_w = jax.lax.stop_gradient(old_logp_bt - sampler_logp_bt).astype(jnp.float32)
    if cfg.tis == "token":
        raw = jnp.exp(jnp.clip(jnp.where(mask, log_w, 0.0), -cfg.log_ratio_clamp, cfg.log_ratio_clamp))
        units = mask  # statistics over completion tokens
        raw_units = raw
    else:
        sums, counts = _per_sequence(log_w, seq_bt, num_seqs)
        raw_units = jnp.exp(jnp.clip(sums, -cfg.log_ratio_clamp, cfg.log_ratio_clamp))
        units = counts > 0  # statistics over completions that have tokens
        raw = raw_units[jnp.maximum(seq_bt, 0)]
    over = raw > cfg.tis_threshold
    capped = jnp.minimum(raw, cfg.tis_threshold) if cfg.tis_mode == "truncate" else jnp.where(over, 0.0, raw)
    weights = jnp.where(mask, capped, 0.0)
    n = jnp.maximum(units.sum(), 1)
    metrics = dict(
        tis_ratio_mean=jnp.where(units, raw_units, 0.0).sum() / n,
        tis_ratio_min=jnp.min(jnp.where(units, raw_units, jnp.inf)),
        tis_ratio_max=jnp.max(jnp.where(units, raw_units, -jnp.inf)),
        tis_capped_fraction=jnp.where(units, raw_units > cfg.tis_threshold, False).sum() / n,
    )
    return weights, metrics


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
    sums, counts = _per_sequence(v, seq_bt, num_seqs)
    present = counts > 0
    return jnp.sum(jnp.where(present, sums / jnp.maximum(counts, 1), 0.0)) / jnp.maximum(present.sum(), 1)


def grpo_loss(logp_bt, old_logp_bt, ref_logp_bt, seq_bt, advantages_n, cfg: GRPOConfig, num_seqs: int, *,
              sampler_logp_bt=None):  # fmt: skip
    """The loss of a (possibly packed) batch under ``cfg``'s objective, and its metrics.

    Args:
      logp_bt: log-probs of the taken tokens under the current policy (differentiable).
      old_logp_bt: the same under the rollout policy as the trainer computes it (constant across ``mu``).
      ref_logp_bt: under the frozen reference (ignored when ``beta == 0``).
      seq_bt: completion index of each token, ``-1`` where no loss applies.
      advantages_n: one advantage per completion.
      sampler_logp_bt: the rollout engine's log-probs of the same tokens; with ``cfg.tis`` they give the
        truncated importance weights (:func:`tis_weights`), which then also add ``tis_*`` metrics.

    Returns:
      ``(loss, metrics)``: ``kl``, ``clipped_fraction`` (tokens whose gradient the clip cut) and ``ratio_mean``
      (the importance ratio used, per token), averaged over completion tokens.
    """
    adv = advantages_n[jnp.maximum(seq_bt, 0)]
    weights, tis_metrics = None, {}
    if cfg.tis is not None:
        if sampler_logp_bt is None:
            raise ValueError(f"GRPOConfig.tis={cfg.tis!r} needs the sampler's log-probs (batch['sampler_logp'])")
        weights, tis_metrics = tis_weights(old_logp_bt, sampler_logp_bt, seq_bt, num_seqs, cfg)
    loss_bt, kl_bt, clipped_bt = per_token_objective(
        logp_bt, old_logp_bt, ref_logp_bt, adv, cfg, seq_bt=seq_bt, num_seqs=num_seqs, weights_bt=weights
    )
    mask = seq_bt >= 0
    n_tokens = jnp.maximum(mask.sum(), 1)
    ratio = importance_ratio(logp_bt, old_logp_bt, cfg, seq_bt, num_seqs)
    metrics = dict(
        kl=jnp.where(mask, kl_bt, 0.0).sum() / n_tokens,
        clipped_fraction=jnp.where(mask, clipped_bt, False).sum() / n_tokens,
        ratio_mean=jnp.where(mask, jax.lax.stop_gradient(ratio), 0.0).sum() / n_tokens,
        **tis_metrics,
    )
    return aggregate(loss_bt, seq_bt, num_seqs, cfg.loss_mode, cfg.max_completion_length), metrics
