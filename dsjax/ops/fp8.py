"""Fine-grained FP8 GEMMs after DeepSeek-V3 (arXiv 2412.19437 §3.3), stateless and differentiable.

Quantisation (all tensors E4M3, online scales, no amax history):

* activations and activation gradients: ``1 x B`` tiles along the contraction (one scale per token per ``B``
  channels), ``B = recipe.block = 128``;
* weights: ``B x B`` blocks (one scale per block, so the transpose reuses them);
* scale ``s = max(amax, amax_floor) / 448`` (optionally rounded up to a power of two); values are divided by
  ``s`` and clipped to +-448 before the cast, because E4M3 casts do not saturate (500 would become NaN).
  Gradient tiles use ``grad_amax_floor`` instead (see :class:`~dsjax.config.Fp8Recipe`).

``fp8_matmul(x, w)``: forward ``y = x . w`` with x in 1xB tiles and w in BxB blocks; backward ``dx = g . w^T``
with g in 1xB tiles along N (the weight blocks transposed), and ``dw = x^T . g`` with x (dequantised from its
cached fp8 tiles) and g both re-tiled ``B x 1`` along the tokens, the contraction of that GEMM. Dimensions that
are not multiples of ``B`` are zero-padded before the scales are computed, so padding never changes a scale.

Backends (``recipe.backend``): ``blocked`` splits the contraction into B-long slices, multiplies fp8 x fp8 with
fp32 accumulation and applies both scales to each slice's partial sums before adding them up -- the promotion
every 128 elements of DeepSeek's kernels (on GPU/TPU the slices are one batched dot; it materialises an fp32
``[K/B, M, N]`` intermediate, so it is a faithful emulation, not a fast kernel). ``reference`` dequantises both
operands and does one fp32 dot: the oracle the tests hold ``blocked`` to. ``pallas`` runs the GEMMs as Pallas TPU
kernels with the same numerics, every tile quantised and re-tiled in VMEM instead of XLA's fp32 copies of whole
tensors: the dense ones (``fp8_matmul``) as :mod:`dsjax.ops.fp8_pallas`'s, split by rows under a mesh, the
grouped ones as :mod:`dsjax.ops.fp8_grouped_pallas`'s where the rows are the device's own (inside expert
parallelism, or unpartitioned; ``blocked`` elsewhere). ``auto`` is ``pallas`` when compiling for TPU, on GPU
:mod:`dsjax.ops.fp8_gpu`'s Mosaic-GPU kernels with the same numerics (:func:`uses_gpu_kernels`), and
``blocked`` elsewhere.

The grouped version for the experts, ``fp8_ragged_dot``, is :mod:`dsjax.ops.fp8_grouped`.

``fp8_matmul`` accepts weights that are already fp8 (``w_scale`` given, e.g. loaded from an FP8 checkpoint);
then only the input gradient flows. Or float weights quantised ahead, :func:`fp8_weight`'s :class:`Fp8Weight`
(E4M3 values, scales and a gradient sink): on their own shards under a mesh, so that the gathers move E4M3, with
the gradient returned through the sink in ``Fp8Recipe.wgrad_dtype``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from dsjax.config import Fp8Recipe
from dsjax.ops import fp8_gpu, fp8_pallas
from dsjax.sharding import active_platform, free_axes, varying_axes

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
_HIGHEST = jax.lax.Precision.HIGHEST


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad_axis(x, axis: int, size: int):
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad)


def _exact_div(a, b):
    """``a / b`` as an IEEE division. XLA rewrites division by a constant or a broadcast into multiplication by
    a reciprocal (1 ulp off in about half the scales, which flips rare E4M3 roundings); an optimisation barrier
    on the materialised divisor keeps the recipe's division, so results are bit-exact with NumPy/PyTorch."""
    return a / jax.lax.optimization_barrier(jnp.broadcast_to(b, a.shape).astype(a.dtype))


def _divide_by_scales(x, s):
    """``x / s`` for a tensor's values: exact (:func:`_exact_div`) on CPU, where the parity tests hold it bit
    for bit; a plain division in TPU and GPU steps, because the exact one's materialised fp32 divisor is as
    large as the tensor (1-1.5 GiB per quantised activation of a V3 layer at 16K tokens per chip on v5p). Where
    the compiler multiplies by a reciprocal instead, the quotient is at most 1 ulp off, and its E4M3 value
    differs only when it sits on a rounding boundary (rare: see ``test_true_division``). The scales themselves
    (``amax / 448``, small arrays) stay exact everywhere."""
    if active_platform() == "cpu":
        return _exact_div(x, s)
    return x / jnp.asarray(s, x.dtype)


def tile_scale(amax, recipe: Fp8Recipe):
    """``max(amax, floor) / 448`` in fp32, rounded up to a power of two if ``recipe.pow2_scales``."""
    s = _exact_div(jnp.maximum(amax.astype(jnp.float32), recipe.amax_floor), E4M3_MAX)
    if recipe.pow2_scales:
        mant, exp = jnp.frexp(s)  # s = mant * 2^exp, mant in [0.5, 1): 2^ceil(log2 s) exactly, no log rounding
        s = jnp.ldexp(jnp.ones_like(s), jnp.where(mant == 0.5, exp - 1, exp))
    return s


def _cast(x, s):
    return jnp.clip(_divide_by_scales(x, s), -E4M3_MAX, E4M3_MAX).astype(E4M3)


def quantize_rows(x, recipe: Fp8Recipe):
    """``x [..., K]`` in ``1 x B`` tiles along the last axis -> ``(q [..., K] e4m3, s [..., ceil(K/B)] fp32)``."""
    b = recipe.block
    *lead, k = x.shape
    kb = _cdiv(k, b)
    tiles = _pad_axis(x.astype(jnp.float32), -1, kb * b).reshape(*lead, kb, b)
    s = tile_scale(jnp.max(jnp.abs(tiles), axis=-1), recipe)
    q = _cast(tiles, s[..., None]).reshape(*lead, kb * b)[..., :k]
    return q, s


def dequantize_rows(q, s, block: int, dtype=jnp.float32):
    """Inverse of :func:`quantize_rows` (up to rounding): ``q * s`` tile by tile."""
    *lead, k = q.shape
    kb = s.shape[-1]
    tiles = _pad_axis(q.astype(jnp.float32), -1, kb * block).reshape(*lead, kb, block)
    return (tiles * s[..., None]).reshape(*lead, kb * block)[..., :k].astype(dtype)


def quantize_blocks(w, recipe: Fp8Recipe):
    """``w [..., K, N]`` in ``B x B`` blocks over the last two axes -> ``(q e4m3, s [..., K/B, N/B] fp32)``."""
    b = recipe.block
    *lead, k, n = w.shape
    kb, nb = _cdiv(k, b), _cdiv(n, b)
    padded = _pad_axis(_pad_axis(w.astype(jnp.float32), -2, kb * b), -1, nb * b)
    blocks = padded.reshape(*lead, kb, b, nb, b)
    s = tile_scale(jnp.max(jnp.abs(blocks), axis=(-3, -1)), recipe)
    q = _cast(blocks, s[..., :, None, :, None]).reshape(*lead, kb * b, nb * b)[..., :k, :n]
    return q, s


def dequantize_blocks(q, s, block: int, dtype=jnp.float32):
    """Inverse of :func:`quantize_blocks`: ``q * s`` block by block (how FP8 checkpoints are dequantised)."""
    *lead, k, n = q.shape
    kb, nb = s.shape[-2:]
    padded = _pad_axis(_pad_axis(q.astype(jnp.float32), -2, kb * block), -1, nb * block)
    blocks = padded.reshape(*lead, kb, block, nb, block) * s[..., :, None, :, None]
    return blocks.reshape(*lead, kb * block, nb * block)[..., :k, :n].astype(dtype)


def _dequantize_cols(wq, sw, block: int, col_block: int):
    """``wq [K, N]`` with ``sw [K/B, N/col_block]`` (col_block = B: weight blocks; 1: 128x1 tiles) -> fp32."""
    kb, ns = sw.shape
    padded = _pad_axis(_pad_axis(wq.astype(jnp.float32), 0, kb * block), 1, ns * col_block)
    return (padded.reshape(kb, block, ns, col_block) * sw[:, None, :, None]).reshape(kb * block, ns * col_block)


def gemm(xq, sx, wq, sw, *, col_block: int, recipe: Fp8Recipe):
    """``x . w`` in fp32 from ``xq [M, K]`` (1xB tiles, ``sx [M, K/B]``) and ``wq [K, N]`` whose scales
    ``sw [K/B, N/col_block]`` cover ``B x col_block`` tiles. Returns ``[M, N]`` fp32."""
    b = recipe.block
    m, k = xq.shape
    n = wq.shape[1]
    kb, ns = sw.shape
    if recipe.backend == "reference":
        x = dequantize_rows(xq, sx, b)
        w = _dequantize_cols(wq, sw, b, col_block)[:k, :n]
        return jnp.dot(x, w, precision=_HIGHEST, preferred_element_type=jnp.float32)
    x3 = _pad_axis(xq, 1, kb * b).reshape(m, kb, b)
    w3 = _pad_axis(_pad_axis(wq, 0, kb * b), 1, ns * col_block).reshape(kb, b, ns * col_block)
    partial = jax.lax.dot_general(x3, w3, (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.float32)
    scale = sx.T[:, :, None] * jnp.repeat(sw, col_block, axis=1)[:, None, :]  # [K/B, M, N]
    return jnp.sum(partial * scale, axis=0)[:, :n]


# ---- dense linear ----------------------------------------------------------------------------------------------


def _reductions(x, w) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Inside ``shard_map``: the mesh axes to psum ``dx`` and ``dw`` over -- those the other operand (hence the
    gradient) varies along but the primal does not, e.g. an expert weight's gradient over the data axis. They
    are read here, at trace time, because the backward rule's avals carry no varying-axes information."""
    vx, vw = varying_axes(x), varying_axes(w)
    return tuple(sorted(vw - vx)), tuple(sorted(vx - vw))


def _reduce(ct, axes: tuple[str, ...], dtype):
    return (jax.lax.psum(ct, axes) if axes else ct).astype(dtype)


def _grad_recipe(recipe: Fp8Recipe) -> Fp8Recipe:
    """The recipe for gradient tiles: the same, with ``grad_amax_floor`` (see :class:`Fp8Recipe`)."""
    return dataclasses.replace(recipe, amax_floor=recipe.grad_amax_floor)


def uses_pallas(recipe: Fp8Recipe) -> bool:
    """Whether the recipe runs the Pallas kernels (:mod:`dsjax.ops.fp8_pallas`, and the grouped ones of
    :mod:`dsjax.ops.fp8_grouped_pallas` where the rows are the device's own): ``pallas``, or ``auto`` on TPU."""
    if recipe.backend == "auto":
        return recipe.block == fp8_pallas.LANE and active_platform() == "tpu"
    return recipe.backend == "pallas"


def uses_gpu_kernels(recipe: Fp8Recipe) -> bool:
    """Whether the recipe runs :mod:`dsjax.ops.fp8_gpu`'s Mosaic-GPU kernels: ``auto`` on GPU (``block`` 128).
    The dense GEMMs run them per device under a mesh, the routed experts' grouped ones where the rows are the
    device's own (:mod:`dsjax.ops.fp8_grouped`)."""
    return recipe.backend == "auto" and recipe.block == fp8_gpu.BLOCK and active_platform() == "gpu"


def _kernel_tiles(recipe: Fp8Recipe) -> fp8_pallas.TileRecipe:
    return fp8_pallas.TileRecipe(amax_floor=recipe.amax_floor, pow2=recipe.pow2_scales)


def _column_scales(sw, n: int, block: int):
    """Weight block scales ``[K/B, N/B]`` as one scale per column per ``B`` rows, ``[K/B, N]``."""
    return jnp.repeat(sw, block, axis=1)[:, :n]


def wgrad_dtype(recipe: Fp8Recipe, compute_dtype):
    """The dtype the recipe's GEMMs give weight gradients in (``Fp8Recipe.wgrad_dtype``)."""
    return jnp.dtype(jnp.float32 if recipe.wgrad_dtype == "float32" else compute_dtype)


def _retile(xq, sx, g, recipe: Fp8Recipe):
    """The weight gradient's operands re-tiled ``B x 1`` along the tokens: ``x`` (dequantised from its forward
    ``1 x B`` tiles) as ``[K, M]`` and ``g`` as ``[N, M]``, each E4M3 with its scales ``[., M/B]``."""
    x = dequantize_rows(xq, sx, recipe.block)
    return (*quantize_rows(x.T, recipe), *quantize_rows(g.T, _grad_recipe(recipe)))


def _wgrad(xq, sx, g, recipe: Fp8Recipe, out_dtype=jnp.float32):
    """``dw = x^T . g`` with both re-tiled ``B x 1`` along the tokens (the contraction), in ``out_dtype``."""
    if uses_pallas(recipe):
        tiles = _kernel_tiles(recipe)
        g_tiles = _kernel_tiles(_grad_recipe(recipe))
        return fp8_pallas.weight_grad(xq, sx, g, x_tiles=tiles, g_tiles=g_tiles, out_dtype=out_dtype)
    if uses_gpu_kernels(recipe):  # re-tiled on each device's rows
        retile = functools.partial(_retile, recipe=recipe)
        return fp8_gpu.weight_grad(retile, xq, sx, g, out_dtype=out_dtype)
    xtq, sxt, gtq, sgt = _retile(xq, sx, g, recipe)
    return gemm(xtq, sxt, gtq.T, sgt.T, col_block=1, recipe=recipe).astype(out_dtype)


def _dgrad(g, wq, sw, recipe: Fp8Recipe, dtype=jnp.float32):
    """``dx = g . w^T`` with g in 1xB tiles along N and the transposed weight blocks."""
    if uses_pallas(recipe):  # g's tiles quantised inside the kernel
        sw_cols = _column_scales(sw.T, wq.shape[0], recipe.block)
        tiles = _kernel_tiles(_grad_recipe(recipe))
        return fp8_pallas.scaled_matmul(g, None, wq.T, sw_cols, out_dtype=dtype, tiles=tiles)
    gq, sg = quantize_rows(g, _grad_recipe(recipe))
    if uses_gpu_kernels(recipe):  # w as it is: for dx = g . w^T its contraction is already last
        return fp8_gpu.matmul(gq, sg, wq, sw.T, out_dtype=dtype)
    return gemm(gq, sg, wq.T, sw.T, col_block=recipe.block, recipe=recipe)


def _dgrad_dtype(reduce_axes, dtype):
    """The input gradient's dtype out of the GEMM: fp32 when it is summed over devices next, else x's."""
    return jnp.float32 if reduce_axes else dtype


def _forward(xq, sx, wq, sw, recipe: Fp8Recipe, dtype):
    """``y = x . w`` in ``dtype`` from x's 1xB tiles and w's BxB blocks."""
    if uses_pallas(recipe):
        return fp8_pallas.scaled_matmul(xq, sx, wq, _column_scales(sw, wq.shape[1], recipe.block), out_dtype=dtype)
    if uses_gpu_kernels(recipe):  # w^T: E4M3 operands go to wgmma with the contraction last
        return fp8_gpu.matmul(xq, sx, wq.astype(E4M3).T, sw, out_dtype=dtype)
    return gemm(xq, sx, wq, sw, col_block=recipe.block, recipe=recipe).astype(dtype)


def _quantize_activations(x, recipe: Fp8Recipe):
    """:func:`quantize_rows` of ``x [M, K]``; with the Pallas kernels, tile by tile in VMEM (same values)."""
    if uses_pallas(recipe):
        return fp8_pallas.quantize(x, _kernel_tiles(recipe))
    return quantize_rows(x, recipe)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _linear(recipe, axes, x, wq, sw, sink):
    return _linear_fwd(recipe, axes, x, wq, sw, sink)[0]


def _linear_fwd(recipe, axes, x, wq, sw, sink):
    """Weights quantised ahead (:class:`Fp8Weight`): the weight gradient goes to ``sink``; without one (E4M3
    weights as stored) there is none, and nothing of ``x`` is kept."""
    xq, sx = _quantize_activations(x, recipe)
    y = _forward(xq, sx, wq, sw, recipe, x.dtype)
    if sink is None:
        xq = sx = None
    return y, (xq, sx, wq, sw, sink_dtype(sink), jnp.zeros((), x.dtype))


def _linear_bwd(recipe, axes, res, g):
    xq, sx, wq, sw, grad_dtype, x_dtype = res
    dx = _dgrad(g, wq, sw, recipe, _dgrad_dtype(axes[0], x_dtype.dtype))
    dw = None if grad_dtype is None else _reduce(_wgrad(xq, sx, g, recipe, grad_dtype.dtype), axes[1], grad_dtype.dtype)
    return _reduce(dx, axes[0], x_dtype.dtype), jnp.zeros_like(wq), jnp.zeros_like(sw), dw


_linear.defvjp(_linear_fwd, _linear_bwd)


def sink_dtype(sink):
    """A residual that records a gradient sink's dtype (None without one)."""
    return None if sink is None else jnp.zeros((), sink.dtype)


class Fp8Weight(NamedTuple):
    """A weight quantised ahead of its GEMMs (:func:`fp8_weight`): ``values [..., K, N]`` E4M3, ``scales [...,
    K/B, N/B]`` fp32, and ``grad``, a zero array of the weight's shape in ``Fp8Recipe.wgrad_dtype`` whose value
    nothing reads: its cotangent is the weight's gradient (the GEMMs give it the dequantised weight's ``x^T .
    g``), which :func:`fp8_weight` passes on to the float weight. ``grad`` None: no weight gradient."""

    values: jax.Array
    scales: jax.Array
    grad: jax.Array | None


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gradient_sink(w, dtype):
    # Zeros that depend on w: under vmap a constant would be one unbatched sink, and every batch element's
    # gradient would be summed into it and handed to each of them (nothing reads the value; XLA drops it).
    return (w * 0).astype(dtype)


def _gradient_sink_fwd(w, dtype):
    return _gradient_sink(w, dtype), jnp.zeros((), w.dtype)


def _gradient_sink_bwd(dtype, w_dtype, ct):
    return (ct.astype(w_dtype.dtype),)


_gradient_sink.defvjp(_gradient_sink_fwd, _gradient_sink_bwd)


def fp8_weight(
    w,
    recipe: Fp8Recipe,
    dtype,
    spec: PartitionSpec | None = None,
    *,
    gathered: PartitionSpec | None = None,
    quantize=None,
) -> Fp8Weight:
    """A float weight ``w [..., K, N]`` quantised in ``B x B`` blocks over its last two axes ahead of its GEMMs:
    an :class:`Fp8Weight`, differentiable straight through (the GEMMs' weight gradient, in the recipe's
    ``wgrad_dtype`` for compute dtype ``dtype``, reaches ``w`` in its own dtype).

    ``spec``: ``w``'s layout on the active mesh (:func:`dsjax.sharding.weight_spec`). The values and scales are
    then pinned to it, so each device quantises its own shard (when no block straddles two) and a weight that
    must be gathered is gathered in E4M3, a quarter of fp32's bytes. Unpinned, XLA:TPU gathered V3's experts
    in fp32 and quantised the whole copy, and summed the quantised-but-fp32 dense weights over all devices to
    gather them (README, FP8 at scale). ``gathered``: the layout the GEMM then takes them in (FSDP's gathered
    weight), constrained after the quantisation; without it XLA may keep the weight split and move the
    activations instead (the V3 layer step on H200 did, 18.9 -> 32.1 GiB). ``quantize``: the quantiser
    (:func:`quantize_blocks` by default)."""
    split = _split_within_blocks(w.shape, spec, recipe.block) if spec is not None and free_axes() else None
    if split:  # shards narrower than a block along one axis (a V3 projection over 64 chips: 7168 / 64 = 112 columns)
        values, scales = _quantize_blocks_split(w, recipe, split[0])
        values = jax.lax.with_sharding_constraint(values, spec)
    else:
        values, scales = (quantize or quantize_blocks)(w, recipe)
        if split == ():  # every shard holds whole blocks
            values = jax.lax.with_sharding_constraint(values, spec)
            scales = jax.lax.with_sharding_constraint(scales, spec)
    if split is not None and gathered is not None:
        values = jax.lax.with_sharding_constraint(values, gathered)
        scales = jax.lax.with_sharding_constraint(scales, gathered)
    sink = _gradient_sink(w, wgrad_dtype(recipe, dtype))
    return Fp8Weight(jax.lax.stop_gradient(values), jax.lax.stop_gradient(scales), sink)


def _split_within_blocks(shape, spec: PartitionSpec, block: int) -> tuple[int, ...] | None:
    """Of the last two axes of a ``spec``-placed weight, those whose shards are not whole ``block``s: ``()`` when
    none, ``(axis,)`` (-2 or -1) for one; None for both, or a dimension not a multiple of ``block``."""
    mesh = jax.sharding.get_abstract_mesh()
    parts = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
    split = []
    for axis in (-2, -1):
        axes = (parts[axis],) if isinstance(parts[axis], str) else tuple(parts[axis] or ())
        if shape[axis] % block:
            return None
        if shape[axis] % (block * math.prod(mesh.shape[a] for a in axes)):
            split.append(axis)
    return tuple(split) if len(split) < 2 else None


def _quantize_blocks_split(w, recipe: Fp8Recipe, split_axis: int):
    """:func:`quantize_blocks` (the same values) for a weight split along ``split_axis`` into shards narrower
    than a block. Each block's amax is taken in two steps, along the whole axis first (on the shards) and then
    along the split one on the small ``[K, N/B]`` or ``[K/B, N]`` partial maxima, and each element is divided
    by its block's scale where it lies: no block is ever assembled from two shards, and the weight stays put
    (``quantize_blocks``' block reshape of the split axis made XLA:TPU move the whole fp32 weight)."""
    b = recipe.block
    *lead, k, n = w.shape
    a = jnp.abs(w.astype(jnp.float32))
    if split_axis == -1:  # down the 128-row groups of every column first, then across the columns' groups
        amax = jnp.max(a.reshape(*lead, k // b, b, n), axis=-2).reshape(*lead, k // b, n // b, b).max(-1)
    else:
        amax = jnp.max(a.reshape(*lead, k, n // b, b), axis=-1).reshape(*lead, k // b, b, n // b).max(-2)
    s = tile_scale(amax, recipe)
    return _cast(w.astype(jnp.float32), jnp.repeat(jnp.repeat(s, b, axis=-2), b, axis=-1)), s


def fp8_matmul(x, w, recipe: Fp8Recipe, w_scale=None):
    """``x [..., K] . w [K, N]`` as a fine-grained FP8 GEMM; output in ``x.dtype``.

    ``w`` is a float weight (quantised here, gradient returned in its dtype), an E4M3 weight with its
    ``w_scale [ceil(K/B), ceil(N/B)]`` block scales (no weight gradient), or an :class:`Fp8Weight`.
    """
    *lead, k = x.shape
    if not isinstance(w, Fp8Weight):
        w = fp8_weight(w, recipe, x.dtype) if w_scale is None else Fp8Weight(w, w_scale, None)
    if w.values.ndim != 2 or w.values.shape[0] != k:
        raise ValueError(f"fp8_matmul: x {x.shape} and w {w.values.shape} do not contract (w must be [K, N])")
    x2 = x.reshape(-1, k)
    y = _linear(recipe, _reductions(x2, w.values), x2, w.values, w.scales, w.grad)
    return y.reshape(*lead, w.values.shape[1])
