"""DeepSeekMoE routing: V2 softmax gating (greedy, group-limited) and V3 sigmoid gating (noaux_tc).

All selection happens on ``scores + bias`` (the bias exists only for noaux_tc and is used for selection only);
the returned weights are gathered from the unbiased scores.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig, Numerics, ScoringFunc, TopkMethod


class Routing(NamedTuple):
    """Routing decision for ``m`` tokens."""

    weights_mk: jax.Array  # fp32 combine weights (normalised if configured, times routed_scaling_factor)
    experts_mk: jax.Array  # int32 expert ids
    scores_me: jax.Array  # fp32 affinities s (softmax or sigmoid, before bias) for balance losses


def route(x_md: jax.Array, gate_de: jax.Array, bias_e: jax.Array | None, cfg: ModelConfig) -> Routing:
    """Choose ``num_experts_per_tok`` experts per token and their weights.

    Numerics (``cfg.numerics``): HF computes the gate GEMM and scores in fp32; DeepSeek's official code runs the
    GEMM in bf16 and the sigmoid on the bf16 logits (softmax in fp32), adding the fp32 bias afterwards. Groups
    outside the kept ``topk_group`` are masked with -inf (official; HF V2 masks softmax scores with 0, which
    selects the same experts because kept groups hold >= k experts with positive scores).
    """
    official = cfg.numerics == Numerics.OFFICIAL
    gemm_dtype = jnp.bfloat16 if official else jnp.float32
    logits = jnp.dot(x_md.astype(gemm_dtype), gate_de.astype(gemm_dtype), preferred_element_type=gemm_dtype)
    if cfg.scoring_func == ScoringFunc.SOFTMAX:  # softmax is taken in fp32 by both references
        scores = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    else:  # evaluated in fp32 and rounded once, as torch's bf16 sigmoid does (XLA's bf16 sigmoid is coarser)
        scores = jax.nn.sigmoid(logits.astype(jnp.float32)).astype(gemm_dtype)
    scores = scores.astype(jnp.float32)
    choice = scores if bias_e is None else scores + bias_e.astype(jnp.float32)[None, :]

    m, e = choice.shape
    if cfg.topk_method != TopkMethod.GREEDY and cfg.n_group > 1:
        grouped = choice.reshape(m, cfg.n_group, e // cfg.n_group)
        if cfg.topk_method == TopkMethod.NOAUX_TC:
            group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)
        else:
            group_score = grouped.max(-1)
        _, kept = jax.lax.top_k(group_score, cfg.topk_group)
        keep = jnp.zeros((m, cfg.n_group), bool).at[jnp.arange(m)[:, None], kept].set(True)
        choice = jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(m, e)

    _, experts = jax.lax.top_k(choice, cfg.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if cfg.norm_topk_prob:
        denom = weights.sum(-1, keepdims=True)
        weights = weights / (denom if official else denom + 1e-20)
    return Routing(weights * cfg.routed_scaling_factor, experts.astype(jnp.int32), scores)


def expert_load(experts_mk: jax.Array, num_experts: int) -> jax.Array:
    """How many token slots each expert received, ``[e]`` int32."""
    return jnp.zeros((num_experts,), jnp.int32).at[experts_mk.reshape(-1)].add(1)
