"""Tiny random DeepSeek checkpoints made with HF transformers (no hub access needed)."""

from __future__ import annotations

import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}

BASE = dict(
    vocab_size=96,
    hidden_size=48,
    intermediate_size=80,
    moe_intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=12,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=128,
    initializer_range=0.1,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=None,
)

# name -> (model class, config overrides). Together they cover q_lora on/off, greedy / group-limited / noaux_tc
# routing (with a non-zero correction bias), YaRN with mscale == and != mscale_all_dim, dense-then-MoE layers.
CASES = {
    "v3_qlora_yarn": ("v3", dict(q_lora_rank=24, n_group=4, topk_group=2, rope_scaling=YARN)),
    "v3_noqlora_plain": (
        "v3",
        dict(
            q_lora_rank=None,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=2,
            n_shared_experts=2,
            routed_scaling_factor=1.5,
        ),
    ),
    "v3_ungrouped": (
        "v3",
        dict(
            q_lora_rank=24,
            n_group=1,
            topk_group=1,
            num_experts_per_tok=3,
            norm_topk_prob=False,
            rope_scaling=dict(YARN, mscale_all_dim=0.707, mscale=0.707),
        ),
    ),
    "v2_greedy_yarn": (
        "v2",
        dict(
            q_lora_rank=None,
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            n_shared_experts=2,
            rope_scaling=dict(YARN, mscale=1.0, mscale_all_dim=0.707),
        ),
    ),
    "v2_group_limited": (
        "v2",
        dict(
            q_lora_rank=24,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            max_position_embeddings=256,
            routed_scaling_factor=2.0,
            rope_scaling=dict(YARN, factor=8.0),
        ),
    ),
}


def make_hf_model(case: str, seed: int = 0, **overrides):
    """A randomly initialised HF model for ``case`` with non-trivial norms and routing bias."""
    family, kw = CASES[case]
    kw = {**BASE, **kw, **overrides}
    torch.manual_seed(seed)
    if family == "v3":
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**kw))
    else:
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norms start at 1.0; perturb them so a misplaced norm weight shows
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return model.eval()


def save_hf(model, directory) -> str:
    model.save_pretrained(directory, safe_serialization=True)
    return str(directory)


def hf_logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits
