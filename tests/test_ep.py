"""Expert parallelism (explicit all-to-all in shard_map) equals single-device ``moe_ragged``, values and grads."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsjax.ops.ep import moe_expert_parallel
from dsjax.ops.moe import moe_ragged
from dsjax.sharding import make_mesh

D, F, M = 16, 12, 32  # tokens divisible by the 8 devices: 4 per device
GRAD_ARGS = (0, 1, 3, 4, 5)  # x, weights, w_gate, w_up, w_down


def _inputs(num_experts, k, skewed, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(M, D))
    weights = rng.uniform(0.1, 1.0, size=(M, k))
    if skewed:  # expert 0 takes every token, experts 1..k-1 share the rest, the others get nothing
        experts = np.stack([np.concatenate([[0], 1 + rng.permutation(k - 1)]) for _ in range(M)])
    else:
        experts = np.stack([rng.choice(num_experts, k, replace=False) for _ in range(M)])
    w_gate, w_up = rng.normal(size=(2, num_experts, D, F)) / np.sqrt(D)
    w_down = rng.normal(size=(num_experts, F, D)) / np.sqrt(F)
    cotangent = rng.normal(size=(M, D))
    arrays = (x, weights, experts, w_gate, w_up, w_down, cotangent)
    return tuple(jnp.asarray(a, jnp.int32 if a is experts else jnp.float32) for a in arrays)


def _value_and_grads(fn):
    def run(x, weights, experts, w_gate, w_up, w_down, cotangent):
        def loss(*args):
            out = fn(*args)
            return jnp.sum(out * cotangent), out

        (_, out), grads = jax.value_and_grad(loss, argnums=GRAD_ARGS, has_aux=True)(
            x, weights, experts, w_gate, w_up, w_down
        )
        return out, grads

    return run


@pytest.mark.parametrize(
    ("data", "expert", "num_experts", "k", "skewed"),
    [
        (2, 4, 8, 2, False),
        (2, 4, 16, 3, True),
        (1, 8, 8, 3, False),
        (1, 8, 16, 2, True),  # 2 experts per shard: every slot of every token goes to shard 0 (full buffer)
    ],
)
def test_expert_parallel_matches_single_device(data, expert, num_experts, k, skewed):
    args = _inputs(num_experts, k, skewed, seed=num_experts + k + data)
    ref_out, ref_grads = jax.jit(_value_and_grads(moe_ragged))(*args)

    mesh = make_mesh(data=data, expert=expert)
    tok = NamedSharding(mesh, P(("data", "expert"), None))
    exp = NamedSharding(mesh, P("expert", None, None))
    step = jax.jit(
        _value_and_grads(moe_expert_parallel),
        in_shardings=(tok, tok, tok, exp, exp, exp, tok),
        out_shardings=(tok, (tok, tok, exp, exp, exp)),
    )
    with jax.set_mesh(mesh):
        assert "all_to_all" in str(step.trace(*args).jaxpr)  # the expert-parallel path, not the fallback
        out, grads = step(*args)

    chex.assert_shape(out, (M, D))
    chex.assert_tree_all_finite((out, grads))
    chex.assert_trees_all_equal_shapes(grads, ref_grads)
    assert out.sharding.is_equivalent_to(tok, out.ndim)
    assert grads[2].sharding.is_equivalent_to(exp, grads[2].ndim)
    chex.assert_trees_all_close(out, ref_out, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-5, rtol=1e-5)
    if skewed:  # experts that receive nothing get exactly zero gradient
        chex.assert_trees_all_equal(grads[2][k:], jnp.zeros_like(grads[2][k:]))


def test_falls_back_to_ragged_without_expert_parallelism():
    args = _inputs(8, 2, False, seed=0)[:6]
    ref = moe_ragged(*args)
    chex.assert_trees_all_equal(moe_expert_parallel(*args), ref)  # no mesh
    with jax.set_mesh(make_mesh(data=8, expert=1)):
        chex.assert_trees_all_close(jax.jit(moe_expert_parallel)(*args), ref, atol=1e-6, rtol=1e-6)


def test_rejects_indivisible_experts():
    args = _inputs(6, 2, False, seed=1)[:6]
    with jax.set_mesh(make_mesh(data=2, expert=4)), pytest.raises(ValueError, match="experts do not split"):
        moe_expert_parallel(*args)
