"""Pretraining losses: next-token cross-entropy, Multi-Token Prediction, sequence-wise balance, and the
auxiliary-loss-free bias update (V3 §2.1.2, §2.2).

Targets and their masks come from the data pipeline (:func:`dsjax.data.pipeline.future_targets`): a target
counts only when it lies in the same document as the input position and is not padding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from dsjax.ops.routing import Routing


def cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of token cross-entropies over valid targets (computed in fp32) and their count."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits_btv.astype(jnp.float32), targets_bt)
    return jnp.sum(jnp.where(mask_bt, losses, 0.0)), jnp.sum(mask_bt)


def chunked_cross_entropy(
    hidden_btd: jax.Array,
    head_dv: jax.Array,
    targets_bt: jax.Array,
    mask_bt: jax.Array,
    *,
    chunk: int,
    grads_in_forward: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """:func:`cross_entropy` of ``hidden @ head`` computed ``chunk`` sequence positions at a time (all rows of the
    batch at once, so each device works on its own rows in every step): the fp32 ``[tokens, vocab]`` logits and
    their gradient never exist whole (17 GB each per chip for DeepSeek-V3 at 32K tokens per chip and a 129K
    vocabulary). Each chunk's gradients are formed in the forward pass, while its logits exist (the loss is the
    step's last operation, so its gradient is needed right after): no logits are recomputed in the backward,
    3 head-sized matmuls per token instead of 4. The head's gradient accumulates over chunks in fp32.

    ``grads_in_forward=False``: the backward recomputes each chunk's logits instead (4 matmuls per token), so
    what the backward keeps is the hidden states, not the head's fp32 gradient. For a pipeline whose backward
    is split (B now, W later): B would otherwise store that gradient for W, two ``f32[7168, 129280]`` (3.45
    GiB each: the loss and the MTP loss) in every residual slot of DeepSeek-V3's last stage."""
    b, t = hidden_btd.shape[:2]
    chunk = min(chunk, t)  # a chunk longer than the sequence would pad it: more logits, not fewer
    steps = -(-t // chunk)
    pad = steps * chunk - t

    def split(x, fill):  # [b, t, ...] -> [steps, b, chunk, ...]; the batch dim keeps its sharding
        if pad:
            x = jnp.concatenate([x, jnp.full((b, pad, *x.shape[2:]), fill, x.dtype)], axis=1)
        return jnp.moveaxis(x.reshape(b, steps, chunk, *x.shape[2:]), 1, 0)

    head_dtype = head_dv.dtype
    chunks = (split(hidden_btd, 0), split(targets_bt, 0), split(mask_bt, False))
    if not grads_in_forward:
        body = jax.checkpoint(lambda total, xs: (total + _chunk_ce(*xs, head_dv)[0], None))
        return jax.lax.scan(body, jnp.zeros(()), chunks)[0], jnp.sum(mask_bt)

    @jax.custom_vjp
    def fused(chunks, head):  # called without differentiation: the loss alone
        return jax.lax.scan(lambda total, xs: (total + _chunk_ce(*xs, head)[0], None), jnp.zeros(()), chunks)[0]

    def fused_fwd(chunks, head):
        total, dh, dw = _chunked_ce_with_grads(chunks, head)
        return total, (dh, dw)

    def fused_bwd(residuals, g):
        dh, dw = residuals
        return (dh * g.astype(dh.dtype), None, None), (dw * g).astype(head_dtype)

    fused.defvjp(fused_fwd, fused_bwd)
    return fused(chunks, head_dv), jnp.sum(mask_bt)


def _chunk_ce(h_bcd, t_bc, m_bc, head_dv):
    """One chunk's summed cross-entropy (fp32), with its logits and their log-sum-exp."""
    w = head_dv.astype(h_bcd.dtype)
    logits = jnp.einsum("bcd,dv->bcv", h_bcd, w, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, t_bc[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(m_bc, lse - target_logit, 0.0)), logits, lse


def _chunk_ce_and_grads(h_bcd, t_bc, m_bc, head_dv):
    """One chunk's summed cross-entropy, d(sum)/d(hidden) and d(sum)/d(head) (fp32), from one set of logits."""
    w = head_dv.astype(h_bcd.dtype)
    loss, logits, lse = _chunk_ce(h_bcd, t_bc, m_bc, head_dv)
    onehot = jax.nn.one_hot(t_bc, logits.shape[-1], dtype=jnp.float32)
    dlogits = jnp.where(m_bc[..., None], jnp.exp(logits - lse[..., None]) - onehot, 0.0).astype(h_bcd.dtype)
    dh = jnp.einsum("bcv,dv->bcd", dlogits, w, preferred_element_type=jnp.float32).astype(h_bcd.dtype)
    dw = jnp.einsum("bcd,bcv->dv", h_bcd, dlogits, preferred_element_type=jnp.float32)
    return loss, dh, dw


def _chunked_ce_with_grads(chunks, head_dv):
    """(summed loss, d/d hidden chunks, d/d head in fp32) over a scan of chunks."""

    def body(carry, xs):
        total, dw = carry
        loss, dh, dw_c = _chunk_ce_and_grads(*xs, head_dv)
        return (total + loss, dw + dw_c), dh

    init = (jnp.zeros((), jnp.float32), jnp.zeros(head_dv.shape, jnp.float32))
    (total, dw), dh = jax.lax.scan(body, init, chunks)
    return total, dh, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def head_logprobs(
    hidden_bcd: jax.Array, head_dv: jax.Array, targets_bc: jax.Array, temperature: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """``log p(target)`` and the entropy (fp32, ``[b, c]``) of ``softmax(hidden @ head / temperature)``.

    The entropy is a metric: no gradient flows from it. The backward is written out, ``dlogits = g (onehot -
    p) / temperature``, rather than autodiff's log-softmax transpose (a scatter of the targets into zeros, then
    the sum term), and each exponential is taken once: on CPU that halves the head's share of the RL update
    (its largest matmul at small sizes). Saves the probabilities, as autodiff saved the log-softmax."""
    return _head_logprobs_fwd(hidden_bcd, head_dv, targets_bc, temperature)[0]


def _head_logprobs_fwd(hidden_bcd, head_dv, targets_bc, temperature):
    logits = jnp.einsum("bcd,dv->bcv", hidden_bcd, head_dv.astype(hidden_bcd.dtype), preferred_element_type=jnp.float32)
    if temperature != 1.0:
        logits = logits / temperature
    shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
    exp = jnp.exp(shifted)
    total = jnp.sum(exp, axis=-1, keepdims=True)
    log_total = jnp.log(total)
    probs = exp / total
    logp = jnp.take_along_axis(shifted, targets_bc[..., None], axis=-1)[..., 0] - log_total[..., 0]
    # -sum p log p with log p = shifted - log_total. As a dot: XLA:CPU's fused multiply-and-sum over the
    # vocabulary took 6.7x as long (10.6 vs 1.6 ms for 1024 x 1024 logits).
    entropy = log_total[..., 0] - jnp.einsum("bcv,bcv->bc", probs, shifted)
    return (logp, entropy), (hidden_bcd, head_dv, targets_bc, probs)


def _head_logprobs_bwd(temperature, res, cotangents):
    hidden, head, targets, probs = res
    g_logp = cotangents[0]  # the entropy's cotangent is dropped: it is a metric (stop_gradient)
    onehot = jax.lax.broadcasted_iota(targets.dtype, probs.shape, probs.ndim - 1) == targets[..., None]
    dlogits = (jnp.where(onehot, 1.0, 0.0) - probs) * (g_logp / temperature)[..., None]
    # fp32 products, as autodiff's (its cotangent stays fp32): rounding dlogits to a bf16 model's dtype first
    # made the gradients 500x less precise (relative error 4e-3 vs 8e-6 against a float32 reference).
    d_hidden = jnp.einsum("bcv,dv->bcd", dlogits, head.astype(jnp.float32))
    d_head = jnp.einsum("bcd,bcv->dv", hidden.astype(jnp.float32), dlogits)
    return d_hidden.astype(hidden.dtype), d_head.astype(head.dtype), None


head_logprobs.defvjp(_head_logprobs_fwd, _head_logprobs_bwd)


def chunked_token_logprobs(
    hidden_btd: jax.Array, head_dv: jax.Array, targets_bt: jax.Array, *, chunk: int, temperature: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Per-token ``log p(target)`` and the predictive entropy (both fp32, ``[b, t]``) of
    ``softmax(hidden @ head / temperature)``, ``chunk`` sequence positions at a time with each chunk's logits
    recomputed in the backward pass: the RL step's log-probs without the whole fp32 ``[tokens, vocab]`` logits,
    their log-softmax and its gradient (see :func:`chunked_cross_entropy`). ``chunk = 0`` computes them whole."""
    b, t = hidden_btd.shape[:2]
    if not chunk or chunk >= t:
        return head_logprobs(hidden_btd, head_dv, targets_bt, temperature)

    # Autodiff's backward here, not head_logprobs's: each chunk is recomputed in the backward anyway, and the TPU
    # compiler (libtpu 0.0.42) crashes on that custom VJP inside the checkpointed chunk loop (segfault compiling
    # tests/test_aot.py::test_grpo_update_compiles_for_v5p; the whole-logits path compiles).
    def logprobs(h_bcd, t_bc):
        logits = jnp.einsum("bcd,dv->bcv", h_bcd, head_dv.astype(h_bcd.dtype), preferred_element_type=jnp.float32)
        if temperature != 1.0:
            logits = logits / temperature
        logp_all = jax.nn.log_softmax(logits, axis=-1)
        logp = jnp.take_along_axis(logp_all, t_bc[..., None], axis=-1)[..., 0]
        entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
        return logp, jax.lax.stop_gradient(entropy)

    steps = -(-t // chunk)
    pad = steps * chunk - t

    def split(x):  # [b, t, ...] -> [steps, b, chunk, ...]; the batch dim keeps its sharding
        if pad:
            x = jnp.concatenate([x, jnp.zeros((b, pad, *x.shape[2:]), x.dtype)], axis=1)
        return jnp.moveaxis(x.reshape(b, steps, chunk, *x.shape[2:]), 1, 0)

    logp, entropy = jax.lax.map(lambda xs: jax.checkpoint(logprobs)(*xs), (split(hidden_btd), split(targets_bt)))
    join = lambda y: jnp.moveaxis(y, 0, 1).reshape(b, steps * chunk)[:, :t]
    return join(logp), join(entropy)


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
