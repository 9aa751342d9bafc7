"""The FP8 GEMMs as Mosaic-GPU kernels (:mod:`dsjax.ops.fp8_gpu`), run on CPU by Pallas' Mosaic-GPU interpreter
(``mosaic_gpu_interpret``) against the NumPy oracle of ``fp8_reference``: the kernels alone, and
``fp8_matmul`` / ``fp8_ragged_dot`` / ``GroupedMatmul.pair`` with ``backend="auto"`` as they run on a GPU (the
platform read as ``gpu``), values and gradients. That they compile for an H200 (ptxas, sm_90a) is checked in
``tests/test_aot_gpu.py``."""

import dataclasses

import fp8_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_eqns import all_eqns
from mosaic_gpu_interpret import interpret
from test_fp8 import GEMM_TOL, activations, assert_close, max_rel, recipe

from dsjax.ops import fp8, fp8_gpu, fp8_grouped, fp8_rows
from dsjax.ops.moe import moe_ragged
from dsjax.sharding import make_mesh

TOL = GEMM_TOL["pallas"]  # the kernels promote where `blocked` does; fp32 sums within a slice re-associated


@pytest.fixture
def on_gpu(monkeypatch):
    """``backend="auto"`` taking the GPU kernels (the platform read as ``gpu``), run by the interpreter."""
    monkeypatch.setattr(fp8, "active_platform", lambda: "gpu")
    with interpret():
        yield


def _kernel_names(fn, *args) -> str:
    """The Mosaic-GPU kernels ``fn`` traces to (their ``name`` params: the jaxpr's text leaves them out)."""
    eqns = all_eqns(jax.make_jaxpr(fn)(*args))
    return " ".join(sorted({eqn.params["name"] for eqn in eqns if eqn.primitive.name == "mpmd_map"}))


@pytest.mark.parametrize(
    ("groups", "k", "n"),
    [
        ([40, 0, 150, 70], 256, 384),  # an empty expert, experts sharing row tiles, 40 rows past the last group
        ([128, 128, 0, 44], 256, 384),  # groups on tile edges, an empty one inside
        ([0, 0, 300, 0], 200, 136),  # one expert takes every row; widths off the tiles (padded)
        ([3, 0, 200, 1, 0, 96], 200, 136),  # many experts in one tile, an empty one at a tile's middle
    ],
)
def test_gpu_grouped_kernels_match_the_oracle(on_gpu, monkeypatch, groups, k, n):
    """``fp8_ragged_dot`` through the kernels -- forward (``x`` quantised 1 x 128, ``w^T`` E4M3), input
    gradient (``g`` quantised, ``w`` read as it is) and weight gradient (both re-tiled 128 x 1 along each
    expert's tokens, three tiles at a time with a padded last chunk, transposed) -- against the oracle; rows
    past the groups and experts without rows zero."""
    monkeypatch.setattr(fp8_grouped, "_WGRAD_CHUNK_BYTES", 4 * 128 * (k + n) * 3)
    groups = np.array(groups)
    rows = 300
    x = activations(70, (rows, k))
    x[[2, 130, 250]] *= 30
    w = activations(71, (len(groups), k, n)) * 0.02
    g = np.random.default_rng(72).standard_normal((rows, n)).astype(np.float32)
    sizes = jnp.asarray(groups)

    def run(x, w):
        y, pullback = jax.vjp(lambda x, w: fp8_grouped.fp8_ragged_dot(x, w, sizes, recipe("auto")), x, w)
        return (y, *pullback(jnp.asarray(g)))

    assert _kernel_names(run, x, w) == "grouped_matmul_sum_kernel grouped_weight_grad_kernel"
    y, dx, dw = jax.jit(run)(jnp.asarray(x), jnp.asarray(w))
    dx_ref, dw_ref = ref.ragged_grads(x, w, groups, g)
    assert max_rel(y, ref.ragged_fwd(x, w, groups)) < TOL
    assert max_rel(dx, dx_ref) < TOL
    assert max_rel(dw, dw_ref) < TOL
    assert not np.asarray(y)[groups.sum() :].any() and not np.asarray(dx)[groups.sum() :].any()
    assert not np.asarray(dw)[groups == 0].any()


def test_gpu_grouped_sum_of_products_in_one_accumulator():
    """``grouped_matmul_sum``: two products with contractions of 256 and 200 (off the tiles: padded) summed in
    one accumulator equal the oracle's sum; scales of another tiling are refused."""
    groups = np.array([40, 0, 150, 70])
    want, terms = 0.0, []
    for seed, c in ((80, 256), (82, 200)):
        a = activations(seed, (300, c))
        bq, sb = ref.quantize_blocks(activations(seed + 1, (len(groups), 128, c)) * 0.02)  # b [E, n, c]
        term = np.zeros((300, 128))
        for e, rows in enumerate(ref._groups(groups)):
            term[rows] = ref.dgrad(a[rows], bq[e], sb[e])  # a . b[e]^T, a quantised 1 x 128
        want = want + term
        aq, sa = ref.quantize_rows(a, floor=1e-30)
        terms.append(tuple(jnp.asarray(v) for v in (aq, sa, bq, sb.transpose(0, 2, 1))))
    with interpret():
        got = fp8_gpu.grouped_matmul_sum(terms, jnp.asarray(groups), out_dtype=jnp.float32)
    assert max_rel(got, want) < TOL
    aq, sa, bq, sb = terms[0]
    with pytest.raises(ValueError, match="one per 1 x 128 tile"):  # scales of another tiling
        fp8_gpu.grouped_matmul(aq, sa[:, :1], bq, sb, jnp.asarray(groups), out_dtype=jnp.float32)


def test_gpu_pair_equals_two_gemms(on_gpu):
    """``GroupedMatmul.pair`` on the kernels (``x`` quantised once, one input-gradient accumulator) against the
    two GEMMs of the ``blocked`` backend: values and all three gradients."""
    sizes = jnp.asarray([40, 0, 150, 70])
    x = jnp.asarray(activations(13, (300, 256)))
    w_gate, w_up = (jnp.asarray(activations(s, (4, 256, 128)) * 0.02) for s in (64, 65))

    def loss(backend):
        gmm = fp8_grouped.grouped_matmul(recipe(backend))

        def f(x, w_gate, w_up):
            gate, up = gmm.pair(x, w_gate, w_up, sizes)
            return jnp.sum(jnp.tanh(gate) * up)

        return jax.value_and_grad(f, (0, 1, 2))

    assert "grouped_matmul_sum_kernel" in _kernel_names(loss("auto"), x, w_gate, w_up)
    assert_close(jax.jit(loss("auto"))(x, w_gate, w_up), jax.jit(loss("blocked"))(x, w_gate, w_up), tol=1e-6)


def test_gpu_quantized_dispatch_is_exact(on_gpu, monkeypatch):
    """An FP8 MoE's routed experts on the kernels (``moe_ragged``: tokens sorted by expert, the SwiGLU pair,
    the down projection) with the tokens quantised before they are sorted (``quantized_dispatch``, E4M3 and
    scales moved) and after: the same output and gradients, bit for bit."""
    m, k, d, f, e = 40, 3, 256, 128, 4
    x = jnp.asarray(activations(80, (m, d)))
    experts = jnp.asarray(np.random.default_rng(81).permuted(np.tile(np.arange(e), (m, 1)), axis=1)[:, :k])
    weights = jnp.asarray(np.random.default_rng(82).random((m, k)), jnp.float32)
    w_gate, w_up = (jnp.asarray(activations(s, (e, d, f)) * 0.02) for s in (83, 84))
    w_down = jnp.asarray(activations(85, (e, f, d)) * 0.02)

    traced = []
    dispatch = fp8_rows.dispatch
    monkeypatch.setattr(fp8_rows, "dispatch", lambda *args: traced.append(args[2].shape) or dispatch(*args))

    def run(quantized):
        gmm = fp8_grouped.grouped_matmul(dataclasses.replace(recipe("auto"), quantized_dispatch=quantized))
        layer = lambda *a: moe_ragged(a[0], weights, experts, *a[1:], gmm=gmm)
        y, pullback = jax.vjp(layer, x, w_gate, w_up, w_down)
        return y, pullback(jnp.cos(y))

    got, want = jax.jit(lambda: run(True))(), jax.jit(lambda: run(False))()
    assert traced == [(m, d)]  # the tokens quantised once, before the sort (only with quantized_dispatch)
    assert "grouped_matmul_sum_kernel" in _kernel_names(lambda: run(True))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_gpu_kernels_only_where_they_apply(monkeypatch):
    """``auto`` takes the kernels on GPU only, and where the rows are the device's own; elsewhere the grouped
    GEMM stays ``blocked`` (no kernel traced). Each case has shapes of its own: the choice is made while
    tracing, and JAX reuses a custom VJP's trace for the same shapes."""
    sizes = jnp.asarray([100, 200])

    def kernels(rows, n, backend="auto"):
        gemm = lambda x, w: fp8_grouped.fp8_ragged_dot(x, w, sizes, recipe(backend))
        return _kernel_names(gemm, jnp.ones((rows, 256)), jnp.ones((2, 256, n)))

    assert kernels(300, 128) == ""  # the CPU
    monkeypatch.setattr(fp8, "active_platform", lambda: "gpu")
    assert kernels(301, 128) == "grouped_matmul_sum_kernel"
    assert kernels(303, 128, "blocked") == ""
    with jax.set_mesh(make_mesh(1, 1)):  # a mesh axis still free: the batch's groups cannot be split by rows
        assert kernels(304, 128) == ""


@pytest.mark.parametrize(("rows", "k", "n"), [(300, 256, 384), (256, 200, 136), (128, 128, 128)])
def test_gpu_dense_kernels_match_the_oracle(on_gpu, rows, k, n):
    """``fp8_matmul`` through the kernels as one group (forward, input gradient, and the weight gradient with
    both operands re-tiled 128 x 1 along the tokens, rows padded to the tile) against the oracle."""
    x = activations(90, (rows, k))
    w = activations(91, (k, n)) * 0.05
    g = np.random.default_rng(92).standard_normal((rows, n)).astype(np.float32)

    def run(x, w):
        y, pullback = jax.vjp(lambda x, w: fp8.fp8_matmul(x, w, recipe("auto")), x, w)
        return (y, *pullback(jnp.asarray(g)))

    assert _kernel_names(run, x, w) == "grouped_matmul_sum_kernel grouped_weight_grad_kernel"
    y, dx, dw = jax.jit(run)(jnp.asarray(x), jnp.asarray(w))
    dx_ref, dw_ref = ref.linear_grads(x, w, g)
    assert max_rel(y, ref.linear_fwd(x, w)) < TOL
    assert max_rel(dx, dx_ref) < TOL
    assert max_rel(dw, dw_ref) < TOL


def _matmul_sum_reference(terms, group_sizes, *, out_dtype):
    """``fp8_gpu.grouped_matmul_sum``'s contract in plain JAX ops (the interpreter simulates every device of an
    8-device ``shard_map`` on these 2 cores: minutes for this test's sizes)."""
    y = 0.0
    for a, sa, b, sb in terms:
        a = a.astype(jnp.float32) * jnp.repeat(sa, 128, axis=1)
        b = b.astype(jnp.float32) * jnp.repeat(jnp.repeat(sb, 128, axis=1), 128, axis=2).transpose(0, 2, 1)
        y = y + jax.lax.ragged_dot(a, b.transpose(0, 2, 1), group_sizes, precision="highest")
    return y.astype(out_dtype)


def _weight_grad_reference(xt, sxt, gt, sgt, tiles_per_expert, *, out_dtype):
    tiles = sxt.shape[0]
    x = xt.astype(jnp.float32).reshape(-1, tiles, 128) * sxt.T[:, :, None]
    g = gt.astype(jnp.float32).reshape(-1, tiles, 128) * sgt.T[:, :, None]
    assert tiles_per_expert.shape == (1,)  # the dense case: one expert, every tile
    return jnp.einsum("ktb,ntb->kn", x, g, precision="highest")[None].astype(out_dtype)


def test_gpu_dense_kernels_sharded_equal_one_device(monkeypatch):
    """Under a 2 x 4 mesh the dense kernels run per device (rows split in multiples of 128 like the batch, the
    weight whole, the weight gradient's partials summed), here with reference kernels of the same contract:
    the values and gradients of one device."""
    monkeypatch.setattr(fp8, "active_platform", lambda: "gpu")
    monkeypatch.setattr(fp8_gpu, "grouped_matmul_sum", _matmul_sum_reference)
    monkeypatch.setattr(fp8_gpu, "grouped_weight_grad", _weight_grad_reference)
    x = jnp.asarray(activations(93, (1024, 256)))
    w = jnp.asarray(activations(94, (256, 128)) * 0.05)
    cotangent = jnp.asarray(np.random.default_rng(95).standard_normal((1024, 128)), jnp.float32)
    loss = lambda x, w, backend="auto": jnp.sum(fp8.fp8_matmul(x, w, recipe(backend)) * cotangent)
    one = jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)
    with jax.set_mesh(make_mesh(2, 4)):
        text = str(jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w))
        sharded = jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)
    assert text.count("shard_map") == 3  # forward, input gradient, weight gradient
    assert_close(sharded, one, tol=1e-6)
    blocked = jax.jit(jax.value_and_grad(lambda x, w: loss(x, w, "blocked"), (0, 1)))(x, w)
    assert_close(one[1], blocked[1], tol=1e-6)  # the gradients (the loss, a sum with cancellation: 4e-6)
