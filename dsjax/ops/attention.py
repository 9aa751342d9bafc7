"""Multi-head Latent Attention (MLA) cores: naive (per-head keys/values) and absorbed (attention in latent space).

Both take the compressed KV latent ``c_kv [b, s, c]`` (already RMS-normalised) and the shared rotated key
``k_pe [b, s, r]`` — the only things MLA caches — plus ``wkv_b [c, h, n + v]``, the joint up-projection.
Scores are ``(q_nope . k_nope + q_pe . k_pe) * scale``; softmax runs in fp32.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

_NEG_INF = -1e30  # finite so fully-masked rows (padding) give a uniform softmax instead of NaN


def attention_mask(
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segments: jax.Array | None = None,
    kv_segments: jax.Array | None = None,
) -> jax.Array:
    """Boolean ``[b, t, s]`` mask: key position <= query position, and the same segment when given.

    Segment ids let packed sequences attend only within their own document.
    """
    mask = kv_positions[:, None, :] <= q_positions[:, :, None]
    if q_segments is not None:
        mask &= q_segments[:, :, None] == kv_segments[:, None, :]
    return mask


class AttentionMask(NamedTuple):
    """Which keys each query may see, kept as positions and segment ids (``[b, t]`` / ``[b, s]``) rather than a
    dense ``[b, t, s]`` mask: memory-efficient kernels build it tile by tile; :meth:`dense` builds it whole."""

    q_positions: jax.Array
    kv_positions: jax.Array
    q_segments: jax.Array | None = None
    kv_segments: jax.Array | None = None

    def dense(self) -> jax.Array:
        return attention_mask(self.q_positions, self.kv_positions, self.q_segments, self.kv_segments)


def _softmax(scores: jax.Array, mask_bts: jax.Array, head_axis: int = 1) -> jax.Array:
    """fp32 softmax over the last axis of ``[b, h, t, s]`` scores (``head_axis=2``: ``[b, t, h, s]``), masked."""
    scores = jnp.where(jnp.expand_dims(mask_bts, head_axis), scores.astype(jnp.float32), _NEG_INF)
    return jax.nn.softmax(scores, axis=-1)


def mla_naive(q_nope, q_pe, c_kv, k_pe, wkv_b, mask, scale, *, nope_dim: int, expand=None):
    """Expand the latent into per-head keys and values, then attend (the training / prefill form).

    Args:
      q_nope: ``[b, t, h, n]``; q_pe: ``[b, t, h, r]`` (rotated); c_kv: ``[b, s, c]``; k_pe: ``[b, s, r]``
      (rotated); wkv_b: ``[c, h, n + v]``; mask: ``[b, t, s]`` bool; scale: softmax scale;
      expand: optional ``c_kv -> [b, s, h, n + v]`` used instead of the product with ``wkv_b`` (FP8 GEMMs).
    Returns:
      ``[b, t, h, v]`` attention output, in ``q_nope.dtype``.
    """
    # Head-major [b, h, *, *] operands and one score dot over the concatenated nope|rope dims: XLA:CPU otherwise
    # transposes the [b, h, t, s] score tensor around each of two [b, t, h, *] einsums (17-38% of a forward).
    b, h = q_nope.shape[0], q_nope.shape[2]
    s, r = k_pe.shape[1], k_pe.shape[-1]
    kv = jnp.einsum("bsc,chx->bhsx", c_kv, wkv_b) if expand is None else expand(c_kv).transpose(0, 2, 1, 3)
    k = jnp.concatenate([kv[..., :nope_dim], jnp.broadcast_to(k_pe[:, None], (b, h, s, r))], axis=-1)
    q = jnp.concatenate([q_nope, q_pe], axis=-1).transpose(0, 2, 1, 3)
    probs = _softmax(jnp.einsum("bhtx,bhsx->bhts", q, k) * scale, mask).astype(kv.dtype)
    return jnp.einsum("bhts,bhsv->bhtv", probs, kv[..., nope_dim:]).transpose(0, 2, 1, 3)


def mla_absorbed(q_nope, q_pe, c_kv, k_pe, wkv_b, mask, scale, *, nope_dim: int):
    """Same result as :func:`mla_naive` without materialising per-head keys/values (the decode form).

    The key up-projection is folded into the query (``q_lat = q_nope . W_UK``) and the value up-projection is
    applied after attention, so the work per cached token is O(c + r) instead of O(h * (n + v)).
    """
    w_uk, w_uv = wkv_b[..., :nope_dim], wkv_b[..., nope_dim:]
    q_lat = jnp.einsum("bthn,chn->bthc", q_nope, w_uk)
    # Scores and probabilities kept in the queries' [b, t, h, s] order: each product is then a plain matmul per
    # sequence over its (t, h) rows. The head-major [b, h, t, s] form made XLA:CPU run the output product as a
    # transposed-operand dot, 3x slower at decode sizes.
    scores = jnp.einsum("bthc,bsc->bths", q_lat, c_kv) + jnp.einsum("bthr,bsr->bths", q_pe, k_pe)
    # Materialised once: without the barrier XLA:GPU recomputes the rope product (q_pe . k_pe) inside each of
    # the softmax's three fusions, 3 GEMMs per layer and the k_pe cache read three times (V3 decode on 8 x H200:
    # compiled flops 1.10x the model's instead of 1.00x). v5p decode memory and flops, and CPU decode times, unchanged.
    scores = jax.lax.optimization_barrier(scores)
    probs = _softmax(scores * scale, mask, head_axis=2).astype(c_kv.dtype)
    o_lat = jnp.einsum("bths,bsc->bthc", probs, c_kv)
    return jnp.einsum("bthc,chv->bthv", o_lat, w_uv)
