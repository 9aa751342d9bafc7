"""Decoder layers and Multi-Token Prediction modules."""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dsjax.config import ModelConfig
from dsjax.layers.common import ATTN_OUT, MLP, config_norm, param
from dsjax.layers.mla import MLA
from dsjax.layers.moe import MoE
from dsjax.ops.routing import Routing
from dsjax.sharding import shard


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``x += attn(attn_norm(x)); x += ffn(ffn_norm(x))`` with a dense MLP or an MoE FFN."""

    def __init__(self, cfg: ModelConfig, *, moe: bool, rngs: nnx.Rngs, param_dtype):
        self.is_moe = moe
        self.attn_norm = config_norm(cfg, cfg.hidden_size, "embed", param_dtype)
        self.attn = MLA(cfg, rngs=rngs, param_dtype=param_dtype)
        self.ffn_norm = config_norm(cfg, cfg.hidden_size, "embed", param_dtype)
        if moe:
            self.ffn = MoE(cfg, rngs=rngs, param_dtype=param_dtype)
        else:
            self.ffn = MLP(
                cfg.hidden_size,
                cfg.intermediate_size,
                "mlp",
                rngs=rngs,
                param_dtype=param_dtype,
                std=cfg.initializer_range,
                fp8=cfg.fp8,
                fp8_weights=cfg.fp8_weights,
            )

    def __call__(self, x_btd, cos, sin, mask_bts, *, attention="naive", dispatch="auto", kv_fn=None):
        """Returns the new hidden state and, for MoE layers, the routing decision (else None).

        ``kv_fn`` is the attention's cache hook (see :meth:`MLA.__call__`); None attends within ``x``.
        """
        attn = self.attn(self.attn_norm(x_btd), cos, sin, mask_bts, attention, kv_fn)
        x_btd = x_btd + checkpoint_name(attn, ATTN_OUT)
        x_btd = shard(x_btd, ("batch", "seq", "act_embed"))
        h = self.ffn_norm(x_btd)
        routing: Routing | None = None
        if self.is_moe:
            h, routing = self.ffn(h, dispatch)
        else:
            h = self.ffn(h)
        return shard(x_btd + h, ("batch", "seq", "act_embed")), routing


class MTPLayer(nnx.Module):
    """One Multi-Token Prediction module k (V3 §2.2) in the layout of the released weights.

    ``h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])`` — embedding first, as the released weights
    are laid out — then a full MoE decoder layer; logits come from the shared output head after ``head_norm``.
    The embedding and output head are the main model's (shared, as in the paper).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype):
        d = cfg.hidden_size
        self.enorm = config_norm(cfg, d, "embed", param_dtype)
        self.hnorm = config_norm(cfg, d, "embed", param_dtype)
        self.eh_proj = param(rngs, (2 * d, d), ("mtp_concat", "embed"), param_dtype, cfg.initializer_range)
        self.layer = DecoderLayer(cfg, moe=True, rngs=rngs, param_dtype=param_dtype)
        self.head_norm = config_norm(cfg, d, "embed", param_dtype)

    def __call__(self, h_prev_btd, emb_next_btd, cos, sin, mask_bts, *, attention="naive", dispatch="auto", kv_fn=None):
        """Returns ``(h^k, normed h^k for the output head, routing)``."""
        x = jnp.concatenate([self.enorm(emb_next_btd), self.hnorm(h_prev_btd)], axis=-1)
        x = x @ self.eh_proj[...].astype(x.dtype)
        h, routing = self.layer(x, cos, sin, mask_bts, attention=attention, dispatch=dispatch, kv_fn=kv_fn)
        return h, self.head_norm(h), routing


def embed_lookup(table_vd: jax.Array, tokens_bt: jax.Array, dtype) -> jax.Array:
    """Embedding gather that yields NaN for out-of-range ids instead of JAX's silent clamping (inside jit the
    ids can't be checked; NaN makes the error visible downstream)."""
    return jnp.take(table_vd.astype(dtype), tokens_bt, axis=0, mode="fill", fill_value=jnp.nan)


__all__ = ["DecoderLayer", "MTPLayer", "embed_lookup", "param"]
