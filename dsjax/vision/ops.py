"""The vision tower's and projector's math as pure functions on arrays.

Shapes: b batch (images or tiles), y / x image rows / columns in pixels, c channels, p patch side, g / w patch-grid
rows / columns, t tokens (g * w), d width, h heads, k head dim, f MLP width. Images are channels-last
(``[b, y, x, c]``); the tower's tokens are the patch grid flattened row-major, as in HF's ``SiglipVisionModel``.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np


def patch_embed(pixels_byxc: jax.Array, w_ppcd: jax.Array, b_d: jax.Array) -> jax.Array:
    """Non-overlapping ``p x p`` patches projected to ``d``: the stride-p convolution as one matmul.

    Returns ``[b, y // p, x // p, d]``. The weight is ``[p_row, p_col, c, d]`` (HF's ``Conv2d`` ``[d, c, p, p]``
    transposed). Like the unpadded convolution, the last ``y % p`` rows and ``x % p`` columns are ignored
    (384 px at p = 14: 27 patches, 6 pixels dropped).
    """
    b, y, x, c = pixels_byxc.shape
    p = w_ppcd.shape[0]
    g, w = y // p, x // p
    patches = pixels_byxc[:, : g * p, : w * p].reshape(b, g, p, w, p, c)
    out = jnp.einsum("bgiwjc,ijcd->bgwd", patches, w_ppcd.astype(pixels_byxc.dtype))
    return out + b_d.astype(out.dtype)[None, None, None, :]


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel with PyTorch's ``a = -0.75`` (``jax.image`` uses -0.5)."""
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` weights of PyTorch's 1-D bicubic resize with ``align_corners=False`` and no antialias.

    Source coordinate ``(i + 0.5) * n_in / n_out - 0.5`` (not clamped, as torch does for cubic), the four
    neighbours' indices clamped to the border. ``n_in == n_out`` gives the identity.
    """
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src)
    frac = src - base
    m = np.zeros((n_out, n_in), np.float64)
    for offset in (-1, 0, 1, 2):
        idx = np.clip(base + offset, 0, n_in - 1).astype(np.int64)
        np.add.at(m, (np.arange(n_out), idx), _cubic(frac - offset))
    return m.astype(np.float32)


def position_embeddings(pos_td: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """The learned ``[n*n, d]`` position table for a ``grid = (g, w)`` patch grid, as ``[g, w, d]``.

    At the native ``n x n`` grid it is the table itself; otherwise the table is resized as a 2-D image with
    bicubic interpolation, exactly as HF's ``SiglipVisionEmbeddings.interpolate_pos_encoding``
    (``F.interpolate(mode="bicubic", align_corners=False)``), separably: rows then columns.
    """
    n = math.isqrt(pos_td.shape[0])
    table = pos_td.reshape(n, n, pos_td.shape[-1])
    if tuple(grid) == (n, n):
        return table
    rows = jnp.asarray(bicubic_matrix(n, grid[0]))
    cols = jnp.asarray(bicubic_matrix(n, grid[1]))
    return jnp.einsum("gi,wj,ijd->gwd", rows, cols, table.astype(jnp.float32)).astype(pos_td.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis, statistics in fp32 (biased var)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + eps)
    lead = (1,) * (x.ndim - 1)
    return (normed * scale.astype(jnp.float32).reshape(*lead, -1) + bias.astype(jnp.float32).reshape(*lead, -1)).astype(
        x.dtype
    )


def linear(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """``x [..., i] . w [i, o] + b [o]``."""
    y = jnp.tensordot(x, w.astype(x.dtype), axes=1)
    return y + b.astype(y.dtype).reshape((1,) * (y.ndim - 1) + b.shape)


def attention(x_btd: jax.Array, wq, bq, wk, bk, wv, bv, wo, bo) -> jax.Array:
    """Bidirectional multi-head self-attention over all tokens (no mask), softmax in fp32.

    ``wq/wk/wv``: ``[d, h, k]`` with biases ``[h, k]``; ``wo``: ``[h, k, d]`` with bias ``[d]``; logits scaled
    by ``k ** -0.5``.
    """
    dt = x_btd.dtype

    def heads(w, b):
        return jnp.einsum("btd,dhk->bthk", x_btd, w.astype(dt)) + b.astype(dt)[None, None]

    q, k, v = heads(wq, bq), heads(wk, bk), heads(wv, bv)
    logits = jnp.einsum("bthk,bshk->bhts", q, k).astype(jnp.float32) * wq.shape[-1] ** -0.5
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    out = jnp.einsum("bhts,bshk->bthk", probs, v)
    return jnp.einsum("bthk,hkd->btd", out, wo.astype(dt)) + bo.astype(dt)[None, None]


def mlp(x: jax.Array, w1, b1, w2, b2, *, approximate: bool) -> jax.Array:
    """``fc2(gelu(fc1(x)))``; ``approximate`` selects the tanh GELU (SigLIP's ``gelu_pytorch_tanh``)."""
    return linear(jax.nn.gelu(linear(x, w1, b1), approximate=approximate), w2, b2)


def pixel_shuffle(x_bgwd: jax.Array, ratio: int) -> jax.Array:
    """Concatenate each ``ratio x ratio`` block of tokens into one: ``[b, g, w, d] -> [b, g', w', d * ratio**2]``.

    DeepSeek-VL2's ``downsample_mlp_gelu``: the grid is zero-padded at the bottom and right to multiples of
    ``ratio`` (27 -> 28), then ``F.unfold(kernel=stride=ratio)``, whose output channel ``c * ratio**2 + i * ratio
    + j`` holds channel ``c`` of the block's token at row ``i``, column ``j``: channel-major, then row, then column.
    """
    b, g, w, d = x_bgwd.shape
    pad_g, pad_w = -g % ratio, -w % ratio
    x = jnp.pad(x_bgwd, ((0, 0), (0, pad_g), (0, pad_w), (0, 0)))
    g2, w2 = (g + pad_g) // ratio, (w + pad_w) // ratio
    x = x.reshape(b, g2, ratio, w2, ratio, d).transpose(0, 1, 3, 5, 2, 4)  # [b, g', w', d, i, j]
    return x.reshape(b, g2, w2, d * ratio * ratio)


def gather_image_tokens(tiles_ntd: jax.Array, newline_d: jax.Array, separator_d: jax.Array, source) -> jax.Array:
    """Lay out one image's projected tiles with DeepSeek-VL2's special embeddings: ``[len(source), d]``.

    ``source[i]`` indexes the rows of ``concat(tiles.reshape(-1, d), newline, separator)``, as built by
    :func:`dsjax.vision.processing.image_layout` (``ImageLayout.source``).
    """
    d = tiles_ntd.shape[-1]
    table = jnp.concatenate(
        [tiles_ntd.reshape(-1, d), newline_d[None].astype(tiles_ntd.dtype), separator_d[None].astype(tiles_ntd.dtype)]
    )
    return jnp.take(table, jnp.asarray(source), axis=0)
