"""The routed experts' grouped FP8 GEMMs as Pallas TPU kernels (``Fp8Recipe(backend="pallas")``, ``"auto"`` on
TPU): :mod:`dsjax.ops.fp8_pallas`'s tiles and numerics over a batch of rows sorted by expert.

In XLA the grouped GEMMs of :func:`dsjax.ops.fp8_grouped.fp8_ragged_dot` keep fp32 copies of their operands and
results per chunk of rows, and the weight gradient's re-tiling gathers and converts each chunk's rows: on a
scanned V3 layer step (v5p, 4 x 4096 tokens per chip) ~5 GiB of temporaries more than the bf16 step's megablox
kernels. Here every tile is quantised and multiplied in VMEM. The schedule is megablox's (JAX's bf16 grouped
kernels, whose :func:`make_group_metadata` is used as it is): the batch walked in aligned ``tm``-row tiles, one
*visit* per (tile, expert) overlap, the visit's expert and tile scalar-prefetched so each visit reads its own
expert's weight blocks, a tile's visits consecutive.

* :func:`grouped_matmul`: ``y[rows of e] = a[rows of e] . b[e]`` (``b[e]^T`` for the input gradient), ``a``
  E4M3 with its scales or float quantised in the kernel; each visit stores only its expert's rows of the
  output tile. :func:`grouped_matmul_sum`: several such products summed in one pass (the SwiGLU pair's input
  gradient, one result instead of two to add).
* :func:`grouped_weight_grad`: ``dw[e] = x_e^T . g_e`` with both operands re-tiled ``128 x 1`` along the
  tokens in the kernel. A token tile is one aligned 128-row tile of the batch restricted to one expert's rows
  (``dsjax.ops.fp8_grouped._expert_tiles``: the same tiles in the XLA backends and the tests' NumPy oracle).
  Every expert is visited, so an expert without tokens gets zeros.

The kernels take the rows of one device (``fp8_grouped.py`` calls them where no mesh axis is left to split:
unpartitioned, or inside expert parallelism's ``shard_map``); rows past ``sum(group_sizes)`` give zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.megablox.gmm import make_group_metadata

from dsjax.ops.fp8_pallas import (
    LANE,
    TileRecipe,
    _column,
    _cost,
    _dot,
    _e4m3_bf16,
    _interpret,
    _pad,
    _round_up,
    _scale,
    _tile,
    block_product,
)
from dsjax.ops.moe import zero_rows_past_groups


def _row_tile(m: int) -> int:
    """Rows per visit: 512 (fewer weight-block reads per row) unless the batch is smaller."""
    return 512 if m >= 512 else LANE


def _metadata(group_sizes, mp: int, tm: int, *, visit_empty: bool):
    """megablox's visit schedule: ``(offsets [E + 1], expert [V], tile [V])`` and the visit count ``V``."""
    return make_group_metadata(
        group_sizes=group_sizes.astype(jnp.int32),
        m=mp,
        tm=tm,
        start_group=jnp.zeros((), jnp.int32),
        num_nonzero_groups=group_sizes.shape[0],
        visit_empty_groups=visit_empty,
    )


# ---- y = a . b[expert] ------------------------------------------------------------------------------------


def _gmm_kernel(offsets, experts, tiles_m, *refs, tm, terms, **product):
    """``terms``: ``(first step, steps, bk)`` of each product; the grid's contraction steps run through them in
    turn, each term's four refs (a, its scales, b, its scales) read while its steps last."""
    *term_refs, o_ref, acc_ref = refs
    visit, step = pl.program_id(1), pl.program_id(2)

    @pl.when(step == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    for t, (first, steps, bk) in enumerate(terms):

        @pl.when((step >= first) & (step < first + steps))
        def _(t=t, first=first, bk=bk):
            a_ref, sa_ref, b_ref, sb_ref = term_refs[4 * t : 4 * t + 4]
            acc_ref[...] = block_product(acc_ref[...], a_ref, sa_ref, b_ref, sb_ref, step - first, bk=bk, **product)

    @pl.when(step == pl.num_programs(2) - 1)
    def _():  # this visit's expert's rows of the tile; the others are another visit's (or past the end)
        expert = experts[visit]
        acc = acc_ref[...]
        rows = jax.lax.broadcasted_iota(jnp.int32, acc.shape, 0) + tiles_m[visit] * tm
        mine = (rows >= offsets[expert]) & (rows < offsets[expert + 1])
        o_ref[...] = jnp.where(mine, acc, o_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


def grouped_matmul(
    a,
    sa,
    bq,
    sb_cols,
    group_sizes,
    *,
    out_dtype=jnp.float32,
    tiles: TileRecipe | None = None,
    transpose_b: bool = False,
):
    """``y [M, N]``: rows of expert ``e`` (rows sorted by expert, ``group_sizes [E]``) times ``b[e]``, promoted
    every 128 of the contraction; rows past ``sum(group_sizes)`` are zeros.

    ``a [M, K]``: E4M3 in 1 x 128 tiles with ``sa [M, K/128]``, or float quantised in the kernel with ``tiles``
    (``sa`` unused). ``bq [E, K, N]`` E4M3 (``[E, N, K]`` with ``transpose_b``: the input gradient's ``w^T``
    without a transposed copy), ``sb_cols [E, K/128, N]``: each output column's scale per 128 of the contraction.
    """
    terms = [(a, sa, bq, sb_cols)]
    return grouped_matmul_sum(terms, group_sizes, out_dtype=out_dtype, tiles=tiles, transpose_b=transpose_b)


def grouped_matmul_sum(terms, group_sizes, *, out_dtype=jnp.float32, tiles=None, transpose_b=False):
    """``sum_t a_t . b_t[expert]`` over ``terms`` ``[(a, sa, bq, sb_cols), ...]`` (each as in
    :func:`grouped_matmul`, their contractions of any sizes) in one pass: one output, accumulated in fp32 in
    VMEM. The experts' SwiGLU input gradient ``g_gate . w_gate^T + g_up . w_up^T`` this way keeps one ``[M, K]``
    result in HBM, not two to be added."""
    m = terms[0][0].shape[0]
    e = terms[0][2].shape[0]
    n = terms[0][2].shape[1] if transpose_b else terms[0][2].shape[2]
    tm = _row_tile(m)
    mp = _round_up(m, tm)
    np_, bn = _tile(n)
    meta, visits = _metadata(group_sizes, mp, tm, visit_empty=False)

    args, in_specs, schedule, nbytes, flops_k = [], [], [], mp * np_ * jnp.dtype(out_dtype).itemsize, 0
    for a, sa, bq, sb_cols in terms:
        kp, bk = _tile(a.shape[1])
        kb, first, steps = kp // LANE, sum(t[1] for t in schedule), kp // bk
        schedule.append((first, steps, bk))
        flops_k += kp

        def at(s, first=first, steps=steps):  # this term's contraction block at grid step s (held outside)
            return jnp.clip(s - first, 0, steps - 1)

        args.append(_pad(a, (mp, kp)))
        in_specs.append(pl.BlockSpec((tm, bk), lambda j, v, s, off, ex, mt, at=at: (mt[v], at(s))))
        if tiles is None:
            args.append(_pad(sa, (mp, kb)))
            in_specs.append(pl.BlockSpec((tm, kb), lambda j, v, s, off, ex, mt: (mt[v], 0)))
        else:  # no scales to read: a stand-in the kernel ignores
            args.append(jnp.zeros((8, LANE), jnp.float32))
            in_specs.append(pl.BlockSpec((8, LANE), lambda j, v, s, off, ex, mt: (0, 0)))
        if transpose_b:
            args.append(_pad(bq, (e, np_, kp)))
            in_specs.append(pl.BlockSpec((None, bn, bk), lambda j, v, s, off, ex, mt, at=at: (ex[v], j, at(s))))
        else:
            args.append(_pad(bq, (e, kp, np_)))
            in_specs.append(pl.BlockSpec((None, bk, bn), lambda j, v, s, off, ex, mt, at=at: (ex[v], at(s), j)))
        args.append(_pad(sb_cols, (e, kb, np_))[:, :, None, :])  # [E, K/B, 1, N]: a row per slice
        in_specs.append(
            pl.BlockSpec((None, bk // LANE, 1, bn), lambda j, v, s, off, ex, mt, at=at: (ex[v], at(s), 0, j))
        )
        nbytes += args[-4].size * args[-4].dtype.itemsize * (np_ // bn) + args[-2].size * args[-2].dtype.itemsize

    kernel = functools.partial(
        _gmm_kernel,
        tm=tm,
        terms=tuple(schedule),
        tiles=tiles,
        exact=_interpret() is not None,
        transpose_b=transpose_b,
    )
    y = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(np_ // bn, visits, sum(t[1] for t in schedule)),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((tm, bn), lambda j, v, s, off, ex, mt: (mt[v], j)),
            scratch_shapes=[pltpu.VMEM((tm, bn), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        # visits of one row tile are consecutive and share its output block: "arbitrary", in order
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        cost_estimate=_cost(mp, flops_k, np_, nbytes),
        interpret=_interpret(),
        name="dsjax_fp8_grouped_matmul",
    )(*meta, *args)
    return zero_rows_past_groups(y[:m, :n], group_sizes)


# ---- dw[e] = x_e^T . g_e, re-tiled along the tokens in the kernel -----------------------------------------


def _gwgrad_kernel(offsets, experts, tiles_m, x_ref, sx_ref, g_ref, o_ref, acc_ref, *, tm, bk, x_tiles, g_tiles, exact):
    block, visit = pl.program_id(0), pl.program_id(2)
    last = pl.num_programs(2) - 1
    expert = experts[visit]

    @pl.when((visit == 0) | (experts[jnp.maximum(visit - 1, 0)] != expert))
    def _():  # an expert's first visit
        acc_ref[...] = jnp.zeros_like(acc_ref)

    start, end = offsets[expert], offsets[expert + 1]

    @pl.when(end > start)
    def _():
        # each 128-long slice's token scales, the whole visit's rows at once (a masked lane sum each)
        x_scales = [_column(sx_ref, block * (bk // LANE) + c) for c in range(bk // LANE)]  # [tm, 1] each
        for j in range(tm // LANE):  # one 128-token tile (one promotion) at a time
            tokens = slice(j * LANE, (j + 1) * LANE)
            row = jax.lax.broadcasted_iota(jnp.int32, (LANE, 1), 0) + tiles_m[visit] * tm + j * LANE
            mine = (row >= start) & (row < end)  # the tile's rows of this expert
            g = jnp.where(mine, g_ref[tokens, :].astype(jnp.float32), 0.0)  # [128, bn]
            sg = _scale(jnp.max(jnp.abs(g), axis=0, keepdims=True), g_tiles, exact)  # [1, bn]
            gq = _e4m3_bf16(g, sg, exact)
            for c in range(bk // LANE):
                cols = slice(c * LANE, (c + 1) * LANE)
                # x's tile dequantised from its forward 1 x B tiles, masked, then re-quantised along the tokens
                x = jnp.where(mine, x_ref[tokens, cols].astype(jnp.float32) * x_scales[c][tokens], 0.0)
                xt = x.T  # [128 channels, 128 tokens]
                sx = _scale(jnp.max(jnp.abs(xt), axis=1, keepdims=True), x_tiles, exact)  # [128, 1]
                part = _dot(_e4m3_bf16(xt, sx, exact), gq)
                acc_ref[cols, :] += part * (sx * sg)

    @pl.when((visit == last) | (experts[jnp.minimum(visit + 1, last)] != expert))
    def _():  # the expert's last visit
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def grouped_weight_grad(xq, sx, g, group_sizes, *, x_tiles: TileRecipe, g_tiles: TileRecipe, out_dtype=jnp.float32):
    """``dw [E, K, N]`` in ``out_dtype`` (summed in fp32): ``dw[e] = x_e^T . g_e`` over expert ``e``'s rows of
    an expert-sorted batch, both operands re-tiled 128 x 1 along the tokens (aligned 128-row tiles split at
    expert boundaries). ``xq [M, K]`` E4M3 with its forward scales ``sx [M, K/128]`` (dequantised, re-quantised
    with ``x_tiles``), ``g [M, N]`` float (quantised with ``g_tiles``). Experts without rows get zeros."""
    m, k = xq.shape
    n = g.shape[1]
    e = group_sizes.shape[0]
    tm = _row_tile(m)
    mp = _round_up(m, tm)
    (kp, bk), (np_, bn) = _tile(k), _tile(n)
    kb = kp // LANE
    meta, visits = _metadata(group_sizes, mp, tm, visit_empty=True)
    x, sxp, gp = _pad(xq, (mp, kp)), _pad(sx, (mp, kb)), _pad(g, (mp, np_))
    out_bytes = e * kp * np_ * jnp.dtype(out_dtype).itemsize
    nbytes = x.size * (np_ // bn) + gp.size * gp.dtype.itemsize * (kp // bk) + out_bytes
    kernel = functools.partial(
        _gwgrad_kernel, tm=tm, bk=bk, x_tiles=x_tiles, g_tiles=g_tiles, exact=_interpret() is not None
    )
    dw = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(kp // bk, np_ // bn, visits),
            in_specs=[
                pl.BlockSpec((tm, bk), lambda i, j, v, off, ex, mt: (mt[v], i)),
                pl.BlockSpec((tm, kb), lambda i, j, v, off, ex, mt: (mt[v], 0)),
                pl.BlockSpec((tm, bn), lambda i, j, v, off, ex, mt: (mt[v], j)),
            ],
            out_specs=pl.BlockSpec((None, bk, bn), lambda i, j, v, off, ex, mt: (ex[v], i, j)),
            scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((e, kp, np_), out_dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(kp, mp, np_, nbytes),
        interpret=_interpret(),
        name="dsjax_fp8_grouped_weight_grad",
    )(*meta, x, sxp, gp)
    return dw[:, :k, :n]
