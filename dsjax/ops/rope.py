"""Rotary position embedding on the decoupled key/query part, with YaRN frequency correction.

DeepSeek rotates *adjacent* pairs ``(x[2i], x[2i+1])`` by frequency i (the official code views them as complex
numbers; HF V3's ``rope_interleave``). The layout is kept as is, so weights need no permutation at load time.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import YarnScaling


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    # The dimension whose wavelength fits `num_rotations` times into the original context.
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def inverse_frequencies(dim: int, theta: float, yarn: YarnScaling | None) -> np.ndarray:
    """The ``dim // 2`` rotation frequencies; with YaRN, low frequencies are divided by the factor.

    Frequencies whose index lies below ``floor(fcd(beta_fast))`` keep their value (extrapolation), those above
    ``ceil(fcd(beta_slow))`` are interpolated (divided by ``factor``), with a linear ramp in between
    (YaRN, arXiv 2309.00071; HF ``_compute_yarn_parameters`` with truncate=True).
    """
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    if yarn is None:
        return freqs.astype(np.float32)
    orig = yarn.original_max_position_embeddings
    low = max(math.floor(_correction_dim(yarn.beta_fast, dim, theta, orig)), 0)
    high = min(math.ceil(_correction_dim(yarn.beta_slow, dim, theta, orig)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0.0, 1.0)
    return (freqs / yarn.factor * ramp + freqs * (1.0 - ramp)).astype(np.float32)


def rope_angles(positions: jax.Array, inv_freq: jax.Array, attention_factor: float = 1.0):
    """cos and sin of ``positions[..., None] * inv_freq`` in fp32, times YaRN's cos/sin attention factor."""
    inv_freq = jnp.asarray(inv_freq, jnp.float32).reshape((1,) * positions.ndim + (-1,))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate adjacent pairs of the last axis of ``x [..., t, (h,) r]`` by angles ``cos/sin [b, t, r/2]``.

    ``cos``/``sin`` broadcast over a heads axis when ``x`` has one (``x.ndim == cos.ndim + 1``).
    """
    if x.ndim == cos.ndim + 1:
        cos, sin = cos[..., None, :], sin[..., None, :]
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
