"""The experts' grouped FP8 GEMM (DeepSeek-V3's recipe, as :mod:`dsjax.ops.fp8`'s dense one), stateless and
differentiable: ``fp8_ragged_dot`` -- rows sorted by expert, ``w [E, K, N]`` with BxB blocks per expert -- and the
``gmm`` / ``bmm`` factories the MoE dispatches take (:class:`GroupedMatmul`, :func:`blocked_matmul`).

The weight gradient tiles the tokens ``B x 1`` in the batch's aligned ``B``-row tiles split at expert boundaries
(:func:`_expert_tiles`), so a tile never mixes two experts' tokens. Backends as in :mod:`dsjax.ops.fp8`;
``pallas`` runs :mod:`dsjax.ops.fp8_grouped_pallas`'s kernels where the rows are the device's own (inside expert
parallelism, or unpartitioned) and ``blocked`` elsewhere; ``auto`` on GPU runs :mod:`dsjax.ops.fp8_gpu`'s
Mosaic-GPU kernels there (:func:`dsjax.ops.fp8.uses_gpu_kernels`). Expert weights may be float (quantised here), E4M3
with their scales (no weight gradient), or quantised ahead with a gradient sink (:func:`fp8_experts`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from dsjax.config import Fp8Recipe
from dsjax.ops import fp8_gpu, fp8_grouped_pallas, fp8_rows
from dsjax.ops.fp8 import (
    _HIGHEST,
    E4M3,
    Fp8Weight,
    _cast,
    _cdiv,
    _dequantize_cols,
    _dgrad_dtype,
    _grad_recipe,
    _kernel_tiles,
    _pad_axis,
    _reduce,
    _reductions,
    dequantize_rows,
    fp8_matmul,
    fp8_weight,
    quantize_blocks,
    quantize_rows,
    sink_dtype,
    tile_scale,
    uses_gpu_kernels,
)
from dsjax.ops.fp8_rows import Fp8Rows
from dsjax.sharding import free_axes


def _gpu_kernels(recipe: Fp8Recipe) -> bool:
    """:func:`dsjax.ops.fp8.uses_gpu_kernels`, here: where no mesh axis is left to split (else ``blocked``, the
    same values)."""
    return uses_gpu_kernels(recipe) and not free_axes()


def _row_experts(group_sizes, rows: int):
    """Expert of every row of an expert-sorted batch; ``E`` for rows past the last group."""
    return jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(rows), side="right")


_ROW_CHUNK_BYTES = 1 << 30  # fp32 [rows, width] temporaries of one chunk of rows of a grouped GEMM


def _row_chunk(s_rows: int, width: int, b: int) -> int:
    """Rows per chunk for a grouped GEMM whose widest operand or result has ``width`` columns: a multiple of
    ``b`` of about ``_ROW_CHUNK_BYTES`` of fp32 (all the rows when they fit)."""
    rows = max(b, _ROW_CHUNK_BYTES // (4 * width) // b * b)
    if rows >= s_rows:
        return s_rows
    # chunks of equal size, so that S rows split without padding when they can (a padded copy of x otherwise)
    return _cdiv(_cdiv(s_rows, _cdiv(s_rows, rows)), b) * b


def _chunk_groups(group_sizes, start, rows: int):
    """The group sizes of rows ``[start, start + rows)`` of an expert-sorted batch."""
    ends = jnp.cumsum(group_sizes)
    return (jnp.clip(ends, start, start + rows) - jnp.clip(ends - group_sizes, start, start + rows)).astype(
        group_sizes.dtype
    )


def _over_row_chunks(fn, row_args, group_sizes, chunk: int):
    """``fn(*row_args, group_sizes)`` a chunk of consecutive rows at a time (a scan), outputs concatenated along
    rows. Quantisation and the grouped GEMMs keep fp32 copies of their operands and results: on all the rows at
    once, one V3 expert GEMM's forward and backward (131,072 rows, 4 x 4096 tokens x top-8, 16 experts, v5p) took
    19.2 GiB of temporaries, 3.3 GiB in chunks (the bf16 megablox kernel: 0.5 GiB)."""
    s_rows = row_args[0].shape[0]
    if chunk >= s_rows:
        return fn(*row_args, group_sizes)
    n = _cdiv(s_rows, chunk)
    stacked = [_pad_axis(a, 0, n * chunk).reshape(n, chunk, *a.shape[1:]) for a in row_args]

    def body(_, inputs):
        i, *chunk_args = inputs
        return None, fn(*chunk_args, _chunk_groups(group_sizes, i * chunk, chunk))

    _, ys = jax.lax.scan(body, None, (jnp.arange(n), *stacked))
    return jax.tree.map(lambda y: y.reshape(n * chunk, *y.shape[2:])[:s_rows], ys)


def _expert_column_scales(sw, n: int, block: int):
    """Expert block scales ``[E, K/B, N/B]`` as one scale per column per ``B`` rows, ``[E, K/B, N]``."""
    return jnp.repeat(sw, block, axis=2)[:, :, :n]


def _ragged_gemm(xq, sx, wq, sw, group_sizes, *, col_block: int, recipe: Fp8Recipe):
    """Grouped ``x_rows . w[expert(row)]`` in fp32: ``xq [S, K]`` 1xB tiles, ``wq [E, K, N]`` with
    ``sw [E, K/B, N/col_block]``. Rows past ``sum(group_sizes)`` give zeros (as ``ragged_dot``)."""
    b = recipe.block
    s_rows, k = xq.shape
    e, _, n = wq.shape
    kb, ns = sw.shape[1:]
    if recipe.backend == "reference":
        x = dequantize_rows(xq, sx, b)
        w = jax.vmap(lambda q, s: _dequantize_cols(q, s, b, col_block))(wq, sw)[:, :k, :n]
        return jax.lax.ragged_dot(x, w, group_sizes, precision=_HIGHEST, preferred_element_type=jnp.float32)
    row_expert = _row_experts(group_sizes, s_rows)
    experts = jnp.minimum(row_expert, e - 1)
    # Rows past the last group give 0 (as ragged_dot), even if their scale is inf (0 * inf would be NaN).
    sx = jnp.where((row_expert < e)[:, None], sx, 0.0)
    xp = _pad_axis(xq, 1, kb * b)
    wp = _pad_axis(_pad_axis(wq, 1, kb * b), 2, ns * col_block)

    def part(i):  # the i-th B-long slice of the contraction, scaled; sliced in place (no transposed copies)
        xs = jax.lax.dynamic_slice_in_dim(xp, i * b, b, axis=1)  # [S, B]
        ws = jax.lax.dynamic_slice_in_dim(wp, i * b, b, axis=1)  # [E, B, N']
        sxs = jax.lax.dynamic_index_in_dim(sx, i, axis=1, keepdims=False)  # [S]
        sws = jax.lax.dynamic_index_in_dim(sw, i, axis=1, keepdims=False)[experts]  # [S, N / col_block]
        prod = jax.lax.ragged_dot(xs, ws, group_sizes, preferred_element_type=jnp.float32)
        return prod * sxs[:, None] * jnp.repeat(sws, col_block, axis=1)

    # The first slice starts the sum (a zeros carry would lack the shard_map "varying" type of the others).
    acc = part(0)
    if kb > 1:
        acc = jax.lax.fori_loop(1, kb, lambda i, acc: acc + part(i), acc)
    return acc[:, :n]


_WGRAD_CHUNK_BYTES = 256 << 20  # fp32 partial products of the blocked grouped weight gradient alive at once


def _expert_tiles(group_sizes, s_rows: int, b: int):
    """The weight gradient's token tiles of an expert-sorted batch: the batch's ``b``-row tiles (rows ``t*b ..
    t*b + b - 1``) split where an expert's rows start or end, so a tile never mixes two experts' tokens and a
    kernel walking the batch in aligned tiles meets the same ones (when every expert's rows start at a multiple
    of ``b``, as in DeepSeek's grouped kernels' contiguous layout, these are simply each expert's ``b``-row
    tiles). Returns ``rows [T, b]`` (the source row of every tile slot, 0 where empty), ``valid [T, b]``,
    ``tile_expert [T]`` and ``tiles_per_expert [E]``, with ``T = ceil(S / b) + E`` (a static bound on the
    number of (tile, expert) overlaps, ``ceil(S / b) + E - 1``)."""
    e = group_sizes.shape[0]
    num_tiles = -(-s_rows // b) + e
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    tiles_per = jnp.where(group_sizes > 0, (ends - 1) // b - starts // b + 1, 0)
    tile_ends = jnp.cumsum(tiles_per)
    t = jnp.arange(num_tiles)
    tile_expert = jnp.minimum(jnp.searchsorted(tile_ends, t, side="right"), e - 1)
    tile = starts[tile_expert] // b + t - (tile_ends - tiles_per)[tile_expert]
    rows = tile[:, None] * b + jnp.arange(b)[None, :]
    valid = (rows >= starts[tile_expert][:, None]) & (rows < ends[tile_expert][:, None])
    valid = valid & (t < tile_ends[-1])[:, None]
    return jnp.where(valid, rows, 0), valid, tile_expert, tiles_per


def _ragged_wgrad(xq, sx, g, group_sizes, recipe: Fp8Recipe, out_dtype=jnp.float32):
    """``dw[e] = x_e^T . g_e`` with x and g re-tiled ``B x 1`` along the tokens in :func:`_expert_tiles`'
    tiles (a tile never mixes two experts' tokens). Returns ``[E, K, N]`` in ``out_dtype`` (summed in fp32). The
    blocked backend forms one fp32 ``[K, N]`` partial product per tile (``S/B + E`` tiles), ``_WGRAD_CHUNK_BYTES``
    of them at a time."""
    if fp8_rows.grouped_kernels(recipe):
        x_tiles, g_tiles = _kernel_tiles(recipe), _kernel_tiles(_grad_recipe(recipe))
        return fp8_grouped_pallas.grouped_weight_grad(
            xq, sx, g, group_sizes, x_tiles=x_tiles, g_tiles=g_tiles, out_dtype=out_dtype
        )
    b = recipe.block
    s_rows, k = xq.shape
    e = group_sizes.shape[0]
    n = g.shape[1]
    rows, valid, tile_expert, tiles_per = _expert_tiles(group_sizes, s_rows, b)
    num_tiles = rows.shape[0]

    def tile_quantize(v, valid, tile_recipe):  # v [T, B, C] fp32 -> q [T, B, C], s [T, C]
        v = jnp.where(valid[..., None], v, 0.0)
        s = tile_scale(jnp.max(jnp.abs(v), axis=1), tile_recipe)
        return _cast(v, s[:, None, :]), s

    def retiled(rows, valid):  # the rows gathered as they are (fp8 x with its scales, g in its dtype), re-tiled
        x_tiles, sxt = tile_quantize(dequantize_rows(xq[rows], sx[rows], b), valid, recipe)
        g_tiles, sgt = tile_quantize(g[rows].astype(jnp.float32), valid, _grad_recipe(recipe))
        return x_tiles, sxt, g_tiles, sgt

    if _gpu_kernels(recipe):  # the tiles re-tiled by XLA, tokens last (K-major for the E4M3 wgmma)
        # A chunk of tiles at a time: all at once, XLA kept the fp32 values of every tile, [T, B, K] (7.1 GiB at
        # 4 x 4096 tokens of a V3 layer per H200); per chunk they stay within _WGRAD_CHUNK_BYTES.
        chunk = max(1, min(num_tiles, _WGRAD_CHUNK_BYTES // (4 * b * (k + n))))
        chunks = -(-num_tiles // chunk)
        # padded with empty tiles (not lax.map's batch_size: its remainder and concatenation cost 1.8 GiB more)
        tiles = [_pad_axis(a, 0, chunks * chunk).reshape(chunks, chunk, b) for a in (rows, valid)]
        parts = jax.lax.map(lambda t: retiled(*t), tiles)
        x_tiles, sxt, g_tiles, sgt = (p.reshape(chunks * chunk, *p.shape[2:])[:num_tiles] for p in parts)
        xt, gt = (t.transpose(2, 0, 1).reshape(t.shape[2], -1) for t in (x_tiles, g_tiles))
        return fp8_gpu.grouped_weight_grad(xt, sxt, gt, sgt, tiles_per, out_dtype=out_dtype)
    if recipe.backend == "reference":
        x_tiles, sxt, g_tiles, sgt = retiled(rows, valid)
        x = (x_tiles.astype(jnp.float32) * sxt[:, None, :]).reshape(-1, k)
        gd = (g_tiles.astype(jnp.float32) * sgt[:, None, :]).reshape(-1, n)
        sizes = tiles_per * b  # the tiles are in expert order, b slots each
        _, pullback = jax.vjp(
            lambda w: jax.lax.ragged_dot(x, w, sizes, precision=_HIGHEST), jnp.zeros((e, k, n), jnp.float32)
        )
        return pullback(gd)[0].astype(out_dtype)
    # Per-tile fp8 x fp8 -> fp32 products, scaled and added into their expert's gradient a chunk of tiles at a
    # time: all [tiles, K, N] partial products at once would be ~5.6 GB for 8192 rows of a 7168 x 2048 expert.
    # Each chunk re-tiles its own rows, so the fp32 values exist per chunk ([chunk, B, K + N], within the same
    # budget), never as [S, K] / [S, N] buffers.
    chunk = max(1, min(num_tiles, _WGRAD_CHUNK_BYTES // (4 * k * n), _WGRAD_CHUNK_BYTES // (4 * b * (k + n))))
    chunks = -(-num_tiles // chunk)
    pad = chunks * chunk - num_tiles

    def padded(a, value=0):
        a = jnp.concatenate([a, jnp.full((pad, *a.shape[1:]), value, a.dtype)]) if pad else a
        return a.reshape(chunks, chunk, *a.shape[1:])

    # padding tiles are empty and go to expert e: dropped by the scatter
    tiles = (padded(rows), padded(valid, False), padded(tile_expert, e))

    def add_chunk(acc, tiles_c):
        rows_c, valid_c, ec = tiles_c
        xc, sxc, gc, sgc = retiled(rows_c, valid_c)
        part = jax.lax.dot_general(xc, gc, (((1,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
        return acc.at[ec].add(part * sxc[:, :, None] * sgc[:, None, :], mode="drop"), None

    # The first chunk starts the sum: under shard_map a zeros carry would lack the "varying" type of the others.
    acc, _ = add_chunk(jnp.zeros((e, k, n), jnp.float32), jax.tree.map(lambda a: a[0], tiles))
    if chunks > 1:
        acc, _ = jax.lax.scan(add_chunk, acc, jax.tree.map(lambda a: a[1:], tiles))
    return acc.astype(out_dtype)


def _quantize_experts(w, recipe: Fp8Recipe):
    """:func:`quantize_blocks` of ``w [E, K, N]`` one expert at a time (the same values; the fp32 copies it
    makes are one expert's, not all of them: 4.5x the bf16 weights on v5p when done at once)."""
    if 4 * w.size <= _ROW_CHUNK_BYTES:
        return quantize_blocks(w, recipe)
    return jax.lax.map(lambda we: quantize_blocks(we, recipe), w)


def _grouped_forward(x, wq, sw, group_sizes, recipe: Fp8Recipe):
    """``(y in x's float dtype, xq, sx)``: x (or :class:`Fp8Rows`, quantised ahead) quantised and multiplied a
    chunk of rows at a time (in one pass by the kernels, which keep no fp32 copies)."""
    if fp8_rows.grouped_kernels(recipe):
        xq, sx, dtype = fp8_rows.quantized(x, fp8_rows.row_quantizer(recipe))
        sw_cols = _expert_column_scales(sw, wq.shape[2], recipe.block)
        return fp8_grouped_pallas.grouped_matmul(xq, sx, wq, sw_cols, group_sizes, out_dtype=dtype), xq, sx
    if _gpu_kernels(recipe):  # w^T: the kernels take E4M3 operands with the contraction last
        xq, sx, dtype = fp8_rows.quantized(x, fp8_rows.row_quantizer(recipe))
        y = fp8_gpu.grouped_matmul(xq, sx, wq.transpose(0, 2, 1), sw, group_sizes, out_dtype=dtype)
        return y, xq, sx
    dtype = fp8_rows.float_dtype(x)
    chunk = _row_chunk(fp8_rows.rows_array(x).shape[0], max(wq.shape[1:]), recipe.block)

    def gemm(xq, sx, gs):
        return _ragged_gemm(xq, sx, wq, sw, gs, col_block=recipe.block, recipe=recipe).astype(dtype)

    if isinstance(x, Fp8Rows):  # quantised ahead: kept as they are (not re-collected from the chunks)
        return _over_row_chunks(gemm, (x.values, x.scales), group_sizes, chunk), x.values, x.scales

    def rows(xc, gs):
        xq, sx = quantize_rows(xc, recipe)
        return gemm(xq, sx, gs), xq, sx

    return _over_row_chunks(rows, (x,), group_sizes, chunk)


def _grouped_dgrad(g, wq, sw, group_sizes, recipe, axes, dtype):
    """``dx = g . w^T`` per expert, a chunk of rows at a time, summed over ``axes``; in ``dtype``."""
    chunk_dtype = jnp.float32 if axes else dtype  # fp32 until summed over the reduction axes, if any
    if fp8_rows.grouped_kernels(recipe):  # g's tiles quantised in the kernel, w^T read in place
        sw_cols = _expert_column_scales(sw.transpose(0, 2, 1), wq.shape[1], recipe.block)
        tiles = _kernel_tiles(_grad_recipe(recipe))
        dx = fp8_grouped_pallas.grouped_matmul(
            g, None, wq, sw_cols, group_sizes, out_dtype=chunk_dtype, tiles=tiles, transpose_b=True
        )
        return _reduce(dx, axes, dtype)
    if _gpu_kernels(recipe):  # w as it is: for dx = g . w^T its contraction is already last
        gq, sg = quantize_rows(g, _grad_recipe(recipe))
        dx = fp8_gpu.grouped_matmul(gq, sg, wq, sw.transpose(0, 2, 1), group_sizes, out_dtype=chunk_dtype)
        return _reduce(dx, axes, dtype)
    wt, swt = wq.astype(E4M3).transpose(0, 2, 1), sw.transpose(0, 2, 1)

    def rows(gc, gs):
        gq, sg = quantize_rows(gc, _grad_recipe(recipe))
        return _ragged_gemm(gq, sg, wt, swt, gs, col_block=recipe.block, recipe=recipe).astype(chunk_dtype)

    width = max(g.shape[1], wq.shape[1])
    return _reduce(_over_row_chunks(rows, (g,), group_sizes, _row_chunk(g.shape[0], width, recipe.block)), axes, dtype)


def _int_zero(group_sizes):
    return np.zeros(group_sizes.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _grouped(recipe, axes, x, wq, sw, sink, group_sizes):
    return _grouped_fwd(recipe, axes, x, wq, sw, sink, group_sizes)[0]


def _grouped_fwd(recipe, axes, x, wq, sw, sink, group_sizes):
    """Pre-quantised experts: E4M3 with no weight gradient (nothing of ``x`` kept), or with a gradient ``sink``
    (:class:`Fp8Weight`: the dequantised weight's gradient, in the sink's dtype)."""
    y, xq, sx = _grouped_forward(x, wq, sw, group_sizes, recipe)
    if sink is None:
        xq = sx = None
    return y, (xq, sx, wq, sw, sink_dtype(sink), group_sizes, fp8_rows.input_like(x))


def _weight_grad(xq, sx, g, group_sizes, recipe, axes, grad_dtype):
    """The gradient of an expert weight's sink (``None`` without one: fp8-stored experts get none)."""
    if grad_dtype is None:
        return None
    dtype = grad_dtype.dtype  # Fp8Recipe.wgrad_dtype's, summed over the devices in it too
    return _reduce(_ragged_wgrad(xq, sx, g, group_sizes, recipe, out_dtype=dtype), axes, dtype)


def _grouped_bwd(recipe, axes, res, g):
    xq, sx, wq, sw, grad_dtype, group_sizes, like = res
    dx = _grouped_dgrad(g, wq, sw, group_sizes, recipe, axes[0], g.dtype)
    dw = _weight_grad(xq, sx, g, group_sizes, recipe, axes[1], grad_dtype)
    return (
        fp8_rows.input_cotangent(like, dx, recipe.block),
        jnp.zeros_like(wq),
        jnp.zeros_like(sw),
        dw,
        _int_zero(group_sizes),
    )


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def fp8_experts(w, recipe: Fp8Recipe, dtype, spec: PartitionSpec | None = None) -> Fp8Weight:
    """Float expert weights ``w [E, K, N]`` quantised in ``B x B`` blocks per expert ahead of the grouped GEMMs:
    :func:`dsjax.ops.fp8.fp8_weight` (``spec`` pins them to the weights' layout: quantised on their shards,
    gathered in E4M3 by expert parallelism), one expert at a time where they are the device's own."""
    return fp8_weight(w, recipe, dtype, spec, quantize=None if free_axes() else _quantize_experts)


def fp8_ragged_dot(x, w, group_sizes, recipe: Fp8Recipe, w_scale=None):
    """Grouped FP8 GEMM: ``x [S, K]`` rows sorted by expert (or :class:`Fp8Rows`, quantised ahead), ``w [E, K,
    N]``, ``group_sizes [E]`` -> ``[S, N]``.

    Same contract as ``jax.lax.ragged_dot``; ``w`` float (quantised here in BxB blocks per expert), E4M3 with
    ``w_scale [E, ceil(K/B), ceil(N/B)]`` (no weight gradient), or an :class:`Fp8Weight` (its ``grad`` gets
    the weight gradient).
    """
    if not isinstance(w, Fp8Weight):
        w = fp8_experts(w, recipe, fp8_rows.float_dtype(x)) if w_scale is None else Fp8Weight(w, w_scale, None)
    axes = _reductions(fp8_rows.rows_array(x), w.values)
    return _grouped(recipe, axes, x, w.values, w.scales, w.grad, group_sizes.astype(jnp.int32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _gate_up(recipe, axes, x, gate: Fp8Weight, up: Fp8Weight, group_sizes):
    return _gate_up_fwd(recipe, axes, x, gate, up, group_sizes)[0]


def _gate_up_fwd(recipe, axes, x, gate, up, group_sizes):
    # x quantised once for both projections (and both weight gradients), here or before its dispatch
    xq, sx, dtype = fp8_rows.quantized(x, fp8_rows.row_quantizer(recipe))
    if _gpu_kernels(recipe):  # w^T: E4M3 operands with the contraction last
        outs = tuple(
            fp8_gpu.grouped_matmul(xq, sx, w.values.transpose(0, 2, 1), w.scales, group_sizes, out_dtype=dtype)
            for w in (gate, up)
        )
    else:
        outs = tuple(
            fp8_grouped_pallas.grouped_matmul(
                xq,
                sx,
                w.values,
                _expert_column_scales(w.scales, w.values.shape[2], recipe.block),
                group_sizes,
                out_dtype=dtype,
            )
            for w in (gate, up)
        )
    held = tuple((w.values, w.scales, sink_dtype(w.grad)) for w in (gate, up))
    return outs, (xq, sx, held, group_sizes, fp8_rows.input_like(x))


def _gate_up_bwd(recipe, axes, res, cts):
    xq, sx, held, group_sizes, like = res
    b = recipe.block
    dx_dtype = _dgrad_dtype(axes[0], cts[0].dtype)
    if _gpu_kernels(recipe):  # g_gate . w_gate^T + g_up . w_up^T in one accumulator
        terms = [
            (*quantize_rows(g, _grad_recipe(recipe)), v, sw.transpose(0, 2, 1))
            for g, (v, sw, _) in zip(cts, held, strict=True)
        ]
        dx = fp8_gpu.grouped_matmul_sum(terms, group_sizes, out_dtype=dx_dtype)
    else:
        terms = [
            (g, None, v, _expert_column_scales(sw.transpose(0, 2, 1), v.shape[1], b))
            for g, (v, sw, _) in zip(cts, held, strict=True)
        ]
        dx = fp8_grouped_pallas.grouped_matmul_sum(
            terms, group_sizes, out_dtype=dx_dtype, tiles=_kernel_tiles(_grad_recipe(recipe)), transpose_b=True
        )
    dws = tuple(
        Fp8Weight(jnp.zeros_like(v), jnp.zeros_like(sw), _weight_grad(xq, sx, g, group_sizes, recipe, axes[1], k))
        for g, (v, sw, k) in zip(cts, held, strict=True)
    )
    return fp8_rows.input_cotangent(like, _reduce(dx, axes[0], cts[0].dtype), b), *dws, _int_zero(group_sizes)


_gate_up.defvjp(_gate_up_fwd, _gate_up_bwd)


class GroupedMatmul:
    """The experts' grouped FP8 GEMMs for :func:`dsjax.ops.moe.moe_ragged` / expert parallelism.

    ``gmm(x, w, group_sizes)`` is :func:`fp8_ragged_dot`; ``gmm.pair(x, w_gate, w_up, group_sizes)`` both SwiGLU
    input projections of the same rows (:func:`dsjax.ops.moe.gate_and_up` uses it). ``w``: a float ``[E, K, N]``,
    an ``(e4m3 [E, K, N], scales [E, K/B, N/B])`` pair (no weight gradient) or an :class:`Fp8Weight`. Where the
    grouped kernels run, the pair quantises ``x`` once for both and computes their input gradient ``g_gate .
    w_gate^T + g_up . w_up^T`` in one kernel pass (one ``[rows, K]`` result, not two to be added), float
    weights quantised by :func:`fp8_experts` (their gradients in ``wgrad_dtype``); elsewhere it is the two
    GEMMs. ``x`` may also be :class:`Fp8Rows`, quantised before the dispatch (:meth:`dispatch`)."""

    def __init__(self, recipe: Fp8Recipe):
        self.recipe = recipe

    def __call__(self, x, w, group_sizes):
        return fp8_ragged_dot(x, self._experts(w, fp8_rows.float_dtype(x)), group_sizes, self.recipe)

    def pair(self, x, w_gate, w_up, group_sizes):
        gate, up = (self._experts(w, fp8_rows.float_dtype(x)) for w in (w_gate, w_up))
        if not (fp8_rows.grouped_kernels(self.recipe) or _gpu_kernels(self.recipe)):
            return self(x, gate, group_sizes), self(x, up, group_sizes)
        axes = _reductions(fp8_rows.rows_array(x), gate.values)
        return _gate_up(self.recipe, axes, x, gate, up, group_sizes.astype(jnp.int32))

    def dispatch(self, x, move, index):
        """``move(x, index)``, the rows this ``gmm`` takes (:func:`dsjax.ops.moe.dispatch_rows`). With
        ``Fp8Recipe.quantized_dispatch``, ``x`` is quantised here, in the ``1 x B`` tiles the GEMMs would give
        the moved rows (the same values: a tile is within a row), and its E4M3 values and scales are moved
        (:func:`dsjax.ops.fp8_rows.dispatch`): :class:`Fp8Rows`, half the bytes of bf16 rows across the
        exchange, whose input gradient ``move``'s transpose takes back to ``x``."""
        if not self.recipe.quantized_dispatch:
            return move(x, index)
        return fp8_rows.dispatch(self.recipe, move, x, index)

    def _experts(self, w, dtype) -> Fp8Weight:
        if isinstance(w, Fp8Weight):
            return w
        if isinstance(w, tuple):  # fp8-stored experts: no gradient
            return Fp8Weight(*w, None)
        return fp8_experts(w, self.recipe, dtype)


def grouped_matmul(recipe: Fp8Recipe) -> GroupedMatmul:
    """The :class:`GroupedMatmul` ``gmm`` of ``recipe``."""
    return GroupedMatmul(recipe)


def blocked_matmul(recipe: Fp8Recipe):
    """A ``bmm(x [n, b, K], w, block_expert [n])`` for :func:`dsjax.ops.moe.moe_blocked`: each block of rows
    (one expert's) times its expert's weight as an FP8 GEMM. Weight blocks are quantised per expert (a gathered
    copy quantises to the same values). The weight gradient's token tiles are the dispatch blocks (``b`` rows,
    zero-padded; ``b`` < 128 when tokens per expert are few), so tiles stay within one expert but may be finer
    than the grouped op's 128 rows. ``w``: float ``[E, K, N]`` or an ``(e4m3, scales)`` pair. Like the grouped
    op it runs the ``blocked`` backend's XLA GEMMs where the recipe asks for the Pallas kernels (dense only)."""
    if recipe.backend in ("pallas", "auto"):
        recipe = dataclasses.replace(recipe, backend="blocked")

    def bmm(x, w, block_expert):
        if isinstance(w, tuple):
            q, s = w
            return jax.vmap(lambda xb, qb, sb: fp8_matmul(xb, qb, recipe, sb))(x, q[block_expert], s[block_expert])
        return jax.vmap(lambda xb, wb: fp8_matmul(xb, wb, recipe))(x, w[block_expert])

    return bmm
