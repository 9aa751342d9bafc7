"""Multi-head Latent Attention parameters (V2 §2.1, V3 eqs 1-11)."""

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.config import ModelConfig
from dsjax.layers.common import config_norm, param
from dsjax.ops.attention import mla_absorbed, mla_naive
from dsjax.ops.rope import apply_rope

ATTENTION_IMPLS = ("naive", "absorbed")


class MLA(nnx.Module):
    """Queries through an optional low-rank bottleneck, keys/values through the compressed latent c_KV.

    Weights (``[in, out]`` layout): ``wq [d, h, n+r]`` or ``wq_a [d, q]`` + ``q_norm`` + ``wq_b [q, h, n+r]``;
    ``wkv_a [d, c+r]`` (latent, then the shared RoPE key), ``kv_norm [c]``, ``wkv_b [c, h, n+v]``, ``wo [h, v, d]``.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype):
        d, h, std = cfg.hidden_size, cfg.num_attention_heads, cfg.initializer_range
        self.nope_dim, self.rope_dim, self.kv_rank = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        self.compress_q = cfg.q_lora_rank is not None
        if not self.compress_q:
            self.wq = param(rngs, (d, h, cfg.qk_head_dim), ("embed", "heads", "qk_head"), param_dtype, std)
        else:
            self.wq_a = param(rngs, (d, cfg.q_lora_rank), ("embed", "q_lora"), param_dtype, std)
            self.q_norm = config_norm(cfg, cfg.q_lora_rank, "q_lora", param_dtype)
            self.wq_b = param(
                rngs, (cfg.q_lora_rank, h, cfg.qk_head_dim), ("q_lora", "heads", "qk_head"), param_dtype, std
            )
        self.wkv_a = param(rngs, (d, cfg.kv_lora_rank + cfg.qk_rope_head_dim), ("embed", "kv_lora"), param_dtype, std)
        self.kv_norm = config_norm(cfg, cfg.kv_lora_rank, "kv_lora", param_dtype)
        self.wkv_b = param(
            rngs,
            (cfg.kv_lora_rank, h, cfg.qk_nope_head_dim + cfg.v_head_dim),
            ("kv_lora", "heads", "kv_head"),
            param_dtype,
            std,
        )
        self.wo = param(rngs, (h, cfg.v_head_dim, d), ("heads", "v_head", "embed"), param_dtype, std)

    def query(self, x_btd, cos, sin):
        """``q_nope [b, t, h, n]`` and rotated ``q_pe [b, t, h, r]``."""
        if not self.compress_q:
            q = jnp.einsum("btd,dhx->bthx", x_btd, self.wq[...].astype(x_btd.dtype))
        else:
            c_q = self.q_norm(x_btd @ self.wq_a[...].astype(x_btd.dtype))
            q = jnp.einsum("btq,qhx->bthx", c_q, self.wq_b[...].astype(x_btd.dtype))
        return q[..., : self.nope_dim], apply_rope(q[..., self.nope_dim :], cos, sin)

    def latent(self, x_btd, cos, sin):
        """What MLA caches per token: normalised ``c_kv [b, t, c]`` and rotated ``k_pe [b, t, r]``."""
        kv_a = x_btd @ self.wkv_a[...].astype(x_btd.dtype)
        return self.kv_norm(kv_a[..., : self.kv_rank]), apply_rope(kv_a[..., self.kv_rank :], cos, sin)

    def attend(self, q_nope, q_pe, c_kv, k_pe, mask_bts, impl: str = "naive") -> jax.Array:
        """Attention of the queries over (possibly cached) latents, through the output projection."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention={impl!r}; choose one of {ATTENTION_IMPLS}")
        core = mla_naive if impl == "naive" else mla_absorbed
        wkv_b = self.wkv_b[...].astype(q_nope.dtype)
        out = core(q_nope, q_pe, c_kv, k_pe, wkv_b, mask_bts, self.scale, nope_dim=self.nope_dim)
        return jnp.einsum("bthv,hvd->btd", out, self.wo[...].astype(out.dtype))

    def __call__(self, x_btd, cos, sin, mask_bts, impl: str = "naive", kv_fn=None):
        """Self-attention of ``x``. With ``kv_fn(c_kv, k_pe) -> (c_kv, k_pe)`` (decoding), the new latents go
        through it first, which stores them in a cache and returns the latents to attend over; ``mask_bts``
        must then match what it returns."""
        q_nope, q_pe = self.query(x_btd, cos, sin)
        c_kv, k_pe = self.latent(x_btd, cos, sin)
        if kv_fn is not None:
            c_kv, k_pe = kv_fn(c_kv, k_pe)
        return self.attend(q_nope, q_pe, c_kv, k_pe, mask_bts, impl)
