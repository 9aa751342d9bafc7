"""AdamW with warmup + cosine schedule, global-norm clipping, and no weight decay on norm weights."""

from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import nnx

from dsjax.train.config import TrainConfig


def learning_rate(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine to ``lr * min_lr_ratio``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def decay_mask(params: nnx.State):
    """True for weights that get weight decay: everything but RMSNorm scales (named ``weight``). The routing
    bias is not an ``nnx.Param`` and never reaches the optimizer."""
    return nnx.map_state(lambda path, v: v.replace(path[-1] != "weight"), params)


def make_optimizer(cfg: TrainConfig, params: nnx.State) -> optax.GradientTransformation:
    """``clip_by_global_norm(grad_clip)`` then AdamW(b1, b2, weight_decay); first moments in
    ``moment_dtype`` (bf16 halves their memory, as DeepSeek-V3 does; second moments stay fp32)."""
    mask = decay_mask(params)
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(
            learning_rate(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=1e-8,
            weight_decay=cfg.weight_decay,
            mu_dtype=jnp.dtype(cfg.moment_dtype),
            mask=mask,
        ),
    )
