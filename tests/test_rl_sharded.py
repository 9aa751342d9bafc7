"""The GRPO update at scale: log-probs a chunk of positions at a time, or the head at completion targets only,
== whole logits; and the update on 8 simulated devices (data x expert, FSDP, explicit state and batch shardings)
== the single-device update."""

import dataclasses

import chex
import jax
import numpy as np
import optax
import pytest
from flax import nnx

import dsjax
from dsjax.rl import GRPOConfig
from dsjax.rl.step import build_batch, make_grpo_step, make_logprob_fn
from dsjax.sharding import FSDP_RULES, make_mesh
from dsjax.train.step import init_train_state

CFG = dsjax.ModelConfig.tiny(vocab_size=264, initializer_range=0.1)
GRPO = GRPOConfig(G=4, epsilon=0.2, beta=0.04, mu=2, max_completion_length=8, learning_rate=1e-3)
NUM_SEQS = 16
TOL_ATOL, TOL_RTOL = 1e-6, 1e-5
SGD_LR = 1.0  # the update is then the gradient itself, well above the parameters' float32 spacing


def _batch(params_model):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 256, int(rng.integers(3, 9))).tolist() for _ in range(NUM_SEQS)]
    completions = [rng.integers(3, 256, int(rng.integers(1, 9))).tolist() for _ in range(NUM_SEQS)]
    sampler = [(-rng.uniform(0.5, 3.0, len(c))).tolist() for c in completions]
    batch = build_batch(prompts, completions, row_len=32, completion_logprobs=sampler)
    assert batch["tokens"].shape[0] == 8  # rows split evenly over the 8 devices below
    batch["advantages"] = rng.normal(size=NUM_SEQS).astype(np.float32)
    graphdef, params, rest = nnx.split(params_model, nnx.Param, ...)
    logp = make_logprob_fn(graphdef)(params, rest, batch)
    batch["old_logp"] = np.asarray(logp) - 0.01  # mu = 2: the rollout policy's, slightly off this one
    batch["ref_logp"] = np.asarray(logp) + 0.02
    return batch


def _state(mesh=None):
    # Plain SGD, not the trainer's AdamW: an update is then linear in the gradients, so comparing updates compares
    # gradients. AdamW's first step is about lr * sign(g), which turns the round-off of a near-zero gradient
    # (another reduction order: sharding, a gathered head) into a full step of lr: no fixed tolerance separates
    # that from a real error. The optimizer state's sharding is tested in tests/test_train.py.
    kw = {} if mesh is None else dict(mesh=mesh, rules=FSDP_RULES)
    model = dsjax.create_model(CFG, seed=0, **kw)
    tx = optax.sgd(SGD_LR)
    graphdef, state = init_train_state(model, tx)
    return model, graphdef, state, tx


def _assert_same_update(new_params, ref_params, init_params):
    """The two updates (new - initial parameters, over ``mu`` steps) agree to float32 round-off, in gradient
    units (divided by the learning rate)."""
    delta = jax.tree.map(lambda a, b: (np.asarray(a) - b) / SGD_LR, jax.device_get(new_params), init_params)
    ref = jax.tree.map(lambda a, b: (np.asarray(a) - b) / SGD_LR, ref_params, init_params)
    chex.assert_trees_all_close(delta, ref, atol=TOL_ATOL, rtol=TOL_RTOL)


@pytest.fixture(scope="module")
def single_device_update():
    model, graphdef, state, tx = _state()
    batch = _batch(model)
    init_params = jax.device_get(state.params)
    new_state, metrics = make_grpo_step(graphdef, GRPO, tx, NUM_SEQS)(state, batch)
    return batch, jax.device_get(new_state), jax.device_get(metrics), init_params


@pytest.mark.parametrize(
    "head",
    [
        dict(logprob_chunk=12),  # ragged chunks
        dict(completion_tokens=NUM_SEQS * GRPO.max_completion_length),  # head at completion targets only
        dict(completion_tokens=NUM_SEQS * GRPO.max_completion_length, logprob_chunk=16),
    ],
    ids=["chunked", "completions", "completions-chunked"],
)
def test_head_variants_give_the_same_update(single_device_update, head):
    batch, ref_state, ref_metrics, init_params = single_device_update
    _, graphdef, state, tx = _state()
    new_state, metrics = make_grpo_step(graphdef, GRPO, tx, NUM_SEQS, **head)(state, batch)
    for key in ("loss", "kl", "entropy", "grad_norm", "sampler_logp_gap", "tis_ratio_mean"):
        assert float(metrics[key]) == pytest.approx(float(ref_metrics[key]), rel=1e-5, abs=1e-7), key
    _assert_same_update(new_state.params, ref_state.params, init_params)


def test_too_few_completion_slots_skip_the_step(single_device_update):
    """More completion targets than ``completion_tokens`` slots must not train on a truncated batch."""
    batch, _, _, _ = single_device_update
    _, graphdef, state, tx = _state()
    before = jax.device_get(state.params)
    slots = int((batch["seq"] >= 0).sum()) - 1
    new_state, metrics = make_grpo_step(graphdef, GRPO, tx, NUM_SEQS, completion_tokens=slots)(state, batch)
    assert not bool(metrics["finite"]) and int(new_state.nonfinite_total) == 1
    chex.assert_trees_all_equal(jax.device_get(new_state.params), before)
    logp = make_logprob_fn(graphdef, completion_tokens=slots)(new_state.params, new_state.rest, batch)
    assert np.isnan(np.asarray(logp)).all()


@pytest.mark.slow
def test_sharded_update_equals_single_device(single_device_update):
    batch, ref_state, ref_metrics, init_params = single_device_update
    mesh = make_mesh(data=2, expert=4)
    with jax.set_mesh(mesh):
        _, graphdef, state, tx = _state(mesh)
        assert not state.params["embed"].get_value().sharding.is_fully_replicated  # FSDP
        rows = jax.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "expert")))
        shardings = {k: rows for k in batch} | {"advantages": jax.NamedSharding(mesh, jax.sharding.PartitionSpec())}
        step = make_grpo_step(graphdef, dataclasses.replace(GRPO), tx, NUM_SEQS,
                              forward_options=dict(dispatch="ep"),
                              state_shardings=jax.tree.map(lambda x: x.sharding, state),
                              batch_shardings=shardings)  # fmt: skip
        new_state, metrics = step(state, batch)
        assert new_state.params["embed"].get_value().sharding == state.params["embed"].get_value().sharding
    for key in ("loss", "kl", "entropy", "grad_norm", "clipped_fraction", "sampler_logp_gap"):
        assert float(metrics[key]) == pytest.approx(float(ref_metrics[key]), rel=1e-5, abs=1e-7), key
    _assert_same_update(new_state.params, ref_state.params, init_params)
