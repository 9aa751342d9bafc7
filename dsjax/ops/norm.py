"""RMSNorm (eps 1e-6 in DeepSeek models)."""

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, *, weight_in_fp32: bool = False) -> jax.Array:
    """``x / rms(x) * weight`` with the statistics in fp32.

    HF casts the normalised activations back to ``x.dtype`` before the weight multiply; DeepSeek's newer
    official code multiplies in fp32 and casts once (``weight_in_fp32=True``). In fp32 both are identical.
    """
    weight = weight.reshape((1,) * (x.ndim - 1) + weight.shape)  # explicit rank (rank promotion is strict)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if weight_in_fp32:
        return (normed * weight.astype(jnp.float32)).astype(x.dtype)
    return weight.astype(x.dtype) * normed.astype(x.dtype)
