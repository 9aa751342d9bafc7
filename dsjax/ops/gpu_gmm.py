"""Grouped GEMM for NVIDIA Hopper GPUs from JAX's own Pallas Mosaic-GPU kernels.

``gpu_gmm(x [m, k], w [e, k, n], group_sizes [e]) -> [m, n]`` has the contract of ``jax.lax.ragged_dot`` (and of
:func:`dsjax.ops.moe.megablox_gmm`, its TPU counterpart): rows ``sum(group_sizes[:i]) ..`` are multiplied by
``w[i]``, rows past ``sum(group_sizes)`` give zeros. XLA:GPU lowers ``ragged_dot`` to a dense matmul over every
group, masked (``e`` times the useful flops); these kernels only compute each row tile against its own group:

- forward and input gradient: ``jax.experimental.pallas.ops.gpu.ragged_dot_mgpu.ragged_dot`` (the input gradient
  ``dx = dy . w[g]^T`` with ``transpose_rhs=True``, so no transposed copy of the weights is made);
- weight gradient: ``transposed_ragged_dot_mgpu.transposed_ragged_dot``, ``dw[g] = x_g^T . dy_g`` per group.

Constraints (checked by :func:`gpu_gmm_supported`; :func:`gpu_gmm` falls back to ``ragged_dot`` otherwise):
Hopper (sm_90a ``wgmma``; both kernels are written for H100/H200), bf16 or f16 operands of the same dtype
(the weights are cast to ``x``'s dtype; products accumulate in fp32 and are rounded to that dtype, as
``ragged_dot`` with bf16 operands), ``k`` and ``n`` multiples of 128 (the kernels' ``block_n`` / ``block_m``; the
contraction tile ``block_k`` is 64). Rows are padded to a multiple of 128. The kernels leave rows outside every
group unwritten (whatever the buffer held), so outputs and incoming gradients are masked to zero there. Each
non-empty group takes at least one 128-row tile: with few rows per group (decoding) the work is up to
``(ceil(m / 128) + e - 1) * 128`` rows (32 tiles for one of V3's decode batches on 8 GPUs, 32 local experts).

These are Mosaic-GPU kernels: they run on a GPU only (no interpreter) and, on a mesh of several devices, must be
called inside ``shard_map`` (a custom call cannot be partitioned automatically; one GPU needs no partitioning). They
compile without a GPU (``dsjax.aot`` GPU targets, ``JAX_PLATFORMS=cpu``): each becomes a ``mosaic_gpu_v2`` custom
call holding the kernel's MLIR, which XLA's GPU compiler lowers to PTX and runs through ptxas for sm_90a during the
compile. On an H200 (``scripts/gpu_check.py gmm``, V2-Lite's 64 experts x 49,152 rows): the values and both
gradients of bf16 ``ragged_dot`` (1.66e-3 from float32, as XLA's own), 21-29x faster than XLA's lowering of it. In
CI, values and gradients are checked with reference kernels of the same contract (:func:`make_gpu_gmm` builds the
same ``custom_vjp`` around any kernel functions of these signatures).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Tiles: wgmma works on 64-row warpgroup tiles and 128-byte swizzled rows (64 bf16 values along the
# contraction); 128 x 128 outputs with 4 stages in flight use 160 KiB of the H100/H200's 227 KiB shared memory
# per block in both kernels. Untuned: the kernels' own benchmarks sweep 64-192 for block_m / block_n.
BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 64
STAGES = 4
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# H100 / H200 SXM streaming multiprocessors: the kernels are persistent, one program per SM (ragged_dot_mgpu
# hard-codes this number; transposed_ragged_dot_mgpu reads it off jax.devices()[0], see _transposed_kernel).
_NUM_SMS = 132


def gpu_gmm_supported(k: int, n: int, dtype) -> bool:
    """Whether ``[m, k] x [e, k, n]`` operands of ``dtype`` meet the kernels' tile and dtype constraints
    (then all three GEMMs of the forward and backward pass do: the backward's dims are ``k`` and ``n`` too)."""
    return k % BLOCK_M == 0 and n % BLOCK_N == 0 and jnp.dtype(dtype) in _DTYPES


def _ragged_kernel(lhs, rhs, *, group_sizes, transpose_rhs=False):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    return ragged_dot_mgpu.ragged_dot(
        lhs,
        rhs,
        group_sizes=group_sizes,
        block_m=BLOCK_M,
        block_n=BLOCK_N,
        block_k=BLOCK_K,
        max_concurrent_steps=STAGES,
        grid_block_n=1,
        transpose_rhs=transpose_rhs,
    )


class _CompileOnlyJax:
    """``jax`` as the transposed kernel's module sees it on a host without a GPU.

    ``transposed_ragged_dot`` sizes its persistent grid from ``jax.devices()[0].core_count``; compiling for a GPU
    target on a CPU host (``JAX_PLATFORMS=cpu``), that device is a CPU one, which has no ``core_count``. The grid
    size only decides how tiles are spread over SMs, not what is computed, so the H100/H200 figure stands in.
    """

    class _Device:
        core_count = _NUM_SMS

    def __getattr__(self, name):
        return getattr(jax, name)

    def devices(self, *args, **kwargs):
        return [self._Device()]


def _transposed_kernel(lhs, rhs, *, group_sizes):
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu as module

    kwargs = dict(
        group_sizes=group_sizes,
        block_m=BLOCK_M,
        block_n=BLOCK_N,
        block_k=BLOCK_K,
        max_concurrent_steps=STAGES,
        grid_block_n=1,
    )
    if hasattr(jax.devices()[0], "core_count"):
        return module.transposed_ragged_dot(lhs, rhs, **kwargs)
    # Deviceless compile: the module-level `jax` is swapped for the duration of tracing only (see _CompileOnlyJax).
    module.jax = _CompileOnlyJax()
    try:
        return module.transposed_ragged_dot(lhs, rhs, **kwargs)
    finally:
        module.jax = jax


def make_gpu_gmm(ragged_kernel=_ragged_kernel, transposed_kernel=_transposed_kernel):
    """The differentiable grouped GEMM around two kernel functions with the signatures of JAX's Mosaic-GPU ones:

    ``ragged_kernel(lhs [m, k], rhs [e, k, n] (or [e, n, k] with transpose_rhs), *, group_sizes, transpose_rhs)
    -> [m, n]`` and ``transposed_kernel(lhs [m, k], rhs [m, n], *, group_sizes) -> [e, k, n]`` (per-group
    ``lhs_g^T . rhs_g``). Rows outside every group may hold anything in the first's output. ``m`` is a multiple
    of ``BLOCK_M`` by the time they are called.
    """

    def valid_rows(m, group_sizes):
        return (jnp.arange(m) < group_sizes.sum())[:, None]

    def forward(x, w, group_sizes):
        y = ragged_kernel(x, w, group_sizes=group_sizes)
        return jnp.where(valid_rows(x.shape[0], group_sizes), y, 0)

    @jax.custom_vjp
    def gmm(x, w, group_sizes):
        return forward(x, w, group_sizes)

    def fwd(x, w, group_sizes):
        return forward(x, w, group_sizes), (x, w, group_sizes)

    def bwd(residuals, dy):
        x, w, group_sizes = residuals
        valid = valid_rows(x.shape[0], group_sizes)
        # `where`, not a product: rows outside the groups are not guaranteed finite, and the weight-gradient
        # kernel masks rows of a neighbouring group at block edges by multiplying them with 0.
        dy = jnp.where(valid, dy, 0).astype(x.dtype)
        dx = jnp.where(valid, ragged_kernel(dy, w, group_sizes=group_sizes, transpose_rhs=True), 0)
        dw = transposed_kernel(jnp.where(valid, x, 0), dy, group_sizes=group_sizes)
        return dx.astype(x.dtype), dw.astype(w.dtype), None

    gmm.defvjp(fwd, bwd)

    def call(x, w, group_sizes):
        m = x.shape[0]
        pad = -m % BLOCK_M
        xp = jnp.pad(x, ((0, pad), (0, 0))) if pad else x
        return gmm(xp, w.astype(x.dtype), group_sizes.astype(jnp.int32))[:m]

    return call


_gpu_gmm = make_gpu_gmm()


def gpu_gmm(x, w, group_sizes):
    """``jax.lax.ragged_dot(x, w, group_sizes)`` through JAX's Mosaic-GPU grouped-GEMM kernels (module docstring),
    differentiable; operands outside the kernels' constraints (:func:`gpu_gmm_supported`) take ``ragged_dot``."""
    k, n = w.shape[-2:]
    if not gpu_gmm_supported(k, n, x.dtype):
        return jax.lax.ragged_dot(x, w, group_sizes)
    return _gpu_gmm(x, w, group_sizes)
