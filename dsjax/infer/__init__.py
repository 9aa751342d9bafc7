"""Inference: the latent KV cache, cached forward passes, sampling, and (speculative) generation."""

from dsjax.infer.cache import (
    KVCache,
    cache_bytes_per_token,
    cache_values_per_token,
    init_cache,
    mha_values_per_token,
)
from dsjax.infer.chat import encode_prompts, generate_text, render_chat
from dsjax.infer.engine import GenerationResult, check_prompts, generate, stream
from dsjax.infer.forward import forward_cached, mtp_cached
from dsjax.infer.sampling import Sampling, log_probs, make_sampling, sample, speculative_accept

__all__ = [
    "GenerationResult",
    "KVCache",
    "Sampling",
    "cache_bytes_per_token",
    "cache_values_per_token",
    "check_prompts",
    "encode_prompts",
    "forward_cached",
    "generate",
    "generate_text",
    "init_cache",
    "log_probs",
    "make_sampling",
    "mha_values_per_token",
    "mtp_cached",
    "render_chat",
    "sample",
    "speculative_accept",
    "stream",
]
