"""Pipeline executor: the DualPipe repository's own check, in JAX on simulated CPU devices.

Toy stages (Linear h->4h, GELU, Linear 4h->h, float32) with an MSE loss; the pipelined step must reproduce the
plain sequential loop over the same micro-batches: per-micro-batch and summed losses bitwise (the DualPipe
reference requires ``torch.equal``; here the loop runs one compiled call per stage, as the reference's eager
modules, and the pipeline runs the same float32 operations per stage, which XLA CPU compiles to the same
results), every gradient to relative difference <= 1e-6 (weight gradients are accumulated in schedule order,
DualPipe's two mirror copies summed, and B/W recompute the stage forward, so round-off may differ).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from dsjax.pipeline import GENERATORS, Kind, Op, ScheduleError, one_f_one_b, zb1p
from dsjax.pipeline.executor import run_schedule, timesteps

H, TOKENS = 8, 3


def stage_fn(p, x):
    h = jax.nn.gelu(x @ p["w1"] + p["b1"][None], approximate=False)
    return h @ p["w2"] + p["b2"][None]


def mse(y, label):
    return jnp.mean((y - label) ** 2)


def init(stages: int, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), stages)
    out = []
    for k in keys:
        k1, k2, k3, k4 = jax.random.split(k, 4)
        out.append(
            {
                "w1": jax.random.normal(k1, (H, 4 * H)) / np.sqrt(H),
                "b1": 0.1 * jax.random.normal(k2, (4 * H,)),
                "w2": jax.random.normal(k3, (4 * H, H)) / np.sqrt(4 * H),
                "b2": 0.1 * jax.random.normal(k4, (H,)),
            }
        )
    return out


def data(microbatches: int, seed: int = 1):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (microbatches, TOKENS, H)), jax.random.normal(k2, (microbatches, TOKENS, H))


@jax.jit
def _reference_one(params, x, label):
    def full(params, x):
        for p in params:
            x = stage_fn(p, x)
        return mse(x, label)

    return jax.value_and_grad(full)(params, x)


_stage, _loss = jax.jit(stage_fn), jax.jit(mse)


def reference(params, xs, labels):
    """The plain sequential loop: each micro-batch through every stage, gradients summed in micro-batch order.

    Losses come from one compiled call per stage (as the reference's eager modules), gradients from the whole
    chain compiled at once. A single program for the whole forward chain may fuse across stage boundaries and
    round differently (seen: 1 ulp on one micro-batch of the 8-stage chain on CPU).
    """
    losses, grads = [], None
    for m in range(xs.shape[0]):
        x = xs[m]
        for p in params:
            x = _stage(p, x)
        losses.append(_loss(x, labels[m]))
        _, g = _reference_one(params, xs[m], labels[m])
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    losses = jnp.stack(losses)
    return jnp.sum(losses), losses, grads


def mesh(ranks: int) -> Mesh:
    return Mesh(np.array(jax.devices()[:ranks]), ("stage",))


def check(name: str, ranks: int, microbatches: int):
    schedule = GENERATORS[name](ranks, microbatches)
    params = init(schedule.stages)
    xs, labels = data(microbatches)
    out = run_schedule(schedule, stage_fn, params, xs, labels, mse, mesh=mesh(ranks))
    ref_loss, ref_losses, ref_grads = reference(params, xs, labels)
    np.testing.assert_array_equal(np.asarray(out.losses), np.asarray(ref_losses))
    assert np.asarray(out.loss) == np.asarray(ref_loss)
    assert len(out.grads) == schedule.stages
    for s, (g, r) in enumerate(zip(out.grads, ref_grads, strict=True)):
        for key in r:
            a, b = np.asarray(g[key], np.float64), np.asarray(r[key], np.float64)
            rel = np.linalg.norm(a - b) / np.linalg.norm(b)
            assert rel <= 1e-6, (name, s, key, rel)


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_matches_sequential_4_devices(name):
    ranks = 4
    check(name, ranks, 2 * ranks)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_matches_sequential_8_devices(name):
    check(name, 8, 16)


def test_timesteps_respect_dependencies():
    for name, gen in GENERATORS.items():
        s = gen(4, 10)
        steps = timesteps(s)
        at = {}
        for t, row in enumerate(steps):
            for r, i in enumerate(row):
                if i is not None:
                    at[(r, i)] = t
        assert sorted(at) == [(r, i) for r in range(4) for i in range(len(s.ops[r]))], name
        for r, ops in enumerate(s.ops):
            for i in range(1, len(ops)):
                assert at[(r, i - 1)] < at[(r, i)]


def test_invalid_schedule_refused():
    s = zb1p(4, 4)
    ops = list(s.ops)
    ops[1] = tuple(o for o in ops[1] if o != Op(Kind.W, 2, 1))  # a missing W
    bad = dataclasses.replace(s, ops=tuple(ops))
    params, (xs, labels) = init(4), data(4)
    with pytest.raises(ScheduleError, match="missing W of micro-batch 2 stage 1"):
        run_schedule(bad, stage_fn, params, xs, labels, mse, mesh=mesh(4))


def test_mismatched_counts_raise():
    s = one_f_one_b(4, 4)
    params, (xs, labels) = init(4), data(4)
    with pytest.raises(ValueError, match="stage parameter sets"):
        run_schedule(s, stage_fn, params[:3], xs, labels, mse, mesh=mesh(4))
    with pytest.raises(ValueError, match="micro-batches"):
        run_schedule(s, stage_fn, params, xs[:3], labels[:3], mse, mesh=mesh(4))
    with pytest.raises(ValueError, match="devices"):
        run_schedule(s, stage_fn, params, xs, labels, mse, mesh=mesh(2))
    odd = [*params[:3], {**params[3], "b2": jnp.zeros((H + 1,))}]
    with pytest.raises(ValueError, match="stage 3 parameters"):
        run_schedule(s, stage_fn, odd, xs, labels, mse, mesh=mesh(4))
