"""Dropless expert dispatch: sort token slots by expert and run grouped matmuls, or a dense reference.

Expert FFN: ``down(silu(x . W_gate) * (x . W_up))`` with ``w_gate, w_up [e, d, f]`` and ``w_down [e, f, d]``.
"""

import jax
import jax.numpy as jnp


def _swiglu(gate, up):
    return jax.nn.silu(gate) * up


def moe_ragged(x_md, weights_mk, experts_mk, w_gate_edf, w_up_edf, w_down_efd, *, accum_dtype=jnp.float32):
    """Routed-expert output ``[m, d]`` via ``jax.lax.ragged_dot`` over expert-sorted token slots.

    Every (token, expert) pair is computed (no capacity, no dropping). Outputs are weighted, un-sorted and
    summed over the k experts of each token in ``accum_dtype`` (fp32 as HF; bf16 as DeepSeek's code).
    """
    m, k = experts_mk.shape
    num_experts = w_gate_edf.shape[0]
    flat = experts_mk.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # slot ids grouped by expert
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    x_sorted = x_md[order // k]
    hidden = _swiglu(
        jax.lax.ragged_dot(x_sorted, w_gate_edf, group_sizes), jax.lax.ragged_dot(x_sorted, w_up_edf, group_sizes)
    )
    y_sorted = jax.lax.ragged_dot(hidden, w_down_efd, group_sizes)
    y_slots = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(m, k, -1)
    return jnp.einsum("mkd,mk->md", y_slots.astype(accum_dtype), weights_mk.astype(accum_dtype)).astype(x_md.dtype)


def moe_dense(x_md, weights_mk, experts_mk, w_gate_edf, w_up_edf, w_down_efd, *, accum_dtype=jnp.float32):
    """Reference: run every expert on every token and mask with the combine weights. O(m * e) work."""
    num_experts = w_gate_edf.shape[0]
    combine_me = jnp.zeros((x_md.shape[0], num_experts), accum_dtype)
    combine_me = combine_me.at[jnp.arange(x_md.shape[0])[:, None], experts_mk].add(weights_mk.astype(accum_dtype))
    hidden = _swiglu(jnp.einsum("md,edf->mef", x_md, w_gate_edf), jnp.einsum("md,edf->mef", x_md, w_up_edf))
    y_med = jnp.einsum("mef,efd->med", hidden, w_down_efd)
    return jnp.einsum("med,me->md", y_med.astype(accum_dtype), combine_me).astype(x_md.dtype)
