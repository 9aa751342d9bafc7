"""Multi-head Latent Attention parameters (V2 §2.1, V3 eqs 1-11)."""

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.config import ModelConfig
from dsjax.layers.common import (
    config_norm,
    float_weight,
    gathered_on_gpu,
    project,
    projection,
    weight_and_scale,
    weight_axes,
)
from dsjax.ops import flash_attention
from dsjax.ops.attention import AttentionMask, mla_absorbed, mla_naive
from dsjax.ops.rope import apply_rope
from dsjax.sharding import active_platform

# naive: per-head keys/values, dense [b, h, t, s] scores (fastest on CPU at short lengths); absorbed: attention in
# the latent space (decoding); xla: flash attention in plain XLA (O(t) memory, any backend); splash: JAX's
# Pallas splash kernel (TPU); auto: naive on CPU, splash on TPU (self-attention), else xla.
ATTENTION_IMPLS = ("auto", "naive", "absorbed", "xla", "splash")


def resolve_attention(impl: str, q_len: int, kv_len: int) -> str:
    """The attention form ``impl`` stands for under the active mesh's platform (see ``ATTENTION_IMPLS``)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention={impl!r}; choose one of {ATTENTION_IMPLS}")
    if impl == "auto":
        return "naive" if active_platform() == "cpu" else flash_attention.resolve_impl("auto", q_len, kv_len)
    return impl


class MLA(nnx.Module):
    """Queries through an optional low-rank bottleneck, keys/values through the compressed latent c_KV.

    Weights (``[in, out]`` layout): ``wq [d, h, n+r]`` or ``wq_a [d, q]`` + ``q_norm`` + ``wq_b [q, h, n+r]``;
    ``wkv_a [d, c+r]`` (latent, then the shared RoPE key), ``kv_norm [c]``, ``wkv_b [c, h, n+v]``, ``wo [h, v, d]``.
    With ``cfg.fp8`` every projection is a fine-grained FP8 GEMM; the attention core (scores, softmax, the
    absorbed form's products with ``wkv_b``) stays in the compute dtype, as in DeepSeek-V3. With
    ``cfg.fp8_weights`` each projection ``w`` is stored in E4M3 with its block scales ``w_scale``.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype):
        d, h, std = cfg.hidden_size, cfg.num_attention_heads, cfg.initializer_range
        self.nope_dim, self.rope_dim, self.kv_rank = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        self.compress_q = cfg.q_lora_rank is not None
        self.fp8 = cfg.fp8

        def make(shape, axes, n_in=1):
            return projection(rngs, shape, axes, param_dtype, std, n_in=n_in, fp8_weights=cfg.fp8_weights)

        if not self.compress_q:
            self.wq, self.wq_scale = make((d, h, cfg.qk_head_dim), ("embed", "heads", "qk_head"))
        else:
            self.wq_a, self.wq_a_scale = make((d, cfg.q_lora_rank), ("embed", "q_lora"))
            self.q_norm = config_norm(cfg, cfg.q_lora_rank, "q_lora", param_dtype)
            self.wq_b, self.wq_b_scale = make((cfg.q_lora_rank, h, cfg.qk_head_dim), ("q_lora", "heads", "qk_head"))
        self.wkv_a, self.wkv_a_scale = make((d, cfg.kv_lora_rank + cfg.qk_rope_head_dim), ("embed", "kv_lora"))
        self.kv_norm = config_norm(cfg, cfg.kv_lora_rank, "kv_lora", param_dtype)
        self.wkv_b, self.wkv_b_scale = make(
            (cfg.kv_lora_rank, h, cfg.qk_nope_head_dim + cfg.v_head_dim), ("kv_lora", "heads", "kv_head")
        )
        self.wo, self.wo_scale = make((h, cfg.v_head_dim, d), ("heads", "v_head", "embed"), n_in=2)

    def _project(self, x, name: str, n_in: int = 1):
        return project(x, *weight_and_scale(self, name), n_in=n_in, fp8=self.fp8, axes=weight_axes(self, name))

    def query(self, x_btd, cos, sin):
        """``q_nope [b, t, h, n]`` and rotated ``q_pe [b, t, h, r]``."""
        if not self.compress_q:
            q = self._project(x_btd, "wq")
        else:
            q = self._project(self.q_norm(self._project(x_btd, "wq_a")), "wq_b")
        return q[..., : self.nope_dim], apply_rope(q[..., self.nope_dim :], cos, sin)

    def latent(self, x_btd, cos, sin):
        """What MLA caches per token: normalised ``c_kv [b, t, c]`` and rotated ``k_pe [b, t, r]``."""
        kv_a = self._project(x_btd, "wkv_a")
        return self.kv_norm(kv_a[..., : self.kv_rank]), apply_rope(kv_a[..., self.kv_rank :], cos, sin)

    def attend(self, q_nope, q_pe, c_kv, k_pe, mask, impl: str = "naive") -> jax.Array:
        """Attention of the queries over (possibly cached) latents, through the output projection.

        ``mask``: an :class:`~dsjax.ops.attention.AttentionMask` (positions and segments; every form) or a
        dense ``[b, t, s]`` boolean mask (``naive`` and ``absorbed`` only)."""
        impl = resolve_attention(impl, q_nope.shape[1], c_kv.shape[1])
        # In FP8 training the expanded forms' key/value up-projection is a Linear like the others (DeepSeek-V3);
        # the absorbed form folds wkv_b into the attention core, which stays in the compute dtype.
        expand = (lambda c: self._project(c, "wkv_b")) if self.fp8 is not None and impl != "absorbed" else None
        if expand is None:
            wkv_b = float_weight(*weight_and_scale(self, "wkv_b"), q_nope.dtype, n_in=1)
            wkv_b = gathered_on_gpu(wkv_b, weight_axes(self, "wkv_b"))
        else:
            wkv_b = None
        if impl in ("naive", "absorbed"):
            dense = mask.dense() if isinstance(mask, AttentionMask) else mask
            args = (q_nope, q_pe, c_kv, k_pe, wkv_b, dense, self.scale)
            if impl == "naive":
                out = mla_naive(*args, nope_dim=self.nope_dim, expand=expand)
            else:
                out = mla_absorbed(*args, nope_dim=self.nope_dim)
            return self._project(out, "wo", n_in=2)
        if not isinstance(mask, AttentionMask):
            raise ValueError(f"attention={impl!r} needs an AttentionMask (positions and segments), not a dense mask")
        # Per-head keys [b, s, h, n + r] (the shared rope key broadcast over heads) and values [b, s, h, v].
        kv = jnp.einsum("bsc,chx->bshx", c_kv, wkv_b) if expand is None else expand(c_kv)
        b, s_len, h = kv.shape[:3]
        k = jnp.concatenate(
            [kv[..., : self.nope_dim], jnp.broadcast_to(k_pe[:, :, None], (b, s_len, h, k_pe.shape[-1]))], axis=-1
        )
        out = flash_attention.attention(
            jnp.concatenate([q_nope, q_pe], axis=-1),
            k,
            kv[..., self.nope_dim :],
            q_positions_bt=mask.q_positions,
            kv_positions_bs=mask.kv_positions,
            q_segments_bt=mask.q_segments,
            kv_segments_bs=mask.kv_segments,
            scale=self.scale,
            impl=impl,
        )
        return self._project(out, "wo", n_in=2)

    def __call__(self, x_btd, cos, sin, mask_bts, impl: str = "naive", kv_fn=None):
        """Self-attention of ``x``. With ``kv_fn(c_kv, k_pe) -> (c_kv, k_pe)`` (decoding), the new latents go
        through it first, which stores them in a cache and returns the latents to attend over; ``mask_bts``
        must then match what it returns."""
        q_nope, q_pe = self.query(x_btd, cos, sin)
        c_kv, k_pe = self.latent(x_btd, cos, sin)
        if kv_fn is not None:
            c_kv, k_pe = kv_fn(c_kv, k_pe)
        return self.attend(q_nope, q_pe, c_kv, k_pe, mask_bts, impl)
