"""The project's own jitted steps built from abstract state: what ``dsjax.aot.compile_step`` compiles.

Each builder returns a :class:`Program`: the jitted function (with the same shardings and donation as the real
run) and abstract arguments (``ShapeDtypeStruct`` with shardings), so any model size lowers without memory.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from dsjax.aot import flops
from dsjax.config import ModelConfig
from dsjax.infer.cache import CACHE_AXES, init_cache
from dsjax.infer.forward import forward_cached
from dsjax.model import abstract_model
from dsjax.sharding import Rules, logical_to_spec, state_shardings
from dsjax.train.config import TrainConfig
from dsjax.train.optim import make_optimizer
from dsjax.train.step import abstract_train_state, jit_train_step, make_train_step

STEPS = ("train", "prefill", "decode", "grpo")


class Program(NamedTuple):
    fn: object  # a jax.jit-wrapped function
    args: tuple  # abstract arguments
    model_flops: float  # what the step must compute (all chips)
    tokens: int  # tokens processed per step (all chips)
    rules: Rules | None = None  # the table the state was placed with (traced under dsjax.sharding.use_mesh)


def _abstract(shape, dtype, mesh: Mesh, names, rules: Rules):
    spec = logical_to_spec(names, rules, mesh, shape)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _train_like(step, state, cfg: ModelConfig, mesh: Mesh, rules: Rules, batch: int, seq: int) -> Program:
    """A pretraining step's `Program`: ``step`` jitted with the state's and a ``[batch, seq]`` batch's shardings."""
    tok = functools.partial(_abstract, (batch, seq), mesh=mesh, names=("batch", None), rules=rules)
    abstract_batch = dict(
        tokens=tok(jnp.int32),
        targets=tok(jnp.int32),
        positions=tok(jnp.int32),
        segment_ids=tok(jnp.int32),
        loss_mask=tok(jnp.bool_),
    )
    fn = jit_train_step(
        step,
        jax.tree.map(lambda x: x.sharding, state),
        jax.tree.map(lambda x: x.sharding, abstract_batch),
    )
    model_flops = flops.train_flops(cfg, batch, seq, mtp=cfg.num_nextn_predict_layers > 0)
    return Program(fn, (state, abstract_batch), model_flops, batch * seq, rules)


def train_program(cfg: ModelConfig, tc: TrainConfig, mesh: Mesh, rules: Rules, *, batch: int, seq: int) -> Program:
    """The pretraining step of ``dsjax.train`` (fp32 master weights and AdamW moments sharded like them)."""
    graphdef, state, tx = abstract_train_state(
        cfg, functools.partial(make_optimizer, tc), mesh, rules, dtype=jnp.dtype(tc.compute_dtype)
    )
    step = make_train_step(graphdef, cfg, tc, tx)
    return _train_like(step, state, cfg, mesh, rules, batch, seq)


def pipelined_train_program(
    cfg: ModelConfig, tc: TrainConfig, mesh: Mesh, rules: Rules, schedule, *, batch: int, seq: int
) -> Program:
    """The pipelined pretraining step of ``dsjax.pipeline`` (``schedule`` over the mesh's ``stage`` axis; the
    layer stack and its moments sharded over ``stage``), with the same state and batch as `train_program`."""
    from dsjax.pipeline.train import make_pipeline_train_step

    tc = dataclasses.replace(tc, batch_size=batch, seq_len=seq)
    graphdef, state, tx = abstract_train_state(
        cfg, functools.partial(make_optimizer, tc), mesh, rules, dtype=jnp.dtype(tc.compute_dtype)
    )
    step = make_pipeline_train_step(graphdef, cfg, tc, tx, schedule, mesh)
    return _train_like(step, state, cfg, mesh, rules, batch, seq)


def _inference_state(cfg: ModelConfig, mesh: Mesh, rules: Rules, dtype):
    graphdef, state = nnx.split(abstract_model(cfg, dtype=dtype, param_dtype=dtype))
    shardings = state_shardings(state, mesh, rules)
    state = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state, shardings)
    return graphdef, state


def _abstract_cache(cfg: ModelConfig, mesh: Mesh, rules: Rules, batch: int, slots: int, dtype):
    cache = jax.eval_shape(lambda: init_cache(cfg.num_hidden_layers, batch, slots, cfg, dtype))
    return jax.tree.map(lambda x: _abstract(x.shape, x.dtype, mesh, CACHE_AXES, rules), cache)


def prefill_program(
    cfg: ModelConfig,
    mesh: Mesh,
    rules: Rules,
    *,
    batch: int,
    seq: int,
    dispatch: str = "auto",
    attention: str = "auto",
    dtype=jnp.bfloat16,
) -> Program:
    """A fresh prompt of ``seq`` tokens per row into a latent cache of ``seq`` slots; returns the last logits."""
    graphdef, state = _inference_state(cfg, mesh, rules, dtype)

    def prefill(state, tokens_bt):
        model = nnx.merge(graphdef, state)
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), tokens_bt.shape)
        cache = init_cache(cfg.num_hidden_layers, batch, seq, cfg, dtype)
        logits, _, cache = forward_cached(
            model, tokens_bt, positions, cache, fresh=True, attention=attention, dispatch=dispatch
        )
        return logits[:, -1], cache

    tokens = _abstract((batch, seq), jnp.int32, mesh, ("batch", None), rules)
    cache_shardings = jax.tree.map(lambda x: x.sharding, _abstract_cache(cfg, mesh, rules, batch, seq, dtype))
    fn = jax.jit(prefill, out_shardings=(None, cache_shardings))
    return Program(fn, (state, tokens), flops.prefill_flops(cfg, batch, seq), batch * seq, rules)


def decode_program(
    cfg: ModelConfig, mesh: Mesh, rules: Rules, *, batch: int, context: int, dispatch: str = "auto", dtype=jnp.bfloat16
) -> Program:
    """One decode step: a token per row attending (absorbed MLA) over a latent cache of ``context`` slots,
    cache updated in place (donated). ``cfg.fp8_weights`` stores the weights in E4M3 with block scales."""
    graphdef, state = _inference_state(cfg, mesh, rules, dtype)
    cache = _abstract_cache(cfg, mesh, rules, batch, context, dtype)

    def decode(state, cache, tokens_b1, positions_b1):
        model = nnx.merge(graphdef, state)
        logits, _, cache = forward_cached(
            model, tokens_b1, positions_b1, cache, fresh=False, attention="absorbed", dispatch=dispatch
        )
        return logits[:, 0], cache

    token = _abstract((batch, 1), jnp.int32, mesh, ("batch", None), rules)
    fn = jax.jit(decode, donate_argnums=1, out_shardings=(None, jax.tree.map(lambda x: x.sharding, cache)))
    return Program(fn, (state, cache, token, token), flops.decode_flops(cfg, batch, context), batch, rules)


def grpo_program(
    cfg: ModelConfig, gc, tc: TrainConfig, mesh: Mesh, rules: Rules, *, batch: int, seq: int, seqs_per_row: int = 2
) -> Program:
    """The GRPO update of ``dsjax.rl`` (:func:`dsjax.rl.step.make_grpo_step`) on a packed rollout batch of
    ``batch`` rows x ``seq`` tokens holding ``seqs_per_row`` completions each: policy forward and backward with
    the pretraining step's dispatch, attention, remat and chunked output head (``tc.loss_chunk``), the AdamW
    update of the train step's optimizer; old / reference log-prob inputs when ``gc.mu > 1`` / ``gc.beta > 0``,
    and the sampler's log-probs (the trainer always passes them). ``gc`` is a :class:`dsjax.rl.GRPOConfig`."""
    from dsjax.rl.step import make_grpo_step

    graphdef, state, tx = abstract_train_state(
        cfg, functools.partial(make_optimizer, tc), mesh, rules, dtype=jnp.dtype(tc.compute_dtype)
    )
    num_seqs = batch * seqs_per_row
    rows = functools.partial(_abstract, (batch, seq), mesh=mesh, names=("batch", None), rules=rules)
    abstract_batch = {k: rows(jnp.int32) for k in ("tokens", "targets", "positions", "segment_ids", "seq")}
    abstract_batch["sampler_logp"] = rows(jnp.float32)
    if gc.mu > 1:
        abstract_batch["old_logp"] = rows(jnp.float32)
    if gc.beta > 0:
        abstract_batch["ref_logp"] = rows(jnp.float32)
    abstract_batch["advantages"] = _abstract((num_seqs,), jnp.float32, mesh, (None,), rules)
    options = dict(dispatch=tc.dispatch, attention=tc.attention, remat=tc.remat, layers=tc.layers)
    fn = make_grpo_step(
        graphdef,
        gc,
        tx,
        num_seqs,
        temperature=gc.temperature,
        logprob_chunk=tc.loss_chunk,
        forward_options=options,
        state_shardings=jax.tree.map(lambda x: x.sharding, state),
        batch_shardings=jax.tree.map(lambda x: x.sharding, abstract_batch),
    )
    # The policy's forward and backward (no MTP loss in RL); the old / reference passes run outside this step.
    model_flops = flops.train_flops(cfg, batch, seq, mtp=False)
    return Program(fn, (state, abstract_batch), model_flops, batch * seq, rules)
