"""Activation rows for the routed experts' grouped FP8 GEMMs (:mod:`dsjax.ops.fp8_grouped`), quantised before
they are dispatched to their experts: DeepSeek-V3 quantises the tokens ahead of the MoE up-projections and sends
them to the experts in FP8. A token's ``1 x B`` tiles lie within its row, so quantising it once and moving its
E4M3 values and scales gives the GEMMs the same operands as quantising every moved copy, with half the bytes of
bf16 rows through the sort and the expert-parallel exchange. The input gradient comes back in the rows' float
dtype through a gradient sink (:class:`Fp8Rows`), along the movement's transpose.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsjax.config import Fp8Recipe
from dsjax.ops import fp8_pallas
from dsjax.ops.fp8 import E4M3, _cdiv, _kernel_tiles, quantize_rows, uses_pallas
from dsjax.sharding import free_axes


def grouped_kernels(recipe: Fp8Recipe) -> bool:
    """Whether the grouped GEMMs run :mod:`dsjax.ops.fp8_grouped_pallas`'s kernels: as the dense ones, where
    the rows are this device's own (no mesh axis left to split: unpartitioned, or inside expert parallelism's
    ``shard_map``). A grouped kernel cannot be split by rows like the dense ones (the groups are the batch's);
    elsewhere the grouped GEMMs stay ``blocked`` (same tiles, same values)."""
    return uses_pallas(recipe) and not free_axes()


class Fp8Rows(NamedTuple):
    """Activation rows quantised ahead of the grouped GEMMs and moved as E4M3 (:func:`dispatch`): ``values [R,
    K]`` E4M3 in ``1 x B`` tiles along ``K``, ``scales [R, K/B]`` fp32, and ``grad``, a zero array of the rows'
    shape in their float dtype whose value nothing reads: its cotangent is the rows' input gradient, which the
    dispatch moves back to the tokens."""

    values: jax.Array
    scales: jax.Array
    grad: jax.Array


def row_quantizer(recipe: Fp8Recipe):
    """The quantiser of the grouped GEMMs' input rows here (inside expert parallelism or not): the TPU kernels'
    or :func:`quantize_rows` (the GPU kernels and ``blocked``), ``1 x B`` tiles either way."""
    if grouped_kernels(recipe):
        return lambda x: fp8_pallas.quantize(x, _kernel_tiles(recipe))
    return lambda x: quantize_rows(x, recipe)


def quantized(x, quantize):
    """``(xq, sx, dtype)`` of a grouped GEMM's input: as dispatched (:class:`Fp8Rows`), or ``quantize(x)``."""
    if isinstance(x, Fp8Rows):
        return x.values, x.scales, float_dtype(x)
    return (*quantize(x), x.dtype)


def input_like(x):
    """A residual recording the input's kind and float dtype, nothing of its values."""
    if isinstance(x, Fp8Rows):
        return Fp8Rows(None, None, jnp.zeros((), x.grad.dtype))
    return jnp.zeros((), x.dtype)


def input_cotangent(like, dx, block: int):
    """The cotangent of a grouped GEMM's input from its gradient ``dx``: for :class:`Fp8Rows`, ``dx`` is the
    sink's (the E4M3 values and scales get zeros, which the dispatch ignores)."""
    if not isinstance(like, Fp8Rows):
        return dx.astype(like.dtype)
    scales = jnp.zeros_like(dx, jnp.float32, shape=(dx.shape[0], _cdiv(dx.shape[1], block)))
    return Fp8Rows(jnp.zeros_like(dx, E4M3), scales, dx.astype(like.grad.dtype))


def rows_array(x):
    """An array with the input's rows and mesh typing (the E4M3 values of :class:`Fp8Rows`)."""
    return x.values if isinstance(x, Fp8Rows) else x


def float_dtype(x):
    """The input's float dtype (:class:`Fp8Rows`: the rows' before quantisation)."""
    return x.grad.dtype if isinstance(x, Fp8Rows) else x.dtype


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def dispatch(recipe: Fp8Recipe, move, x, index) -> Fp8Rows:
    """``x [m, K]`` quantised in ``1 x B`` tiles as the grouped GEMMs here would (:func:`row_quantizer`), its
    E4M3 values (as bytes) and scales moved by ``move(a, index)`` (a row movement: every result row a copy of
    one row of ``a``, or zeros), as :class:`Fp8Rows`; the sink's cotangent goes back through ``move``'s
    transpose to ``x``. ``move`` must be a function of its arguments alone (no captured arrays)."""
    return _dispatch_fwd(recipe, move, x, index)[0]


def _dispatch_fwd(recipe, move, x, index):
    xq, sx = row_quantizer(recipe)(x)
    # moved as bytes: every gather and exchange takes uint8 (not every collective of every backend takes fp8)
    values = jax.lax.bitcast_convert_type(move(jax.lax.bitcast_convert_type(xq, jnp.uint8), index), xq.dtype)
    rows = Fp8Rows(values, move(sx, index), jnp.zeros_like(values, x.dtype))
    # A [m, 0] array carries x's row count, dtype and mesh typing to the backward.
    return rows, (index, jnp.zeros_like(x, shape=(x.shape[0], 0)))


def _dispatch_bwd(recipe, move, residuals, ct):
    index, like_x = residuals
    # move is linear: its transpose moves the rows' gradient back (the forward pass on zeros is dead code)
    _, pullback = jax.vjp(lambda a: move(a, index), jnp.zeros_like(like_x, shape=(like_x.shape[0], ct.grad.shape[1])))
    return pullback(ct.grad.astype(like_x.dtype))[0], None


dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)
