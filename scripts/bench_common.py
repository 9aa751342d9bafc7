"""Shared pieces of the benchmark modes: the model presets, the mode registry, timing and HF helpers."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import dsjax
from dsjax.runtime import active_allocator

REL_TOL = 1e-4  # max |dsjax - hf| / max |hf|, as in the parity tests

# HF DeepseekV3Config keyword arguments of the preset model sizes (V3 routing: sigmoid, noaux_tc).
_COMMON = dict(n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=4096,
               num_nextn_predict_layers=0, pad_token_id=None, bos_token_id=0, eos_token_id=1)  # fmt: skip
CONFIGS: dict[str, dict] = {
    "tiny": dict(_COMMON, vocab_size=1024, hidden_size=64, num_attention_heads=4, kv_lora_rank=32,
                 q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                 intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4, n_routed_experts=8,
                 num_experts_per_tok=2, n_group=4, topk_group=2),
    "small": dict(_COMMON, vocab_size=4096, hidden_size=256, num_attention_heads=8, kv_lora_rank=64,
                  q_lora_rank=96, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                  intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=6, n_routed_experts=16,
                  num_experts_per_tok=4, n_group=4, topk_group=2),
}  # fmt: skip

# HF (attn, experts) implementations to try; experts "batched_mm" is left out: 30-45x slower on CPU (measured)
HF_IMPLS = [(a, e) for a in ("sdpa", "eager") for e in ("eager", "grouped_mm")]


class Mode(NamedTuple):
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict]


MODES: dict[str, Mode] = {}


def register(name: str, help: str, add_args: Callable[[argparse.ArgumentParser], None]):
    """Decorator: register ``run(args) -> dict`` as the subcommand ``name`` with its own arguments."""

    def wrap(run):
        MODES[name] = Mode(help, add_args, run)
        return run

    return wrap


# ---- shared helpers ----------------------------------------------------------------------------------------
def machine_info() -> dict:
    import torch

    return dict(cpu_count=os.cpu_count(), processor=platform.processor() or platform.machine(),
                jax=jax.__version__, jax_device=str(jax.devices()[0]), torch=torch.__version__,
                allocator=active_allocator(),
                loadavg_1min=round(os.getloadavg()[0], 2))  # fmt: skip


def time_calls(fns: dict[str, Callable[[], object]], iters: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall times of ``iters`` calls of each ``fn()``, after ``warmup`` untimed calls of each.

    Calls are interleaved round-robin, so load from other processes on the machine hits all of them alike.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def make_hf(config: str, seed: int):
    """A random float32 HF DeepseekV3ForCausalLM of preset ``config``, with a non-zero routing bias."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    kw = dict(CONFIGS[config])
    kw["num_key_value_heads"] = kw["num_attention_heads"]
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**kw)).float().eval()
    with torch.no_grad():  # HF starts the bias at 0; let it steer selection as in trained checkpoints
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn_like(buf))
    return model


def load_same_weights(hf_model):
    """The dsjax model with ``hf_model``'s weights, through an HF safetensors checkpoint in a temp dir."""
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        return dsjax.from_pretrained(tmp, dtype=jnp.float32)


def print_table(header: tuple, rows: list[tuple]) -> None:
    cells = [tuple(str(c) for c in r) for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for n, r in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
