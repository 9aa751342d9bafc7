"""What a pipeline's B stores for its W: only the micro-batch-dependent vjp residuals, split over ``expert``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsjax.pipeline import GENERATORS
from dsjax.pipeline.executor import make_engine
from dsjax.pipeline.residuals import ResidualLayout, data_dependent, split_spec


def _layers(w, x):
    def body(h, wi):
        return jax.checkpoint(lambda h, wi: jnp.tanh(h @ wi.astype(jnp.bfloat16).astype(h.dtype)))(h, wi), None

    y, _ = jax.lax.scan(body, x, w)
    return jnp.sum(y)


def test_parameter_only_residuals_are_not_data():
    """The closure of a scanned, rematerialised stack keeps per-layer inputs (data) and per-layer weights or
    their casts (parameters only); a conditional on data taints what it selects, a while loop carries taint."""
    w, x, b = jnp.ones((3, 4, 4)), jnp.ones((2, 4)), jnp.ones((4,))

    def closure(w, x, b):
        _, pull = jax.vjp(_layers, w, x)
        scaled = jnp.where(jnp.sum(x) > 0, w[0] * 2, w[0])  # selects on data: data
        looped = jax.lax.fori_loop(0, 3, lambda i, c: c + x[0], b)  # carries data in: data
        counted = jax.lax.fori_loop(0, 3, lambda i, c: c * 2, b)  # parameters only
        cast = (w * 3).astype(jnp.bfloat16)
        return jax.tree.leaves(pull), scaled, looped, counted, cast

    closed = jax.make_jaxpr(closure)(w, x, b)
    flags = data_dependent(closed, [False, True, False])
    n_pull = len(jax.tree.leaves(jax.eval_shape(closure, w, x, b)[0]))
    pull_flags, tail = flags[:n_pull], flags[n_pull:]
    assert tail == [True, True, False, False]
    shapes = [a.shape for a in closed.out_avals[:n_pull]]
    # Per-layer inputs [3, 2, 4] depend on x; every [3, 4, 4] weight-shaped residual does not.
    assert any(f and s[:2] == (3, 2) for f, s in zip(pull_flags, shapes, strict=True))
    assert all(not f for f, s in zip(pull_flags, shapes, strict=True) if s == (3, 4, 4))


def _mesh(n):
    return Mesh(np.array(jax.devices()[:n]), ("expert",), axis_types=(AxisType.Auto,))


@pytest.mark.parametrize("n", [1, 4])
def test_layout_round_trip(n):
    """pack -> unpack gives the leaves back for every kind (split, replicated, scalar, bool leaves), and the rows
    of one slot are split over the axis: each device holds 1/n of every divisible leaf."""
    kinds = [
        [(jnp.float32, (6, 8)), (jnp.bfloat16, (3, 4, 5)), (jnp.float32, ()), (jnp.bool_, (8,))],
        [(jnp.float32, (2, 3)), (jnp.float32, (4, 4))],
    ]
    layout = ResidualLayout(kinds, ("expert",), n)
    rng = np.random.default_rng(0)
    mesh = _mesh(n)
    for k, stored in enumerate(kinds):
        leaves = [jnp.asarray(rng.normal(size=s) > 0 if d == jnp.bool_ else rng.normal(size=s), d) for d, s in stored]
        with jax.set_mesh(mesh):
            rows = jax.jit(lambda leaves, k=k: layout.pack(k, leaves))(leaves)
            back = jax.jit(lambda rows, k=k: layout.unpack(k, rows))(rows)
        for a, b in zip(leaves, back, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for r, spec in zip(rows, layout.rows, strict=True):
            assert r.shape == spec.shape
            if n > 1 and r.ndim == 2:
                assert r.addressable_shards[0].data.shape == (1, r.shape[1])
    if n == 4:
        # f32: (6, 8) splits by its 8 columns, (4, 4) by its rows; (2, 3) and the scalar go to the replicated row.
        assert layout.sharded_widths[layout.sharded.index(jnp.dtype(jnp.float32))] == 12
        assert layout.replicated_widths[layout.replicated.index(jnp.dtype(jnp.float32))] == 6


def test_split_spec():
    assert split_spec((2, 8, 4), ("expert",), 4) == P(None, "expert", None)
    assert split_spec((2, 3), ("expert",), 4) is None
    assert split_spec((8, 8), ("expert",), 4, skip=1) == P(None, "expert")
    assert split_spec((8,), (), 1) is None


def test_engine_residual_slots_split_over_expert():
    """ZB1P on 2 stage x 4 expert devices: the compiled step keeps each residual slot as [1, width] per device
    (1/4 of the slot), B stores no weight (W takes its parameters from the weights it has), and the result
    equals the same engine on 2 stage devices alone."""
    schedule = GENERATORS["zb1p"](2, 4)
    h, rows = 16, 8

    def stage(p, c, s, sc, x, inp):
        x = inp["x"] if x is None else x
        y = jnp.tanh(x @ p["w"].astype(jnp.float32) + s["b"][None])
        return y, jnp.sum(y**2) * c, {}

    def first(p, c, s, sc, x, inp):
        return stage(p, c, s, sc, None, inp)

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(2, h, h)) / 4, jnp.float32)}
    consts = jnp.ones((2,), jnp.float32)
    shared = {"b": jnp.asarray(rng.normal(size=(h,)), jnp.float32)}
    inputs = {"x": jnp.asarray(rng.normal(size=(4, rows, h)), jnp.float32)}
    x_struct = jax.ShapeDtypeStruct((rows, h), jnp.float32)
    results = {}
    for expert in (1, 4):
        devices = np.array(jax.devices()[: 2 * expert]).reshape(2, expert)
        mesh = Mesh(devices, ("stage", "expert"), axis_types=(AxisType.Auto,) * 2)
        run = make_engine(schedule, [first, stage], [0, 1], mesh=mesh, x_struct=x_struct)
        with jax.set_mesh(mesh):
            args = (params, consts, shared, None, inputs)
            args = jax.device_put(args, NamedSharding(mesh, P()))
            fn = jax.jit(run)
            results[expert] = fn(*args)
            text = fn.lower(*args).compile().as_text()
        (layout,) = run.residual_layout
        # Stored: activations of the micro-batch ([rows, h]: the input, tanh's output and derivative); not the
        # weight nor its cast, which W has.
        assert all(s.shape == (rows, h) for kind in layout.layouts for s in kind), layout.layouts
        if expert == 4:
            (width,) = layout.sharded_widths
            assert width == max(len(kind) for kind in layout.layouts) * rows * h // 4  # a quarter of each leaf
            assert f"f32[{run.slots.res_slots},1,{width}]" in text  # the slot buffer, one device's share
    for a, b in zip(jax.tree.leaves(results[1]), jax.tree.leaves(results[4]), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)  # rows summed in another order over expert
        assert np.linalg.norm(a - b) <= 1e-6 * np.linalg.norm(b)
