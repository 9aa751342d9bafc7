"""The GPU grouped GEMM's differentiation on CPU: reference kernels with the contract of JAX's Mosaic-GPU ones
(tile-shape checks; rows outside every group left as garbage, here NaN) stand in for them, and values and
gradients must match ``jax.lax.ragged_dot``'s; the real kernels run too, in Pallas' Mosaic-GPU interpreter
(``mosaic_gpu_interpret``). Whether they compile for an H200 is checked in ``tests/test_aot_gpu.py``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mosaic_gpu_interpret import interpret
from script_runner import run_json_script

from dsjax.ops.gpu_gmm import BLOCK_K, BLOCK_M, BLOCK_N, gpu_gmm, gpu_gmm_supported, make_gpu_gmm

_calls = []  # which reference kernel ran, with which operand shapes


def _group_ids(group_sizes, m):
    """Group of each row, ``len(group_sizes)`` past the last group."""
    return jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(m), side="right")


def _ragged_reference(lhs, rhs, *, group_sizes, transpose_rhs=False):
    """``ragged_dot_mgpu.ragged_dot``'s contract: tile checks, rows outside every group unwritten (NaN here)."""
    m, k = lhs.shape
    out = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    assert lhs.dtype == rhs.dtype and m % BLOCK_M == 0 and k % BLOCK_K == 0 and out % BLOCK_N == 0
    _calls.append(("ragged", lhs.shape, rhs.shape, transpose_rhs))
    w = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    groups = _group_ids(group_sizes, m)
    y = jnp.einsum("mk,mkn->mn", lhs, w[jnp.minimum(groups, w.shape[0] - 1)], precision="highest")
    return jnp.where((groups < w.shape[0])[:, None], y, jnp.nan).astype(lhs.dtype)


def _transposed_reference(lhs, rhs, *, group_sizes):
    """``transposed_ragged_dot_mgpu.transposed_ragged_dot``: ``out[g] = lhs_g^T . rhs_g``. Rows of other groups are
    multiplied by 0 (as the kernel masks block edges), so non-finite values anywhere in the operands leak."""
    m, k = lhs.shape
    assert lhs.dtype == rhs.dtype and rhs.shape[0] == m and k % BLOCK_M == 0 and rhs.shape[1] % BLOCK_N == 0
    _calls.append(("transposed", lhs.shape, rhs.shape))
    one_hot = (_group_ids(group_sizes, m)[:, None] == jnp.arange(group_sizes.shape[0])[None, :]).astype(lhs.dtype)
    return jnp.einsum("mg,mk,mn->gkn", one_hot, lhs, rhs, precision="highest").astype(lhs.dtype)


def _rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def test_the_kernels_in_the_interpreter_match_ragged_dot():
    """JAX's own bf16 kernels (forward, input gradient with the weights read transposed, grouped weight
    gradient) run by the Mosaic-GPU interpreter: float32 ``ragged_dot``'s values and gradients to bf16's
    rounding (an H200 measured 1.66e-3, ``scripts/gpu_check.py gmm``), rows past the groups zero."""
    rng = np.random.default_rng(3)
    m, k, n = 300, 256, 128
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(4, k, n)) / 16, jnp.bfloat16)
    cotangent = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
    gs = jnp.asarray([100, 0, 57, 90], jnp.int32)

    def value_and_grads(gmm, x, w):
        y, pullback = jax.vjp(lambda x, w: gmm(x, w, gs), x, w)
        return (y, *pullback(cotangent.astype(y.dtype)))

    with interpret():
        got = jax.jit(lambda: value_and_grads(gpu_gmm, x, w))()
    want = value_and_grads(jax.lax.ragged_dot, x.astype(jnp.float32), w.astype(jnp.float32))
    for name, a, b in zip(("y", "dx", "dw"), got, want, strict=True):
        assert _rel_err(a.astype(jnp.float32), b) < 5e-3, (name, _rel_err(a.astype(jnp.float32), b))
    assert not np.asarray(got[0][gs.sum() :], np.float32).any()


@pytest.mark.parametrize("group_sizes", [(100, 0, 57, 90), (0, 300, 0, 0), (128, 128, 44, 0)])
def test_gradients_match_ragged_dot_with_reference_kernels(group_sizes):
    m, k, n = 300, 256, 128  # rows not a multiple of the tile (padded); sums below m leave unassigned rows
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(len(group_sizes), k, n)) / np.sqrt(k), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)  # nonzero on unassigned rows too
    gs = jnp.asarray(group_sizes, jnp.int32)
    gmm = make_gpu_gmm(_ragged_reference, _transposed_reference)

    def value_and_grads(f):
        def run(x, w):
            def loss(x, w):
                y = f(x, w, gs)
                return jnp.sum(y * cotangent), y

            (_, y), (dx, dw) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w)
            return y, dx, dw

        return run

    _calls.clear()
    got = jax.jit(value_and_grads(gmm))(x, w)
    ref = jax.jit(value_and_grads(lambda x, w, gs: jax.lax.ragged_dot(x, w, gs, precision="highest")))(x, w)
    # Forward, input gradient through the transposed-weight kernel, weight gradient through the grouped one.
    assert _calls == [
        ("ragged", (384, k), w.shape, False),
        ("ragged", (384, n), w.shape, True),
        ("transposed", (384, k), (384, n)),
    ]
    for name, a, b in zip(("y", "dx", "dw"), got, ref, strict=True):
        assert a.shape == b.shape and bool(jnp.all(jnp.isfinite(a))), name
        assert _rel_err(a, b) < 1e-5, (name, _rel_err(a, b))
    assert not np.any(np.asarray(got[0][sum(group_sizes) :]))  # rows past the groups are zeros


def test_falls_back_to_ragged_dot_outside_the_kernel_constraints():
    assert gpu_gmm_supported(2048, 1408, jnp.bfloat16) and gpu_gmm_supported(7168, 2048, jnp.float16)
    assert not gpu_gmm_supported(2048, 1408, jnp.float32)  # the kernels take bf16 / f16 (wgmma)
    assert not gpu_gmm_supported(64, 128, jnp.bfloat16) and not gpu_gmm_supported(128, 96, jnp.bfloat16)
    x = jnp.ones((10, 64), jnp.float32)
    w = jnp.ones((2, 64, 32), jnp.float32)
    gs = jnp.array([4, 3], jnp.int32)
    y = jax.jit(gpu_gmm)(x, w, gs)  # runs on CPU: ragged_dot, no kernel
    np.testing.assert_array_equal(y, jax.lax.ragged_dot(x, w, gs))


def test_gpu_check_script_smoke_on_cpu():
    """``scripts/gpu_check.py gmm --smoke``: the check a GPU lease runs, its reference and report on CPU (where
    only ``ragged_dot`` runs): bf16's error against the per-group float32 reference, zeros past the groups."""
    result = run_json_script(["scripts/gpu_check.py", "gmm", "--smoke", "--reps", "1", "--json"], timeout=300)
    (case,) = result["results"]
    assert case["kernel"] is False and "gpu_gmm (Mosaic)" not in case
    xla = case["ragged_dot (XLA)"]
    assert all(1e-4 < xla[f"rel_err_{g}"] < 5e-3 for g in ("y", "dx", "dw")), xla  # bf16 rounding, not 0
    assert xla["rows_past_groups_max_abs"] == 0 and xla["finite"]
