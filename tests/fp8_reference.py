"""NumPy + ml_dtypes reference of DeepSeek-V3's fine-grained FP8 recipe (arXiv 2412.19437 §3.3), no JAX.

Written from the recipe, not from ``dsjax.ops.fp8``: E4M3 everywhere; activations and gradients in ``1 x B``
tiles along the last axis, weights in ``B x B`` blocks; ``s = max(amax, 1e-4) / 448`` in fp32 (optionally
``2^ceil(log2 s)``, computed here on the fp32 bit pattern); ``q = e4m3(clip(x / s, +-448))`` (round to nearest
even); ragged dimensions zero-padded before the scales are computed. GEMMs accumulate each ``B``-long slice of
the contraction exactly in float64 and multiply it by both operands' scales (DeepSeek's promotion every 128
elements), so the oracle carries no accumulation error of its own.
"""

import ml_dtypes
import numpy as np

E4M3 = ml_dtypes.float8_e4m3fn
E4M3_MAX = np.float32(448.0)
AMAX_FLOOR = np.float32(1e-4)  # activations and weights (DeepSeek's kernels)
GRAD_AMAX_FLOOR = np.float32(1e-30)  # gradients: only guards the division of all-zero tiles
BLOCK = 128


def pow2_ceil(s):
    """Smallest power of two >= s, for positive normal fp32 s: clear the mantissa, bump the exponent if it was
    non-zero (exact; no logarithm)."""
    bits = np.asarray(s, np.float32).view(np.uint32)
    bump = np.where(bits & np.uint32(0x007FFFFF), np.uint32(1 << 23), np.uint32(0)).astype(np.uint32)
    return ((bits & np.uint32(0x7F800000)) + bump).view(np.float32)


def scale(amax, pow2=False, floor=AMAX_FLOOR):
    """``max(amax, floor) / 448`` (IEEE fp32 division)."""
    a = np.maximum(np.asarray(amax, np.float32), floor)
    s = (a / E4M3_MAX).astype(np.float32)
    return pow2_ceil(s) if pow2 else s


def _pad_to(x, axis, block):
    extra = -x.shape[axis] % block
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return np.pad(x, widths)


def _cast(x, s):
    """``e4m3(clip(x / s))``, the cast rounding to nearest even."""
    v = x / s
    return np.clip(v, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def quantize_rows(x, pow2=False, block=BLOCK, s=None, floor=AMAX_FLOOR):
    """``x [..., K]`` -> ``(q [..., K] e4m3, s [..., ceil(K/B)] fp32)``, one scale per 1 x B tile; given ``s``,
    only the cast (with those scales)."""
    x = np.asarray(x).astype(np.float32)
    k, kb = x.shape[-1], -(-x.shape[-1] // block)
    tiles = _pad_to(x, -1, block).reshape(*x.shape[:-1], kb, block)
    s = scale(np.abs(tiles).max(axis=-1), pow2, floor) if s is None else np.asarray(s, np.float32)
    q = _cast(tiles, s[..., None]).reshape(*x.shape[:-1], kb * block)[..., :k]
    return q, s


def dequantize_rows(q, s, block=BLOCK):
    k, kb = q.shape[-1], s.shape[-1]
    tiles = _pad_to(q.astype(np.float32), -1, block).reshape(*q.shape[:-1], kb, block)
    return (tiles * s[..., None]).reshape(*q.shape[:-1], kb * block)[..., :k]


def quantize_blocks(w, pow2=False, block=BLOCK, s=None):
    """``w [..., K, N]`` -> ``(q e4m3, s [..., ceil(K/B), ceil(N/B)] fp32)``, one scale per B x B block; given
    ``s``, only the cast."""
    w = np.asarray(w).astype(np.float32)
    *lead, k, n = w.shape
    padded = _pad_to(_pad_to(w, -2, block), -1, block)
    kb, nb = padded.shape[-2] // block, padded.shape[-1] // block
    blocks = padded.reshape(*lead, kb, block, nb, block)
    s = scale(np.abs(blocks).max(axis=(-3, -1)), pow2) if s is None else np.asarray(s, np.float32)
    q = _cast(blocks, s[..., :, None, :, None]).reshape(*lead, kb * block, nb * block)[..., :k, :n]
    return q, s


def dequantize_blocks(q, s, block=BLOCK):
    """``q [K, N]`` e4m3 times its ``[ceil(K/B), ceil(N/B)]`` block scales, in fp32."""
    k, n = q.shape
    full = np.repeat(np.repeat(np.asarray(s, np.float32), block, axis=0), block, axis=1)[:k, :n]
    return q.astype(np.float32) * full


def block_scales_per_column(s, n, block=BLOCK):
    """``B x B`` block scales ``[..., Kb, Nb]`` -> per-column scales ``[..., Kb, N]`` for :func:`blocked_dot`."""
    return np.repeat(s, block, axis=-1)[..., :n]


def blocked_dot(aq, sa, bq, sb, block=BLOCK):
    """``a [M, K] . b [K, N]`` in float64: ``aq`` with ``sa [M, Kb]`` (1 x B tiles along K), ``bq`` with
    ``sb [Kb, N]`` (each column's scale for each B-long slice of K). Sum over slices of exact partial dot
    times both scales."""
    m, k = aq.shape
    out = np.zeros((m, bq.shape[1]), np.float64)
    for j in range(-(-k // block)):
        sl = slice(j * block, (j + 1) * block)
        part = aq[:, sl].astype(np.float64) @ bq[sl].astype(np.float64)
        out += part * sa[:, j, None].astype(np.float64) * sb[j].astype(np.float64)
    return out


def linear_fwd(x, w, pow2=False):
    """``y = x . w`` for ``x [M, K]``, ``w [K, N]`` (float64)."""
    xq, sx = quantize_rows(x, pow2)
    wq, sw = quantize_blocks(w, pow2)
    return blocked_dot(xq, sx, wq, block_scales_per_column(sw, w.shape[1]))


def dgrad(g, wq, sw, pow2=False):
    """``dx = g . w^T``: g in 1 x B tiles along N, the weight's blocks transposed."""
    gq, sg = quantize_rows(g, pow2, floor=GRAD_AMAX_FLOOR)
    return blocked_dot(gq, sg, wq.T, block_scales_per_column(sw.T, wq.shape[0]))


def wgrad(xq, sx, g, pow2=False):
    """``dw = x^T . g``: x dequantised from its 1 x B tiles, then x and g both re-tiled B x 1 along M."""
    xtq, sxt = quantize_rows(dequantize_rows(xq, sx).T, pow2)  # [K, M], tiles along M
    gtq, sgt = quantize_rows(np.asarray(g).astype(np.float32).T, pow2, floor=GRAD_AMAX_FLOOR)  # [N, M]
    return blocked_dot(xtq, sxt, gtq.T, sgt.T)


def linear_grads(x, w, g, pow2=False):
    """``(dx, dw)`` of ``y = x . w`` for cotangent ``g [M, N]`` (float64)."""
    xq, sx = quantize_rows(x, pow2)
    wq, sw = quantize_blocks(w, pow2)
    return dgrad(g, wq, sw, pow2), wgrad(xq, sx, g, pow2)


def _groups(group_sizes):
    ends = np.cumsum(group_sizes)
    return [slice(int(e - c), int(e)) for c, e in zip(group_sizes, ends)]


def ragged_fwd(x, w, group_sizes, pow2=False, w_q=None):
    """Grouped ``y[rows of e] = x[rows of e] . w[e]``; rows past ``sum(group_sizes)`` are zero.
    ``w_q = (wq, sw)`` skips quantising ``w`` (pre-quantised experts)."""
    xq, sx = quantize_rows(x, pow2)
    wq, sw = w_q if w_q is not None else quantize_blocks(w, pow2)
    y = np.zeros((x.shape[0], wq.shape[-1]), np.float64)
    for e, rows in enumerate(_groups(group_sizes)):
        y[rows] = blocked_dot(xq[rows], sx[rows], wq[e], block_scales_per_column(sw[e], wq.shape[-1]))
    return y


def ragged_grads(x, w, group_sizes, g, pow2=False):
    """``(dx, dw)`` of :func:`ragged_fwd`; the weight gradient's tiles are the batch's 128-row tiles (rows
    ``t*128 ..``) split at group boundaries: one tile per (tile, group) overlap."""
    xq, sx = quantize_rows(x, pow2)
    wq, sw = quantize_blocks(w, pow2)
    g = np.asarray(g).astype(np.float32)
    dx = np.zeros(x.shape, np.float64)
    dw = np.zeros(w.shape, np.float64)
    for e, rows in enumerate(_groups(group_sizes)):
        dx[rows] = dgrad(g[rows], wq[e], sw[e], pow2)
        for start in range(rows.start, rows.stop):  # each overlap is one wgrad tile (<= 128 rows)
            if start == rows.start or start % BLOCK == 0:
                piece = slice(start, min(rows.stop, (start // BLOCK + 1) * BLOCK))
                dw[e] += wgrad(xq[piece], sx[piece], g[piece], pow2)
    return dx, dw
