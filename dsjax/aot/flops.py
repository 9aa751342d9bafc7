"""Model flops: what a step must compute, independent of how it is compiled (for MFU and waste ratios)."""

from __future__ import annotations

import math

from flax import nnx

from dsjax.config import ModelConfig
from dsjax.model import abstract_model

_EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def active_matmul_params(cfg: ModelConfig, *, mtp: bool = False) -> float:
    """Weights each token multiplies by in one forward pass: every projection, the router, the shared experts
    and ``k`` of the ``E`` routed experts, the output head (once more per MTP module with ``mtp``); the embedding
    table (a lookup) and norm scales excluded. Counted from the model's own parameter shapes."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    total = 0.0
    for path, var in nnx.to_flat_state(state):
        names = [str(p) for p in path]
        axes = var.get_metadata().get("logical_axes") or ()
        shape = var.get_value().shape
        if names[0] == "embed" or (names[0] == "mtp" and not mtp):
            continue
        if len(shape) - ("layers" in axes or "pipeline_layers" in axes) <= 1:  # norm scales
            continue
        size = float(math.prod(shape))
        if names[-1] in _EXPERT_WEIGHTS and "experts" in axes:
            size *= cfg.num_experts_per_tok / cfg.n_routed_experts
        if names[0] == "lm_head" and mtp:
            size *= 1 + cfg.num_nextn_predict_layers
        total += size
    return total


def attention_flops(cfg: ModelConfig, batch: int, q_len: int, kv_len: int | None = None, *, layers: int) -> float:
    """Forward flops of the attention cores (scores and weighted values) over ``layers`` layers.

    A full causal sequence (``kv_len`` None) has ``t (t + 1) / 2`` query-key pairs; ``q_len`` new tokens after
    ``kv_len - q_len`` cached ones have ``q_len * kv_len`` (minus the causal triangle of the new ones).
    """
    h = cfg.num_attention_heads
    pairs = q_len * (q_len + 1) / 2 if kv_len is None else q_len * kv_len - q_len * (q_len - 1) / 2
    return 2.0 * batch * pairs * h * (cfg.qk_head_dim + cfg.v_head_dim) * layers


def train_flops(cfg: ModelConfig, batch: int, seq: int, *, mtp: bool = True) -> float:
    """Model flops of one training step: ``6 x active params x tokens`` plus 3x the causal attention forward
    (forward + two backward products), MTP modules included when the model has them and ``mtp``."""
    mtp = mtp and cfg.num_nextn_predict_layers > 0
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
    return 6.0 * active_matmul_params(cfg, mtp=mtp) * batch * seq + 3.0 * attention_flops(
        cfg, batch, seq, layers=layers
    )


def prefill_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
    """Forward flops of a prompt of ``seq`` tokens per row (no MTP)."""
    return 2.0 * active_matmul_params(cfg) * batch * seq + attention_flops(
        cfg, batch, seq, layers=cfg.num_hidden_layers
    )


def decode_flops(cfg: ModelConfig, batch: int, context: int) -> float:
    """Flops of one decode step (one new token per row over ``context`` cached ones) in the absorbed MLA form:
    scores against the latent (``c + r`` per head) and the latent-space weighted sum (``c`` per head)."""
    c, r = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    attn = 2.0 * batch * context * cfg.num_attention_heads * (2 * c + r) * cfg.num_hidden_layers
    return 2.0 * active_matmul_params(cfg) * batch + attn


def param_bytes(cfg: ModelConfig, itemsize: float) -> float:
    """All parameters (main model, no MTP) at ``itemsize`` bytes each."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    return itemsize * sum(math.prod(v.get_value().shape) for p, v in nnx.to_flat_state(state) if str(p[0]) != "mtp")
