"""MLA's compressed KV cache: per token and layer only the latent ``c_kv`` and the shared rope key ``k_pe``.

Slot ``s`` of a row holds the token at position ``s`` of that row, so writing a token is a scatter at its
position and the causal mask is ``slot <= query position``. Slots past a row's current position may hold stale
values (the padding of a shorter prompt, a rejected speculative draft); they are masked until overwritten.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.sharding import shard

CACHE_AXES = ("layers", "batch", "cache_seq", None)


class KVCache(NamedTuple):
    """Latent cache of a stack of MLA layers: ``c_kv [L, b, S, kv_lora_rank]``, ``k_pe [L, b, S, rope_dim]``.

    Nothing here has a head axis: every head reads the same latent (V2 §2.1.2).
    """

    c_kv: jax.Array
    k_pe: jax.Array

    @property
    def num_slots(self) -> int:
        return self.c_kv.shape[2]

    def write(self, layer, c_kv_btc: jax.Array, k_pe_btr: jax.Array, positions_bt: jax.Array) -> KVCache:
        """Store the latents of tokens at ``positions`` (per row) in ``layer``; positions must be < num_slots."""
        rows = jnp.broadcast_to(jnp.arange(c_kv_btc.shape[0])[:, None], positions_bt.shape)
        c_kv = self.c_kv.at[layer, rows, positions_bt].set(c_kv_btc.astype(self.c_kv.dtype))
        k_pe = self.k_pe.at[layer, rows, positions_bt].set(k_pe_btr.astype(self.k_pe.dtype))
        return KVCache(shard(c_kv, CACHE_AXES), shard(k_pe, CACHE_AXES))

    def read(self, layer, window: int | None = None) -> tuple[jax.Array, jax.Array]:
        """``(c_kv [b, W, c], k_pe [b, W, r])`` of one layer: its first ``window`` slots (default: all)."""
        w = self.num_slots if window is None else window
        return self.c_kv[layer, :, :w], self.k_pe[layer, :, :w]


def init_cache(num_layers: int, batch: int, num_slots: int, cfg: ModelConfig, dtype) -> KVCache:
    """A zeroed cache for ``num_layers`` layers, ``batch`` rows and ``num_slots`` positions."""
    c_kv = jnp.zeros((num_layers, batch, num_slots, cfg.kv_lora_rank), dtype)
    k_pe = jnp.zeros((num_layers, batch, num_slots, cfg.qk_rope_head_dim), dtype)
    return KVCache(shard(c_kv, CACHE_AXES), shard(k_pe, CACHE_AXES))


def cache_values_per_token(cfg: ModelConfig, *, include_mtp: bool = False) -> int:
    """Cached values per token over all layers: ``(kv_lora_rank + qk_rope_head_dim) * layers`` (576 * 61 for V3)."""
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
    return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * layers


def mha_values_per_token(cfg: ModelConfig) -> int:
    """What standard multi-head attention of the same model would cache: ``2 * n_h * d_h * layers`` with d_h the
    value head dim (V2 paper Table 1; 32,768 per layer for V3)."""
    return 2 * cfg.num_attention_heads * cfg.v_head_dim * cfg.num_hidden_layers


def cache_bytes_per_token(cfg: ModelConfig, dtype=jnp.bfloat16, *, include_mtp: bool = False) -> int:
    """Bytes of latent cache per token in ``dtype`` (70,272 for V3 in bf16)."""
    return cache_values_per_token(cfg, include_mtp=include_mtp) * jnp.dtype(dtype).itemsize
