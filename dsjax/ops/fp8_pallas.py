"""Fine-grained FP8 GEMMs as Pallas TPU kernels (``Fp8Recipe(backend="pallas")``, and ``"auto"`` on TPU).

The numerics of :mod:`dsjax.ops.fp8`'s ``blocked`` backend -- E4M3 tiles with online scales, fp8 x fp8
products summed in fp32 one ``B = 128``-long slice of the contraction at a time, both scales applied at each
promotion -- with every tile quantised, re-tiled and multiplied in VMEM. In XLA the same steps leave fp32
copies of whole tensors in HBM: the activation gradient converted and laid out again for the weight gradient's
transposed (128 x 1) quantisation held MLA's ``wq_b`` output gradient (``[16384, 24576]`` per v5p chip at 4 x
4096 tokens) in four fp32 layouts at the peak of a V3 layer's step. Three kernels:

* :func:`quantize`: ``x [M, K]`` -> E4M3 tiles and their scales (the forward's activations, cached for the
  weight gradient as DeepSeek's kernels cache them);
* :func:`scaled_matmul`: ``a [M, K] . b [K, N]`` with ``a`` in 1 x B tiles -- already quantised, or float and
  quantised tile by tile in the kernel (the input gradient's ``g``) -- and ``b`` in B x B blocks;
* :func:`weight_grad`: ``x^T . g`` from the cached fp8 ``x`` and the float ``g``, both re-tiled B x 1 along the
  tokens in the kernel.

Tile scales are computed where the tile is (``max(amax, floor) / 448``, optionally rounded up to a power of
two). v5p has no FP8 matrix unit: E4M3 values are exact in bf16, so the kernels multiply them as bf16 with fp32
accumulation, the products exact as in the ``blocked`` backend's fp8 dots. On CPU the kernels run in Pallas'
interpreter (the tests; GPU is refused), where divisions are the recipe's IEEE ones (XLA:CPU would turn a
division by a broadcast into a reciprocal multiplication); compiled by Mosaic they are plain divisions, as in
XLA's TPU path (``dsjax.ops.fp8._divide_by_scales``).

Under a mesh the kernels run per shard (XLA cannot partition a Mosaic call): rows (tokens) split like dsjax's
batch, the weight whole on every device (FSDP's all-gather), the weight gradient's per-device partials summed
by XLA outside.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from dsjax.sharding import active_platform, batch_row_axes, free_axes

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
LANE = 128  # the recipe's block; also the TPU lane width the kernels tile by
_BLOCKS = (512, 256, 128)


@dataclasses.dataclass(frozen=True)
class TileRecipe:
    """What a kernel needs of :class:`~dsjax.config.Fp8Recipe` for one operand's tiles."""

    amax_floor: float
    pow2: bool


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _tile(n: int) -> tuple[int, int]:
    """``(padded n, block)``: n rounded up to 128 and the largest of 512 / 256 / 128 that divides it."""
    padded = _round_up(n, LANE)
    return padded, next(b for b in _BLOCKS if padded % b == 0)


def _pad(x, shape):
    if tuple(shape) == x.shape:
        return x
    return jnp.pad(x, [(0, s - d) for s, d in zip(shape, x.shape, strict=True)])


def _interpret():
    """Compiled by Mosaic on TPU; interpreted on CPU (tests); refused on GPU, where it would be the interpreter
    at a fraction of the XLA path's speed."""
    platform = active_platform()
    if platform == "gpu":
        raise ValueError("fp8.backend='pallas' is a TPU kernel; on GPU use 'blocked' (or 'auto', which picks it)")
    # On CPU, Pallas' generic interpreter (the kernel as plain XLA ops). Its TPU interpreter simulates devices
    # with host callbacks and a cross-device barrier, which deadlocked under an 8-device CPU mesh here.
    return None if platform == "tpu" else True


def _divide(x, s, exact: bool):
    if exact:  # the interpreter runs XLA:CPU, which would multiply by a reciprocal (see fp8._exact_div)
        return x / jax.lax.optimization_barrier(jnp.broadcast_to(s, x.shape))
    return x / s


def _scale(amax, tiles: TileRecipe, exact: bool):
    """``max(amax, floor) / 448``, rounded up to a power of two if asked (fp32, normal: the floor sees to it)."""
    s = _divide(jnp.maximum(amax, tiles.amax_floor), jnp.full_like(amax, E4M3_MAX), exact)
    if tiles.pow2:  # 2^ceil(log2 s): s itself when its mantissa bits are 0, else the next exponent's power
        bits = jax.lax.bitcast_convert_type(s, jnp.int32)
        up = jax.lax.bitcast_convert_type((bits & 0x7F800000) + 0x00800000, jnp.float32)
        s = jnp.where((bits & 0x007FFFFF) == 0, s, up)
    return s


def _e4m3(x, s, exact: bool):
    """``clip(x / s)`` as E4M3 (the clip because E4M3 casts do not saturate)."""
    return jnp.clip(_divide(x, s, exact), -E4M3_MAX, E4M3_MAX).astype(E4M3)


def _e4m3_bf16(x, s, exact: bool):
    """:func:`_e4m3` returned in bf16 (exactly) for the MXU."""
    return _e4m3(x, s, exact).astype(jnp.bfloat16)


def _dot(a, b):
    return jax.lax.dot(a, b, precision=jax.lax.Precision.DEFAULT, preferred_element_type=jnp.float32)


def _dot_t(a, b):
    """``a . b^T`` (``b`` stored ``[n, k]``)."""
    dims = (((1,), (1,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=jax.lax.Precision.DEFAULT, preferred_element_type=jnp.float32)


def _column(ref, col):
    """Column ``col`` (traced) of a ``[rows, n]`` VMEM ref as ``[rows, 1]``: a masked lane sum, exact, where a
    dynamic lane slice is not."""
    v = ref[...]
    lanes = jax.lax.broadcasted_iota(jnp.int32, v.shape, 1)
    return jnp.sum(jnp.where(lanes == col, v, 0.0), axis=1, keepdims=True)


def _cost(m: int, k: int, n: int, nbytes: int) -> pl.CostEstimate:
    """What a GEMM kernel computes (padded shapes), so compiled-flops counts (``dsjax.aot.hlo``) include it."""
    return pl.CostEstimate(flops=2 * m * k * n, transcendentals=0, bytes_accessed=int(nbytes))


# ---- quantisation: x -> (E4M3 tiles, scales) --------------------------------------------------------------


def _quantize_kernel(x_ref, q_ref, s_ref, *, bk: int, tiles: TileRecipe, exact: bool):
    step = pl.program_id(1)

    @pl.when(step == 0)
    def _():
        s_ref[...] = jnp.zeros_like(s_ref)

    lanes = jax.lax.broadcasted_iota(jnp.int32, s_ref.shape, 1)
    scales = s_ref[...]
    for c in range(bk // LANE):
        cols = slice(c * LANE, (c + 1) * LANE)
        x = x_ref[:, cols].astype(jnp.float32)
        s = _scale(jnp.max(jnp.abs(x), axis=1, keepdims=True), tiles, exact)  # [bm, 1]
        q_ref[:, cols] = _e4m3(x, s, exact)
        scales = jnp.where(lanes == step * (bk // LANE) + c, s, scales)
    s_ref[...] = scales


def _quantize_local(x, tiles: TileRecipe):
    m, k = x.shape
    (mp, bm), (kp, bk) = _tile(m), _tile(k)
    kb = kp // LANE
    q, s = pl.pallas_call(
        functools.partial(_quantize_kernel, bk=bk, tiles=tiles, exact=_interpret() is not None),
        grid=(mp // bm, kp // bk),
        in_specs=[pl.BlockSpec((bm, bk), lambda i, c: (i, c))],
        out_specs=[pl.BlockSpec((bm, bk), lambda i, c: (i, c)), pl.BlockSpec((bm, kb), lambda i, c: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct((mp, kp), E4M3), jax.ShapeDtypeStruct((mp, kb), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=_interpret(),
        name="dsjax_fp8_quantize",
    )(_pad(x, (mp, kp)))
    return q[:m, :k], s[:m, : -(-k // LANE)]


# ---- a . b with block scales ------------------------------------------------------------------------------


def block_product(acc, a_ref, sa_ref, b_ref, sb_ref, step, *, bk: int, tiles, exact: bool, transpose_b=False):
    """``acc`` plus one grid step's share of ``a . b``: over this ``bk``-wide block of the contraction, each
    128-long slice's fp32 partial product times both scales (one promotion per slice), added in order.
    ``a_ref [bm, bk]``: E4M3 with the row scales ``sa_ref [bm, K/128]`` (the whole row's: read by column), or,
    with ``tiles`` given, float and quantised here. ``b_ref [bk, bn]`` E4M3 (``[bn, bk]`` if ``transpose_b``),
    ``sb_ref [bk/128, 1, bn]``: each column's scale for each slice."""
    for c in range(bk // LANE):
        cols = slice(c * LANE, (c + 1) * LANE)
        if tiles is None:  # a is E4M3 with its scales
            a, sa = a_ref[:, cols].astype(jnp.bfloat16), _column(sa_ref, step * (bk // LANE) + c)
        else:  # a float a, quantised here
            x = a_ref[:, cols].astype(jnp.float32)
            sa = _scale(jnp.max(jnp.abs(x), axis=1, keepdims=True), tiles, exact)
            a = _e4m3_bf16(x, sa, exact)
        if transpose_b:
            part = _dot_t(a, b_ref[:, cols].astype(jnp.bfloat16))
        else:
            part = _dot(a, b_ref[cols, :].astype(jnp.bfloat16))
        acc = acc + part * (sa * sb_ref[c])  # [bm, 1] x [1, bn]
    return acc


def _matmul_kernel(a_ref, sa_ref, b_ref, sb_ref, o_ref, acc_ref, *, bk: int, tiles, exact: bool):
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc = block_product(acc_ref[...], a_ref, sa_ref, b_ref, sb_ref, step, bk=bk, tiles=tiles, exact=exact)
    acc_ref[...] = acc

    @pl.when(step == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc.astype(o_ref.dtype)


def _matmul_local(a, sa, bq, sb_cols, *, out_dtype, tiles):
    m, k = a.shape
    n = bq.shape[1]
    (mp, bm), (kp, bk), (np_, bn) = _tile(m), _tile(k), _tile(n)
    kb = kp // LANE
    args = [_pad(a, (mp, kp))]
    in_specs = [pl.BlockSpec((bm, bk), lambda i, j, s: (i, s))]
    if tiles is None:
        args.append(_pad(sa, (mp, kb)))
        in_specs.append(pl.BlockSpec((bm, kb), lambda i, j, s: (i, 0)))
    else:  # no scales to read: a stand-in the kernel ignores
        args.append(jnp.zeros((8, LANE), jnp.float32))
        in_specs.append(pl.BlockSpec((8, LANE), lambda i, j, s: (0, 0)))
    args += [_pad(bq, (kp, np_)), _pad(sb_cols, (kb, np_))[:, None, :]]  # [K/B, 1, N]: a row per slice
    in_specs += [
        pl.BlockSpec((bk, bn), lambda i, j, s: (s, j)),
        pl.BlockSpec((bk // LANE, 1, bn), lambda i, j, s: (s, 0, j)),
    ]
    nbytes = args[0].size * args[0].dtype.itemsize + args[2].size + mp * np_ * jnp.dtype(out_dtype).itemsize
    out = pl.pallas_call(
        functools.partial(_matmul_kernel, bk=bk, tiles=tiles, exact=_interpret() is not None),
        grid=(mp // bm, np_ // bn, kp // bk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, s: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(mp, kp, np_, nbytes),
        interpret=_interpret(),
        name="dsjax_fp8_matmul",
    )(*args)
    return out[:m, :n]


# ---- dw = x^T . g, re-tiled along the tokens in the kernel ------------------------------------------------


def _wgrad_kernel(xt_ref, sxt_ref, g_ref, o_ref, acc_ref, *, bm: int, bk: int, x_tiles, g_tiles, exact: bool):
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    for j in range(bm // LANE):  # one 128-token tile (one promotion) at a time
        tokens = slice(j * LANE, (j + 1) * LANE)
        g = g_ref[tokens, :].astype(jnp.float32)  # [128, bn]
        sg = _scale(jnp.max(jnp.abs(g), axis=0, keepdims=True), g_tiles, exact)  # [1, bn]
        gq = _e4m3_bf16(g, sg, exact)
        for c in range(bk // LANE):
            rows = slice(c * LANE, (c + 1) * LANE)
            # x^T's 128 x 128 tile: dequantised from its forward 1 x B tiles, re-quantised along the tokens
            xt = xt_ref[rows, tokens].astype(jnp.float32) * sxt_ref[c][:, tokens]  # [128, 128] x [1, 128]
            sx = _scale(jnp.max(jnp.abs(xt), axis=1, keepdims=True), x_tiles, exact)  # [128, 1]
            part = _dot(_e4m3_bf16(xt, sx, exact), gq)
            acc_ref[rows, :] += part * (sx * sg)

    @pl.when(step == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _wgrad_local(xq, sx, g, *, x_tiles, g_tiles, out_dtype=jnp.float32):
    m, k = xq.shape
    n = g.shape[1]
    (mp, bm), (kp, bk), (np_, bn) = _tile(m), _tile(k), _tile(n)
    kb = kp // LANE
    xt = _pad(xq, (mp, kp)).T  # fp8: one byte per element
    sxt = _pad(sx, (mp, kb)).T[:, None, :]  # [K/B, 1, M]: a row of token scales per slice
    g = _pad(g, (mp, np_))
    nbytes = xt.size + sxt.size * 4 + g.size * g.dtype.itemsize + kp * np_ * 4
    return pl.pallas_call(
        functools.partial(
            _wgrad_kernel, bm=bm, bk=bk, x_tiles=x_tiles, g_tiles=g_tiles, exact=_interpret() is not None
        ),
        grid=(kp // bk, np_ // bn, mp // bm),
        in_specs=[
            pl.BlockSpec((bk, bm), lambda i, j, s: (i, s)),
            pl.BlockSpec((bk // LANE, 1, bm), lambda i, j, s: (i, 0, s)),
            pl.BlockSpec((bm, bn), lambda i, j, s: (s, j)),
        ],
        out_specs=pl.BlockSpec((bk, bn), lambda i, j, s: (i, j)),
        out_shape=jax.ShapeDtypeStruct((kp, np_), out_dtype),
        scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(kp, mp, np_, nbytes),
        interpret=_interpret(),
        name="dsjax_fp8_weight_grad",
    )(xt, sxt, g)[:k, :n]


# ---- per shard under a mesh -------------------------------------------------------------------------------


def _on_shards(local, row_args, whole_args=(), *, tile: int = 1, partial_sum: bool = False, outputs: int = 1):
    """``local(*row_args, *whole_args)`` per device under the active mesh's free axes: ``row_args`` (and the
    results: ``outputs`` of them) split by rows over :func:`dsjax.sharding.batch_row_axes`, ``whole_args``
    whole on every device. ``partial_sum``: the result is a per-device partial sum over the device's rows,
    summed across devices by XLA."""
    free = free_axes()
    if not free:
        return local(*row_args, *whole_args)
    # The weight gradient's 128-token tiles must not straddle shards (``tile``): then each device's tiles are the
    # single-device ones and the sharded result equals it.
    rows = batch_row_axes(row_args[0].shape[0], tile=tile)
    spec = P(rows or None, None)
    in_specs = (spec,) * len(row_args) + (P(),) * len(whole_args)
    mapped = functools.partial(jax.shard_map, in_specs=in_specs, axis_names=frozenset(free), check_vma=False)
    if partial_sum and rows:
        # Each device's partial stacked along the row axes; XLA sums them. (Summing and scattering them in the
        # shard_map instead, a psum_scatter, compiled to more temporaries in the V3 layer step: 20.20 vs 19.91 GiB.)
        fn = mapped(lambda *a: local(*a)[None], out_specs=P(rows, None, None))
        return jnp.sum(fn(*row_args, *whole_args), axis=0)
    if partial_sum:
        return mapped(local, out_specs=P())(*row_args, *whole_args)
    return mapped(local, out_specs=spec if outputs == 1 else (spec,) * outputs)(*row_args, *whole_args)


def quantize(x, tiles: TileRecipe):
    """``x [M, K]`` in 1 x 128 tiles -> ``(q [M, K] e4m3, s [M, ceil(K/128)] fp32)``, as ``quantize_rows``."""
    return _on_shards(functools.partial(_quantize_local, tiles=tiles), (x,), outputs=2)


def scaled_matmul(a, sa, bq, sb_cols, *, out_dtype=jnp.float32, tiles: TileRecipe | None = None):
    """``(a * sa) . (bq * sb)`` promoted every 128 of the contraction -> ``[M, N]`` in ``out_dtype``.

    ``a [M, K]``: E4M3 in 1 x 128 tiles with scales ``sa [M, K/128]``; or, with ``tiles`` given, a float array
    quantised in the kernel with that recipe (``sa`` unused). ``bq [K, N]`` E4M3 with ``sb_cols [K/128, N]``
    (one scale per 128 rows per column: weight blocks repeated along their columns)."""
    local = functools.partial(_matmul_local, out_dtype=out_dtype, tiles=tiles)
    if tiles is not None:
        return _on_shards(lambda a, bq, sb: local(a, None, bq, sb), (a,), (bq, sb_cols))
    return _on_shards(local, (a, sa), (bq, sb_cols))


def weight_grad(xq, sx, g, *, x_tiles: TileRecipe, g_tiles: TileRecipe, out_dtype=jnp.float32):
    """``x^T . g`` accumulated in fp32, in ``out_dtype``, with both operands re-tiled 128 x 1 along the tokens:
    ``xq [M, K]`` E4M3 with its forward scales ``sx [M, K/128]`` (dequantised, then re-quantised with
    ``x_tiles``), ``g [M, N]`` float (quantised with ``g_tiles``). Under a mesh each device's partial sum is
    rounded to ``out_dtype`` before they are summed."""
    local = functools.partial(_wgrad_local, x_tiles=x_tiles, g_tiles=g_tiles, out_dtype=out_dtype)
    return _on_shards(local, (xq, sx, g), tile=LANE, partial_sum=True)
