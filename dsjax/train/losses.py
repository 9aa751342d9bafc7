"""Pretraining losses: next-token cross-entropy, Multi-Token Prediction, sequence-wise balance, and the
auxiliary-loss-free bias update (V3 §2.1.2, §2.2).

Targets and their masks come from the data pipeline (:func:`dsjax.data.pipeline.future_targets`): a target
counts only when it lies in the same document as the input position and is not padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dsjax.ops.routing import Routing


def cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of token cross-entropies over valid targets (computed in fp32) and their count."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits_btv.astype(jnp.float32), targets_bt)
    return jnp.sum(jnp.where(mask_bt, losses, 0.0)), jnp.sum(mask_bt)


def sequence_balance_loss(routing: Routing, valid_bt: jax.Array, num_experts: int, top_k: int) -> jax.Array:
    """Complementary sequence-wise balance loss (V3 eqs 17-20), summed over the stacked layers.

    Per sequence and layer: ``f_i = N_r / (K_r T) * sum_t 1[i in TopK_t]``, ``P_i = 1/T sum_t s'_{i,t}`` with
    the affinities normalised over all experts, ``L = sum_i f_i P_i``; averaged over sequences. ``T`` counts the
    sequence's non-padding tokens. Returns the loss without the alpha factor.
    """
    layers = routing.scores_me.shape[0]
    b, t = valid_bt.shape
    valid = valid_bt.reshape(1, b, t, 1).astype(jnp.float32)
    tokens = jnp.maximum(valid.sum(2), 1.0)  # [1, b, 1]
    chosen = jax.nn.one_hot(routing.experts_mk, num_experts, dtype=jnp.float32).sum(-2)  # [L, m, e]
    f = chosen.reshape(layers, b, t, num_experts) * valid
    f = f.sum(2) * num_experts / (top_k * tokens)
    scores = routing.scores_me.reshape(layers, b, t, num_experts)
    s_norm = scores / jnp.sum(scores, -1, keepdims=True)
    p = (s_norm * valid).sum(2) / tokens
    return jnp.sum(jnp.mean(jnp.sum(f * p, -1), -1))


def expert_load(routing: Routing, valid_bt: jax.Array, num_experts: int) -> jax.Array:
    """``[L, e]`` tokens routed to each expert over the whole (global) batch, padding excluded."""
    layers = routing.experts_mk.shape[0]
    chosen = jax.nn.one_hot(routing.experts_mk, num_experts, dtype=jnp.float32).sum(-2)
    return jnp.sum(chosen * valid_bt.reshape(1, -1, 1).astype(jnp.float32), axis=1).reshape(layers, num_experts)


def bias_update(bias_le: jax.Array, load_le: jax.Array, gamma: float) -> jax.Array:
    """Auxiliary-loss-free balancing: ``b_i += gamma * sign(mean_load - load_i)`` per layer."""
    mean = jnp.mean(load_le, axis=-1, keepdims=True)
    return bias_le + gamma * jnp.sign(mean - load_le)
