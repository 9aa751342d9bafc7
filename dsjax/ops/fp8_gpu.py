"""DeepSeek-V3's FP8 GEMMs on NVIDIA Hopper GPUs as Pallas Mosaic-GPU kernels (DeepGEMM's design: E4M3 ``wgmma``
with each 128-long slice of the contraction promoted to an fp32 accumulator, its scales applied there), for
``Fp8Recipe(backend="auto")`` on GPU (:func:`dsjax.ops.fp8.uses_gpu_kernels`).

XLA:GPU compiles the ``blocked`` backend's GEMMs as they are written: the dense ones as a dot batched over the
128-wide slices of the contraction, whose fp32 partials it materialises before summing them (``f32[56, 4096,
16384]``, 14 GiB, for one input gradient of V3's attention output projection at 4,096 tokens), the grouped
ones (one ``ragged_dot`` per slice) as dense matmuls over every local expert (4.7x the model's flops on a V3
layer step). These kernels follow JAX's bf16 Mosaic-GPU grouped GEMMs (:mod:`dsjax.ops.gpu_gmm`: a persistent
grid over the SMs, TMA pipelines, one visit per (row tile, expert) overlap that stores only its expert's rows)
with E4M3 operands and their scales; a dense GEMM is the one-group case.

* :func:`grouped_matmul_sum`: ``y [m, n] = sum_t a_t[rows of e] . b_t[e]^T``, each ``a_t [m, c_t]`` E4M3 in 1 x
  128 tiles with its scales, each ``b_t [E, n, c_t]`` E4M3 with the contraction last (``wgmma`` takes 8-bit
  operands K-major only: the forward's ``w^T``, the input gradient's ``w`` as it is) and 128 x 128 block scales;
  widths off the tiles padded with zeros. Every 128 of the contraction is one ``wgmma`` into a zeroed
  accumulator, then ``acc += part * s_a[row] * s_b``: the products of a slice are exact in fp32 whatever
  Hopper's FP8 accumulation keeps (DeepSeek's reason for promoting every 128). Several terms share one
  accumulator (the SwiGLU pair's input gradient ``g_gate . w_gate + g_up . w_up``: one ``[m, c]`` result in
  HBM, not two to be added).
* :func:`grouped_weight_grad`: ``dw[e] = sum over e's token tiles t of x_t^T . g_t`` scaled per tile, row
  (``x``'s channel) and column (``g``'s), from both operands re-tiled 128 x 1 along the tokens and transposed
  (tokens last) by XLA beforehand: :func:`dsjax.ops.fp8_grouped._expert_tiles`' tiles, each expert's tiles
  consecutive, so the kernel needs no masking and an expert without tokens gets zeros.
* :func:`matmul` / :func:`weight_grad`: the dense GEMMs as one group, per device under a mesh (rows split like
  the batch, the weight whole, the weight gradient's partials summed by XLA), as :mod:`dsjax.ops.fp8_pallas`.

Numerics are those of the ``blocked`` backend: the same quantised bytes and scales and the same promotion
points; the fp32 arithmetic around them is ordered differently (the sums within and across slices, the two
scales applied one after the other), within 1e-6 relative of ``blocked`` in the tests. The kernels run on a
GPU; on CPU the tests run them in Pallas' Mosaic-GPU interpreter (``tests/mosaic_gpu_interpret.py``) against
the NumPy oracle, and ``tests/test_aot_gpu.py`` compiles them for an H200 (ptxas, sm_90a). The grouped ones are
called where the rows are the device's own (inside expert parallelism's ``shard_map``, or unpartitioned).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from dsjax.ops.fp8_pallas import _on_shards, _pad, _round_up
from dsjax.ops.gpu_gmm import _NUM_SMS
from dsjax.ops.moe import zero_rows_past_groups

# 128-long contraction slices (one scale block; 128 bytes of E4M3, one swizzled row). Output tiles are BLOCK rows
# x TILE_N columns: one warpgroup holds the running fp32 accumulator and the slice's product at once, 2 x 128 x
# 64 / 128 threads = 128 registers each; at 128 x 128 ptxas ran out of registers (255, with 80 / 524 bytes
# spilled in the matmul / weight-gradient kernels). A weight block's 128 columns are two such tiles, so its scale
# stays one scalar per tile. Widths off the 128-wide tiles (V2-Lite's dense MLP, 10,944; MLA's 576-wide
# `wkv_a`) are zero-padded: zeros add nothing to any sum. 4 stages of operands are 96 KiB of the H100/H200's
# 227 KiB shared memory per block.
BLOCK = 128
TILE_N = 64
STAGES = 4
E4M3 = jnp.float8_e4m3fn


def _kernel(body, out_type):
    return plgpu.kernel(
        body,
        out_type=out_type,
        grid=(_NUM_SMS,),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )


def _promote(a_smem, b_smem, row_scale, col_scale):
    """One 128-long slice's product in a fresh fp32 accumulator, times its scales: ``row_scale [BLOCK]`` per
    output row (or None), ``col_scale`` a scalar or ``[TILE_N]`` per output column."""

    def product(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, plgpu.transpose_ref(b_smem, (1, 0)))
        plgpu.wgmma_wait(0)
        return acc_ref[...]

    part = pl.run_scoped(product, plgpu.ACC((BLOCK, TILE_N)))
    shape = (BLOCK, TILE_N)
    if row_scale is not None:
        rows = plgpu.layout_cast(row_scale, plgpu.Layout.WGMMA.reduce(1))
        part = part * jax.lax.broadcast_in_dim(rows, shape, [0])
    if jnp.ndim(col_scale):
        cols = plgpu.layout_cast(col_scale, plgpu.Layout.WGMMA.reduce(0))
        return part * jax.lax.broadcast_in_dim(cols, shape, [1])
    return part * col_scale


def _zeros():
    return plgpu.layout_cast(jnp.zeros((BLOCK, TILE_N), jnp.float32), plgpu.Layout.WGMMA)


def _group_tile(group_sizes_gmem, visit, num_groups: int):
    """Visit ``visit`` of the row tiles: ``(expert, tile, first row of the expert in it, its row count)``. Tile
    ``t`` is visited once per expert with rows in it; expert ``e``'s tiles ``t`` are visits ``t + e`` (an empty
    expert whose start falls inside a tile takes one visit with no rows)."""
    expert = tile = first = count = jnp.int32(0)
    end = jnp.int32(0)
    for e in range(num_groups):  # few experts per device: unrolled selects, no early exit on a GPU
        start, end = end, end + group_sizes_gmem[e]
        lo, hi = start // BLOCK + e, (end - 1) // BLOCK + 1 + e
        here = (visit >= lo) & (visit < hi)
        t = visit - e
        expert = jnp.where(here, e, expert)
        tile = jnp.where(here, t, tile)
        first = jnp.where(here, jnp.maximum(start, t * BLOCK), first)
        count = jnp.where(here, jnp.minimum(end, (t + 1) * BLOCK) - jnp.maximum(start, t * BLOCK), count)
    return expert, tile, first - tile * BLOCK, count


def _store_rows(o_smem, o_gmem, row0, first, count, col0):
    """Rows ``first .. first + count - 1`` of the tile in ``o_smem`` to ``o_gmem`` rows ``row0 + first ..``: TMA
    copies have static shapes, so the rows go in power-of-two pieces, one per set bit of ``count``."""
    size = BLOCK
    while size:

        @pl.when(count & size != 0)
        def _(size=size, first=first):
            plgpu.copy_smem_to_gmem(
                o_smem.at[pl.ds(first, size)], o_gmem.at[pl.ds(row0 + first, size), pl.ds(col0, TILE_N)]
            )

        first = first + (count & size)
        size //= 2
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _matmul_sum_kernel(num_terms: int, m: int, n: int, num_groups: int, steps: tuple[int, ...], out_dtype):
    def grouped_matmul_sum_kernel(group_sizes_gmem, *refs):
        term_refs, o_gmem = refs[:-1], refs[-1]
        grid_m, grid_n = pl.cdiv(m, BLOCK) + num_groups - 1, n // TILE_N

        @plgpu.nd_loop((grid_m * grid_n,), collective_axes="sm")
        def _(loop):
            # Column-major over (visit, column tile): SMs running at once share weight columns. (Not
            # planar_snake(..., 1, 1): its remainder tile is 0 wide there, a `rem` by 0 that XLA:CPU traps on.)
            nj, visit = jax.lax.div(loop.index[0], grid_m), jax.lax.rem(loop.index[0], grid_m)
            expert, tile, first, count = _group_tile(group_sizes_gmem, visit, num_groups)

            def products(acc):
                for t in range(num_terms):
                    a_gmem, sa_gmem, b_gmem, sb_gmem = term_refs[4 * t : 4 * t + 4]

                    def step(index, a_smem, b_smem, sa_smem, acc, sb_gmem=sb_gmem):
                        scale = sb_gmem[expert, index[0], nj * TILE_N // BLOCK]
                        return acc + _promote(a_smem, b_smem, sa_smem[...], scale)

                    acc = plgpu.emit_pipeline(
                        step,
                        grid=(steps[t],),
                        in_specs=[
                            plgpu.BlockSpec((BLOCK, BLOCK), lambda s: (tile, s)),
                            plgpu.BlockSpec((TILE_N, BLOCK), lambda s: (nj, s)),
                            plgpu.BlockSpec((None, BLOCK), lambda s: (s, tile)),
                        ],
                        max_concurrent_steps=min(STAGES, steps[t]),
                        init_carry=acc,
                    )(a_gmem, b_gmem.at[expert], sa_gmem)
                return acc

            # visits without rows (an empty expert inside a tile, the schedule's spare visits) skip the products
            acc = jax.lax.cond(count > 0, products, lambda acc: acc, _zeros())

            @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((BLOCK, TILE_N), out_dtype))
            def _(o_smem):
                o_smem[...] = acc.astype(out_dtype)
                plgpu.commit_smem()
                _store_rows(o_smem, o_gmem, tile * BLOCK, first, count, nj * TILE_N)

    return _kernel(grouped_matmul_sum_kernel, jax.ShapeDtypeStruct((m, n), out_dtype))


def grouped_matmul_sum(terms, group_sizes, *, out_dtype):
    """``y [m, n]``: ``sum_t a_t . b_t[expert]^T`` over rows sorted by expert (``group_sizes [E]``), each
    128-long slice of every contraction promoted to fp32 with its scales; rows past ``sum(group_sizes)`` are 0.

    ``terms``: ``[(a [m, c] E4M3, sa [m, ceil(c/128)] fp32, b [E, n, c] E4M3, sb [E, ceil(c/128), ceil(n/128)]
    fp32), ...]`` (``c`` may differ between terms; widths off the tiles are padded with zeros)."""
    m = terms[0][0].shape[0]
    num_groups, n = terms[0][2].shape[:2]
    mp, np_ = _round_up(m, BLOCK), _round_up(n, BLOCK)
    args, steps = [], []
    for a, sa, b, sb in terms:
        c = a.shape[1]
        cp = _round_up(c, BLOCK)
        scales = (m, cp // BLOCK), (num_groups, cp // BLOCK, np_ // BLOCK)
        if b.shape != (num_groups, n, c) or (sa.shape, sb.shape) != scales:
            raise ValueError(
                f"grouped FP8 GEMM operands a {a.shape}, sa {sa.shape}, b {b.shape}, sb {sb.shape}: need a [m, c], b "
                f"[E, n, c] and scales {scales[0]}, {scales[1]} (one per 1 x {BLOCK} tile / {BLOCK} x {BLOCK} block)"
            )
        # the row scales transposed, [c/128, m]: a tile's scales for one slice are then one contiguous TMA row
        a, sa = _pad(a.astype(E4M3), (mp, cp)), _pad(sa.astype(jnp.float32), (mp, cp // BLOCK)).T
        args += [a, sa, _pad(b.astype(E4M3), (num_groups, np_, cp)), sb.astype(jnp.float32)]
        steps.append(cp // BLOCK)
    kernel = _matmul_sum_kernel(len(terms), mp, np_, num_groups, tuple(steps), jnp.dtype(out_dtype))
    return zero_rows_past_groups(kernel(group_sizes.astype(jnp.int32), *args)[:m, :n], group_sizes)


def grouped_matmul(a, sa, b, sb, group_sizes, *, out_dtype):
    """:func:`grouped_matmul_sum` of one term."""
    return grouped_matmul_sum([(a, sa, b, sb)], group_sizes, out_dtype=out_dtype)


def _weight_grad_kernel(k: int, n: int, num_groups: int, out_dtype):
    def grouped_weight_grad_kernel(first_gmem, count_gmem, x_gmem, sx_gmem, g_gmem, sg_gmem, o_gmem):
        grid_k, grid_n = k // BLOCK, n // TILE_N

        @plgpu.nd_loop((num_groups, grid_k * grid_n), collective_axes="sm")
        def _(loop):
            expert = loop.index[0]
            nj, ki = jax.lax.div(loop.index[1], grid_k), jax.lax.rem(loop.index[1], grid_k)
            first, count = first_gmem[expert], count_gmem[expert]

            def step(_, x_smem, g_smem, sx_smem, sg_smem, acc):
                return acc + _promote(x_smem, g_smem, sx_smem[...], sg_smem[...])

            def tiles(acc):
                return plgpu.emit_pipeline(
                    step,
                    grid=(count,),
                    in_specs=[
                        plgpu.BlockSpec((BLOCK, BLOCK), lambda t: (ki, first + t)),
                        plgpu.BlockSpec((TILE_N, BLOCK), lambda t: (nj, first + t)),
                        plgpu.BlockSpec((None, BLOCK), lambda t: (first + t, ki)),
                        plgpu.BlockSpec((None, TILE_N), lambda t: (first + t, nj)),
                    ],
                    max_concurrent_steps=STAGES,
                    init_carry=acc,
                )(x_gmem, g_gmem, sx_gmem, sg_gmem)

            acc = jax.lax.cond(count > 0, tiles, lambda acc: acc, _zeros())

            @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((BLOCK, TILE_N), out_dtype))
            def _(o_smem):
                o_smem[...] = acc.astype(out_dtype)
                plgpu.commit_smem()
                out = o_gmem.at[expert, pl.ds(ki * BLOCK, BLOCK), pl.ds(nj * TILE_N, TILE_N)]
                plgpu.copy_smem_to_gmem(o_smem, out)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    return _kernel(grouped_weight_grad_kernel, jax.ShapeDtypeStruct((num_groups, k, n), out_dtype))


def grouped_weight_grad(xt, sxt, gt, sgt, tiles_per_expert, *, out_dtype=jnp.float32):
    """``dw [E, k, n]``: ``dw[e] = sum_t (xt_t . gt_t^T) * sxt[t][:, None] * sgt[t][None, :]`` over expert
    ``e``'s token tiles ``t`` (its ``tiles_per_expert[e]`` tiles follow the previous experts').

    ``xt [k, T * 128]`` / ``gt [n, T * 128]``: E4M3, the tokens last, tile ``t`` in columns ``128 t .. 128 t +
    127`` (rows of other experts zero); ``sxt [T, k]`` / ``sgt [T, n]``: each tile's per-channel scales.
    ``k`` and ``n`` off the 128-wide tiles are padded with zeros."""
    (k, tokens), n = xt.shape, gt.shape[0]
    num_groups = tiles_per_expert.shape[0]
    if gt.shape[1] != tokens or tokens != BLOCK * sxt.shape[0] or (sxt.shape[1], sgt.shape) != (k, (sxt.shape[0], n)):
        raise ValueError(f"grouped FP8 weight gradient operands xt {xt.shape}, sxt {sxt.shape}, gt {gt.shape}, "
                         f"sgt {sgt.shape}: need [k, 128 T], [T, k], [n, 128 T], [T, n]")  # fmt: skip
    kp, np_ = _round_up(k, BLOCK), _round_up(n, BLOCK)
    tiles_per_expert = tiles_per_expert.astype(jnp.int32)
    first = jnp.cumsum(tiles_per_expert) - tiles_per_expert
    kernel = _weight_grad_kernel(kp, np_, num_groups, jnp.dtype(out_dtype))
    xt, gt = _pad(xt.astype(E4M3), (kp, tokens)), _pad(gt.astype(E4M3), (np_, tokens))
    sxt, sgt = _pad(sxt, (sxt.shape[0], kp)), _pad(sgt, (sgt.shape[0], np_))
    return kernel(first, tiles_per_expert, xt, sxt, gt, sgt)[:, :k, :n]


# ---- dense GEMMs: one group ------------------------------------------------------------------------------------


def matmul(a, sa, b, sb, *, out_dtype):
    """``a . b^T`` promoted every 128 of the contraction -> ``[M, N]``: ``a [M, C]`` E4M3 (1 x 128 tiles, ``sa
    [M, C/128]``), ``b [N, C]`` E4M3 with ``sb [C/128, N/128]`` block scales. Under a mesh, per device: the rows
    split like the batch, ``b`` whole."""

    def local(a, sa, b, sb):
        rows = jnp.full((1,), a.shape[0], jnp.int32)
        return grouped_matmul(a, sa, b[None], sb[None], rows, out_dtype=out_dtype)

    return _on_shards(local, (a, sa), (b, sb))


def weight_grad(retile, xq, sx, g, *, out_dtype=jnp.float32):
    """``dw [K, N] = x^T . g`` with both operands re-tiled 128 x 1 along the tokens: ``retile(xq, sx, g) -> (xt
    [K, M], sxt [K, M/128], gt [N, M], sgt [N, M/128])`` (E4M3 with their scales; the tokens last), called on
    each device's rows, padded to a multiple of 128 with zeros (which change no tile's amax). Under a mesh the
    devices' tiles are the single-device ones (the rows split in multiples of 128) and XLA sums their partial
    gradients, each rounded to ``out_dtype`` first (as :func:`dsjax.ops.fp8_pallas.weight_grad`'s)."""

    def local(xq, sx, g):
        pad = ((0, -xq.shape[0] % BLOCK), (0, 0))
        xt, sxt, gt, sgt = retile(jnp.pad(xq, pad), jnp.pad(sx, pad), jnp.pad(g, pad))
        tiles = jnp.full((1,), xt.shape[1] // BLOCK, jnp.int32)
        return grouped_weight_grad(xt, sxt.T, gt, sgt.T, tiles, out_dtype=out_dtype)[0]

    return _on_shards(local, (xq, sx, g), tile=BLOCK, partial_sum=True)
