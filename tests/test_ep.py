"""Expert parallelism (explicit exchanges in shard_map) equals single-device ``moe_ragged``, values and grads;
with a capacity factor it equals the dense reference with exactly the documented slots dropped."""

import functools
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsjax.ops.ep import capacity_rows, dropped_slots, moe_expert_parallel
from dsjax.ops.moe import (
    combine_slots,
    gather_slot_rows,
    moe_dense,
    moe_ragged,
    permutation_inverse,
    permute_rows,
    stable_argsort,
)
from dsjax.sharding import make_mesh, varying_axes

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


@pytest.mark.parametrize("layout", ["mkd", "kmd"])
def test_combine_keeps_bf16_expert_outputs_for_the_backward(layout):
    """Weighting and summing the experts' bf16 outputs in fp32: the values and gradients of the einsum of the
    fp32 casts (to rounding of the weights' gradient), but the backward saves the bf16 outputs, not their fp32
    cast (twice the bytes, the FP8 V3 layer step's second-largest buffer at its peak)."""
    m, k, d = 12, 3, 8
    shape = (m, k, d) if layout == "mkd" else (k, m, d)
    y = jax.random.normal(jax.random.key(0), shape).astype(jnp.bfloat16)
    w = jax.random.uniform(jax.random.key(1), (m, k))
    g = jax.random.normal(jax.random.key(2), (m, d))

    def einsum(y, w):
        return jnp.sum(jnp.einsum(f"{layout},mk->md", y.astype(jnp.float32), w) * g)

    def combine(y, w):
        return jnp.sum(combine_slots(y, w, layout, jnp.float32) * g)

    expect = jax.value_and_grad(einsum, argnums=(0, 1))(y, w)
    got = jax.jit(jax.value_and_grad(combine, argnums=(0, 1)))(y, w)
    chex.assert_trees_all_close(got, expect, rtol=1e-6, atol=1e-6)
    assert got[1][0].dtype == jnp.bfloat16
    _, saved = jax.vjp(combine, y, w)
    residuals = [x for x in jax.tree.leaves(saved) if getattr(x, "shape", None) == shape]
    assert residuals and all(x.dtype == jnp.bfloat16 for x in residuals)
    _, saved = jax.vjp(einsum, y, w)  # the plain einsum keeps the fp32 cast: what the op is for
    assert any(getattr(x, "shape", None) == shape and x.dtype == jnp.float32 for x in jax.tree.leaves(saved))


@pytest.mark.parametrize("layout", ["mkd", "kmd"])
def test_slot_gathers_and_row_permutations_move_rows_without_scatter_adds(layout):
    """``gather_slot_rows`` / ``permute_rows``: the values and gradients of plain indexing, and backward passes
    of gathers (and a sum over each token's k copies), so the dispatch's gradient holds no scatter-add, which
    accelerators run far slower (an H200 profile: 8.8 of a V2-Lite step's 127 ms)."""
    m, k, d = 10, 3, 8
    x = jax.random.normal(jax.random.key(0), (m, d))
    order = jax.random.permutation(jax.random.key(1), m * k).astype(jnp.int32)
    inverse = permutation_inverse(order)
    np.testing.assert_array_equal(inverse[order], np.arange(m * k))
    tokens = order % m if layout == "kmd" else order // k
    g = jax.random.normal(jax.random.key(2), (m * k, d))

    got = jax.vjp(lambda x: gather_slot_rows(x, order, inverse, layout), x)
    expect = jax.vjp(lambda x: x[tokens], x)
    chex.assert_trees_all_close((got[0], got[1](g)), (expect[0], expect[1](g)), rtol=1e-6, atol=1e-6)
    got = jax.vjp(lambda y: permute_rows(y, order, inverse), g)
    expect = jax.vjp(lambda y: y[order], g)
    chex.assert_trees_all_equal((got[0], got[1](x[tokens])), (expect[0], expect[1](x[tokens])))

    args = _inputs(8, 2, False, seed=0)[:6]
    grad = jax.grad(lambda *a: moe_ragged(*a).sum(), argnums=GRAD_ARGS)
    eqns = jax.make_jaxpr(grad)(*args).jaxpr.eqns
    float_scatter_adds = [  # bincount's integer scatter-add of the group sizes stays
        e for e in eqns if e.primitive.name == "scatter-add" and jnp.issubdtype(e.outvars[0].aval.dtype, jnp.floating)
    ]
    assert not float_scatter_adds and any(e.primitive.name == "gather" for e in eqns)


def test_permutations_are_typed_varying_inside_shard_map():
    """A per-device permutation must be typed as varying over the axes its keys vary over: typed replicated (as
    ``jnp.argsort`` and a scatter into a fresh array leave it in jax 0.10), a vjp residual holding it gets a
    replicated spec, and DualPipe's stored residuals then gave every device one device's permutation (expert
    weight gradients off by ~50% in test_pipeline_model's expert-parallel test)."""
    mesh = make_mesh(data=1, expert=8)
    seen = {}

    def local(keys):
        order = stable_argsort(keys)
        seen["order"], seen["inverse"] = varying_axes(order), varying_axes(permutation_inverse(order))
        return order

    keys = jax.random.randint(jax.random.key(0), (8 * 6,), 0, 4)
    with jax.set_mesh(mesh):
        keys = jax.device_put(keys, NamedSharding(mesh, P("expert")))
        got = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("expert"), out_specs=P("expert")))(keys)
    for name, axes in seen.items():
        assert "expert" in axes, (name, axes)
    expect = np.concatenate([np.argsort(c, kind="stable") for c in np.asarray(keys).reshape(8, 6)])
    np.testing.assert_array_equal(got, expect)
    assert stable_argsort(jnp.asarray([2, 1, 1])).tolist() == [1, 2, 0]  # no mesh: plain argsort


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


# --- Capacity factor and exchanges -------------------------------------------------------------------------------


def _biased_experts(num_experts, k, seed):
    """Routing that overloads the low shards (expert e drawn with weight 0.8**e): drops at small capacities."""
    rng = np.random.default_rng(seed)
    p = 0.8 ** np.arange(num_experts)
    return np.stack([rng.choice(num_experts, k, replace=False, p=p / p.sum()) for _ in range(M)])


def _dropped_mask(experts, num_experts, data, expert, capacity_factor, exchange):
    """Which (token, column) slots the documented drop order drops: an independent numpy model.

    Tokens sit in ``data * expert`` contiguous blocks, block ``g * expert + s`` on source shard ``s`` of group
    ``g``; slot ``(t, j)`` goes to shard ``experts[t, j] // E_l``. ``ragged``: a receiver keeps the first ``R`` slots
    in the order (column, source, token); ``all_to_all``: each (source, destination) bucket keeps its first ``C``
    slots in the order (column, token).
    """
    m, k = experts.shape
    m_l = m // (data * expert)
    slots, per_shard = m_l * k, num_experts // expert
    ragged_rows = min(expert * slots, -(-math.ceil(capacity_factor * slots) // 8) * 8)
    bucket_rows = min(slots, math.ceil(capacity_factor * slots / expert))
    dropped = np.zeros((m, k), bool)
    for g in range(data):
        blocks = [range((g * expert + s) * m_l, (g * expert + s + 1) * m_l) for s in range(expert)]
        for r in range(expert):
            if exchange == "ragged":
                queue = [(t, j) for j in range(k) for s in range(expert) for t in blocks[s]]
                queue = [(t, j) for t, j in queue if experts[t, j] // per_shard == r]
                for t, j in queue[ragged_rows:]:
                    dropped[t, j] = True
            else:
                for s in range(expert):
                    queue = [(t, j) for j in range(k) for t in blocks[s] if experts[t, j] // per_shard == r]
                    for t, j in queue[bucket_rows:]:
                        dropped[t, j] = True
    return dropped


def _ep_step(mesh, **options):
    tok = NamedSharding(mesh, P(("data", "expert"), None))
    exp = NamedSharding(mesh, P("expert", None, None))
    return jax.jit(
        _value_and_grads(functools.partial(moe_expert_parallel, **options)),
        in_shardings=(tok, tok, tok, exp, exp, exp, tok),
        out_shardings=(tok, (tok, tok, exp, exp, exp)),
    )


def test_capacity_at_the_worst_case_equals_dropless():
    """``c = P`` gives both exchanges the dropless buffers: today's path, values and grads; nothing dropped."""
    data, expert, num_experts, k = 1, 8, 16, 2  # skewed: every slot goes to shard 0, which receives P * S rows
    args = _inputs(num_experts, k, True, seed=5)
    mesh = make_mesh(data=data, expert=expert)
    with jax.set_mesh(mesh):
        ref_out, ref_grads = _ep_step(mesh, exchange="all_to_all")(*args)
        for options in (
            dict(exchange="ragged"),
            dict(exchange="ragged", capacity_factor=float(expert)),
            dict(exchange="all_to_all", capacity_factor=float(expert)),
        ):
            out, grads = _ep_step(mesh, **options)(*args)
            chex.assert_trees_all_close((out, grads), (ref_out, ref_grads), atol=1e-5, rtol=1e-5)
    chex.assert_tree_all_finite((ref_out, ref_grads))
    for exchange in ("ragged", "all_to_all"):
        count = dropped_slots(
            args[2],
            num_experts=num_experts,
            expert_shards=expert,
            token_shards=8,
            capacity_factor=8.0,
            exchange=exchange,
        )
        assert int(count) == 0


@pytest.mark.parametrize(
    ("exchange", "data", "expert", "num_experts", "k", "capacity_factor"),
    [
        ("ragged", 2, 4, 16, 3, 0.5),
        ("all_to_all", 2, 4, 16, 3, 0.5),
        ("ragged", 1, 8, 16, 2, 1.0),
        ("all_to_all", 1, 8, 8, 2, 1.25),
        ("auto", 2, 4, 8, 2, 1.0),  # "auto" with a capacity is the (emulated) ragged exchange, on every platform
    ],
)
def test_capacity_drops_exactly_the_documented_slots(exchange, data, expert, num_experts, k, capacity_factor):
    """Small capacity, overloaded shards: the layer equals the dense reference with exactly the slots of the numpy
    drop model zeroed (values and grads), and ``dropped_slots`` counts them."""
    x, weights, _, w_gate, w_up, w_down, cotangent = _inputs(num_experts, k, False, seed=num_experts + k + data)
    experts_np = _biased_experts(num_experts, k, seed=data + k)
    experts = jnp.asarray(experts_np, jnp.int32)
    args = (x, weights, experts, w_gate, w_up, w_down, cotangent)
    resolved = "ragged" if exchange == "auto" else exchange
    dropped = _dropped_mask(experts_np, num_experts, data, expert, capacity_factor, resolved)
    assert 0 < dropped.sum() < dropped.size  # the case exercises partial drops
    keep = jnp.asarray(~dropped, jnp.float32)

    def reference(x, weights, experts, w_gate, w_up, w_down):
        return moe_dense(x, weights * keep, experts, w_gate, w_up, w_down)

    ref_out, ref_grads = jax.jit(_value_and_grads(reference))(*args)
    mesh = make_mesh(data=data, expert=expert)
    step = _ep_step(mesh, exchange=exchange, capacity_factor=capacity_factor)
    with jax.set_mesh(mesh):
        jaxpr = str(step.trace(*args).jaxpr)
        assert ("all_gather" in jaxpr) == (resolved == "ragged")  # the ragged plan gathers the counts first
        out, grads = step(*args)
    chex.assert_tree_all_finite((out, grads))
    chex.assert_trees_all_close(out, ref_out, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-5, rtol=1e-5)
    # Dropped slots get exactly zero gradient wrt their routing weights.
    chex.assert_trees_all_equal(grads[1] * jnp.asarray(dropped, jnp.float32), jnp.zeros_like(grads[1]))

    count = functools.partial(
        dropped_slots,
        num_experts=num_experts,
        expert_shards=expert,
        token_shards=data * expert,
        capacity_factor=capacity_factor,
        exchange=exchange,
    )
    assert int(count(experts_np)) == dropped.sum()
    tok = NamedSharding(mesh, P(("data", "expert"), None))
    assert int(jax.jit(count)(jax.device_put(experts, tok))) == dropped.sum()  # on sharded routing inside jit


def test_rejects_bad_capacity_and_exchange():
    args = _inputs(8, 2, False, seed=2)[:6]
    count = functools.partial(dropped_slots, args[2], num_experts=8, expert_shards=4, token_shards=8)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="capacity_factor"):
            moe_expert_parallel(*args, capacity_factor=bad)
        with pytest.raises(ValueError, match="capacity_factor"):
            count(capacity_factor=bad, exchange="ragged")
    with pytest.raises(ValueError, match="exchange='alltoall'"):
        moe_expert_parallel(*args, exchange="alltoall")
    with pytest.raises(ValueError, match="exchange='nccl'"):
        count(capacity_factor=1.0, exchange="nccl")
    with pytest.raises(ValueError, match="token shards"):
        dropped_slots(args[2], num_experts=8, expert_shards=4, token_shards=6, capacity_factor=1.0, exchange="ragged")


@pytest.mark.slow
def test_ragged_exchange_compiles_for_tpu_with_fewer_flops():
    """On TPU the ragged exchange is the real ``ragged-all-to-all`` (forward and backward), and at capacity 1.25 the
    step's flops drop by about the dropless padding factor ``P * S / R``."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes (AOT tests) may hold libtpu
    topologies = pytest.importorskip("jax.experimental.topologies")
    try:
        devices = topologies.get_topology_desc("v5p:2x2x1", "tpu").devices
    except Exception as e:  # no libtpu: nothing to compile for
        pytest.skip(f"no TPU compiler: {e}")
    mesh = Mesh(np.array(devices).reshape(1, 4), ("data", "expert"), axis_types=(AxisType.Explicit,) * 2)
    m_l, d, f, num_experts, k = 128, 128, 256, 8, 2
    tok, exp = P(("data", "expert"), None), P("expert", None, None)
    shapes = [
        ((4 * m_l, d), jnp.bfloat16, tok),
        ((4 * m_l, k), jnp.float32, tok),
        ((4 * m_l, k), jnp.int32, tok),
        ((num_experts, d, f), jnp.bfloat16, exp),
        ((num_experts, d, f), jnp.bfloat16, exp),
        ((num_experts, f, d), jnp.bfloat16, exp),
    ]
    abstract = [jax.ShapeDtypeStruct(s, t, sharding=NamedSharding(mesh, spec)) for s, t, spec in shapes]

    def compiled(**options):
        def grads(x, weights, experts, w_gate, w_up, w_down):
            def loss(x, weights, w_gate, w_up, w_down):
                y = moe_expert_parallel(x, weights, experts, w_gate, w_up, w_down, **options)
                return y.astype(jnp.float32).sum()

            return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(x, weights, w_gate, w_up, w_down)

        # The suite's "highest" matmul precision asks TPU's bf16 grouped-matmul kernel for fp32 passes it lacks.
        with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
            return jax.jit(grads).lower(*abstract).compile()

    dropless = compiled(exchange="all_to_all")
    ragged = compiled(capacity_factor=1.25)  # "auto" on TPU devices
    assert "ragged-all-to-all" in ragged.as_text()
    assert "ragged-all-to-all" not in dropless.as_text()
    slots = m_l * k
    padding = 4 * slots / capacity_rows(1.25, slots, 4, "ragged")  # 1024 / 320 rows through the grouped FFN
    ratio = dropless.cost_analysis()["flops"] / ragged.cost_analysis()["flops"]
    assert 0.8 * padding < ratio < 1.1 * padding


def test_megablox_kernels_without_vma_checks_match_single_device():
    """The TPU path: Pallas grouped matmuls (run interpreted here) inside shard_map with check_vma=False. The
    weights are replicated over `data`: their gradients must still be summed over it."""
    from dsjax.ops.moe import megablox_gmm

    args = _inputs(8, 2, False, seed=11)
    ref_out, ref_grads = jax.jit(_value_and_grads(moe_ragged))(*args)
    mesh = make_mesh(data=2, expert=4)
    tok = NamedSharding(mesh, P(("data", "expert"), None))
    exp = NamedSharding(mesh, P("expert", None, None))
    gmm = functools.partial(megablox_gmm, interpret=True)
    fn = functools.partial(moe_expert_parallel, gmm=gmm, check_vma=False, capacity_factor=4.0, exchange="ragged")
    step = jax.jit(
        _value_and_grads(fn),
        in_shardings=(tok, tok, tok, exp, exp, exp, tok),
        out_shardings=(tok, (tok, tok, exp, exp, exp)),
    )
    with jax.set_mesh(mesh):
        out, grads = step(*args)
    chex.assert_trees_all_close(out, ref_out, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-5, rtol=1e-5)
