"""Memory-efficient masked softmax attention for training and prefill (MLA's expanded, per-head form).

:func:`attention` computes ``softmax(q . k * scale + mask) . v`` where a key is visible to a query iff
``kv_position <= q_position`` and, when segment ids are given, both belong to the same segment (packed
documents). Softmax runs in fp32. Three implementations share that contract:

* ``"naive"``: dense ``[b, h, t, s]`` fp32 scores; the same operations as :func:`dsjax.ops.attention.mla_naive`.
* ``"xla"``: FlashAttention-2 in plain JAX (any backend). A ``jax.custom_vjp`` whose forward loops over query
  blocks and, inside, over key/value blocks with an online softmax, saving only the output and the per-row
  log-sum-exp; the backward recomputes each block's scores. Memory is O(b h (t + s) d) plus one
  ``[b, h, block_q, block_kv]`` tile; block pairs with no visible key (above the causal diagonal, or between
  different documents) are skipped at run time from per-block position / segment ranges.
* ``"splash"``: JAX's Pallas splash attention kernel for TPU (``make_splash_mha``), vmapped over the batch and,
  under a mesh, wrapped in ``shard_map`` with the batch sharded as dsjax shards activations.

``"auto"`` picks ``"splash"`` for TPU self-attention (``t == s``) and ``"xla"`` otherwise.

A row with no visible key (only possible with ``t != s`` or unusual positions/segments) gets what the dense form
gives with its finite ``-1e30`` fill: a uniform average of the values over all ``s`` keys, with zero gradient
to q and k and ``do / s`` to every value. The flash forms reproduce this exactly (without visiting masked blocks).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dsjax.ops.attention import _softmax, attention_mask
from dsjax.sharding import DEFAULT_RULES, Rules, batch_row_axes, free_axes

IMPLS = ("naive", "xla", "splash", "auto")
_DEFAULT_BLOCK = 512
_NEG = -1e30  # running-max floor: finite, so exp(m_old - m_new) never sees inf - inf
_LANES = 128  # splash's block sizes must be multiples of the TPU lane width


def attention(
    q_bthd: jax.Array,
    k_bshd: jax.Array,
    v_bshv: jax.Array,
    *,
    q_positions_bt: jax.Array,
    kv_positions_bs: jax.Array,
    q_segments_bt: jax.Array | None = None,
    kv_segments_bs: jax.Array | None = None,
    scale: float,
    impl: str = "xla",
    block_q: int | None = None,
    block_kv: int | None = None,
    rules: Rules = DEFAULT_RULES,
    interpret: bool | None = None,
) -> jax.Array:
    """Masked softmax attention ``[b, t, h, v]`` (in ``q``'s dtype); see the module docstring.

    Args:
      q_bthd, k_bshd: queries and keys with the same head dim (MLA: nope + rope = 192); v_bshv: values (128).
      q_positions_bt, kv_positions_bs: integer positions; a key is visible iff its position <= the query's.
      q_segments_bt, kv_segments_bs: optional segment ids (both or neither); keys must share the query's.
      scale: multiplies ``q . k`` before the softmax.
      impl: ``"naive"``, ``"xla"``, ``"splash"`` or ``"auto"``.
      block_q, block_kv: tile sizes (default 512, clipped to the sequence; splash: multiples of 128).
      rules: logical-axis rules giving the batch's mesh axes for splash's ``shard_map``.
      interpret: run splash's Pallas kernel in interpret mode (default: when the target is not a TPU).

    ``"splash"`` applies an *index*-causal mask (key index <= query index) plus segment ids and ignores the
    positions: it needs ``t == s`` with queries and keys at the same positions, and equals the position mask
    iff positions strictly increase along the sequence within each segment (dsjax's packing: 0, 1, ... per
    document). dsjax's padding (segment 0, all positions 0) breaks this only inside the padding rows, which
    carry no loss: there splash attends causally where the position mask attends bidirectionally.
    The contract is not checked (inside ``jit`` the positions are tracers).
    """
    impl = _check(q_bthd, k_bshd, v_bshv, q_positions_bt, kv_positions_bs, q_segments_bt, kv_segments_bs, impl)
    for name, blk in (("block_q", block_q), ("block_kv", block_kv)):
        if blk is not None and (not isinstance(blk, int) or blk < 1):
            raise ValueError(f"{name}={blk!r} must be a positive int")
    t, s = q_bthd.shape[1], k_bshd.shape[1]
    impl = resolve_impl(impl, t, s)
    if impl == "naive":
        mask = attention_mask(q_positions_bt, kv_positions_bs, q_segments_bt, kv_segments_bs)
        return _naive(q_bthd, k_bshd, v_bshv, mask, scale)
    if impl == "splash":
        if t != s:
            raise ValueError(f"impl='splash' is self-attention only (t == s); got t={t}, s={s}: use impl='xla'")
        if interpret is None:
            interpret = _target_platform() != "tpu"
        return _splash(
            q_bthd, k_bshd, v_bshv, q_segments_bt, kv_segments_bs, scale, block_q, block_kv, rules, interpret
        )
    return _flash_xla(
        q_bthd,
        k_bshd,
        v_bshv,
        q_positions_bt,
        kv_positions_bs,
        q_segments_bt,
        kv_segments_bs,
        scale,
        min(block_q or _DEFAULT_BLOCK, t),
        min(block_kv or _DEFAULT_BLOCK, s),
    )


def _check(q, k, v, qp, kp, qs, ks, impl) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}; choose one of {IMPLS}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [b, t|s, h, dim]; got shapes {q.shape}, {k.shape}, {v.shape}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: batch, heads and k/v lengths must agree")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    if (qs is None) != (ks is None):
        raise ValueError("give both q_segments_bt and kv_segments_bs, or neither")
    for name, x, shape in (
        ("q_positions_bt", qp, (b, t)),
        ("kv_positions_bs", kp, (b, s)),
        ("q_segments_bt", qs, (b, t)),
        ("kv_segments_bs", ks, (b, s)),
    ):
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {shape}")
    return impl


def resolve_impl(impl: str, t: int, s: int) -> str:
    """The implementation ``impl`` stands for at query length ``t`` and key length ``s`` under the active mesh.

    ``"auto"`` is ``"splash"`` when compiling for TPU (the active mesh's devices, else JAX's default backend)
    and ``t == s``, else ``"xla"``; other names are returned unchanged.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}; choose one of {IMPLS}")
    if impl == "auto":
        return "splash" if _target_platform() == "tpu" and t == s else "xla"
    return impl


def _target_platform() -> str:
    # Compiling for a TPU mesh on a CPU host must still pick the TPU path: read the mesh's devices, not the backend.
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        return mesh.abstract_device.platform
    return jax.default_backend()


def _naive(q, k, v, mask_bts, scale):
    # Exactly mla_naive's core: head-major einsums in the input dtype, fp32 masked softmax, probs in v's dtype.
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    probs = _softmax(jnp.einsum("bhtx,bhsx->bhts", q, k) * scale, mask_bts).astype(v.dtype)
    return jnp.einsum("bhts,bhsv->bhtv", probs, v).transpose(0, 2, 1, 3)


# ---- flash attention in plain XLA --------------------------------------------------------------------------
# Blocks are sliced along the sequence axis of the [b, L, h, d] arrays inside the loops, rather than reshaped
# into head-major block stacks up front: on TPU the latter costs a transposed copy of q, k, v and do (the
# forward's temporaries at b=1, t=2048, h=16 fell from 80 to 52 MiB, fwd+bwd from 138 to 127 MiB).


def _pad_seq(x, n: int, fill=0):
    """Pad axis 1 to length ``n`` with ``fill`` (no-op when already that long)."""
    if x is None or x.shape[1] == n:
        return x
    return jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=fill)


def _block_ranges(x_bl, blk: int, valid_l, fill):
    """Per-block ``(min, max)`` over valid entries of ``x [b, n * blk]``: each ``[b, n]``."""
    b, n = x_bl.shape[0], x_bl.shape[1] // blk
    x = x_bl.reshape(b, n, blk)
    valid = valid_l.reshape(1, n, blk)
    return jnp.where(valid, x, fill[1]).min(-1), jnp.where(valid, x, fill[0]).max(-1)


def live_tiles(qp, kp, qs, ks, t: int, s: int, bq: int, bk: int) -> jax.Array:
    """``[nq, nk]`` bool: may q block ``i`` see any key of kv block ``j`` (for some batch row)?

    Conservative, from per-block ranges: a tile is dead when every key's position exceeds every query's, or
    when the blocks' segment-id ranges do not overlap. The inputs are padded to whole blocks; rows ``>= t``
    and keys ``>= s`` are ignored.
    """
    q_valid = jnp.arange(qp.shape[1]) < t
    kv_valid = jnp.arange(kp.shape[1]) < s
    lim = (jnp.iinfo(qp.dtype).min, jnp.iinfo(qp.dtype).max)
    _, q_hi = _block_ranges(qp, bq, q_valid, lim)
    k_lo, _ = _block_ranges(kp, bk, kv_valid, lim)
    live = k_lo[:, None, :] <= q_hi[:, :, None]  # [b, nq, nk]
    if qs is not None:
        lim = (jnp.iinfo(qs.dtype).min, jnp.iinfo(qs.dtype).max)
        qs_lo, qs_hi = _block_ranges(qs, bq, q_valid, lim)
        ks_lo, ks_hi = _block_ranges(ks, bk, kv_valid, lim)
        live &= (ks_lo[:, None, :] <= qs_hi[:, :, None]) & (qs_lo[:, :, None] <= ks_hi[:, None, :])
    # One loop serves every row, so a tile is visited if it is live for any of them.
    return live.any(0)


def _flash_xla(q, k, v, qp, kp, qs, ks, scale, bq, bk):
    t, s = q.shape[1], k.shape[1]
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    q, qp, qs = _pad_seq(q, tp), _pad_seq(qp, tp, jnp.iinfo(qp.dtype).min), _pad_seq(qs, tp)
    k, v, kp, ks = _pad_seq(k, sp), _pad_seq(v, sp), _pad_seq(kp, sp), _pad_seq(ks, sp)
    live = live_tiles(qp, kp, qs, ks, t, s, bq, bk)
    masks = (qp, kp, qs, ks, jnp.arange(sp) < s, live)
    return _flash_core(q, k, v, masks, scale, s, bq, bk)[:, :t]


def _sl(x, i, blk, axis=1):
    return jax.lax.dynamic_slice_in_dim(x, i * blk, blk, axis=axis)


def _tile_mask(masks, i, j, bq, bk):
    """``[b, 1, bq, bk]`` visibility of kv block ``j`` from q block ``i``."""
    qp, kp, qs, ks, kv_valid, _ = masks
    m = _sl(kp, j, bk)[:, None, :] <= _sl(qp, i, bq)[:, :, None]
    m &= _sl(kv_valid, j, bk, axis=0)[None, None, :]
    if qs is not None:
        m &= _sl(ks, j, bk)[:, None, :] == _sl(qs, i, bq)[:, :, None]
    return m[:, None]


def _dot(spec, a, b):
    if _target_platform() == "cpu":
        # XLA:CPU has no bf16 x bf16 -> f32 kernel for some of these contractions (DotThunk: UNIMPLEMENTED);
        # the operands are already rounded to their dtype, so an f32 product gives the same result.
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _loop(n, body, init):
    """``fori_loop(0, n, body, init)`` as a ``while_loop`` (the forward's loops). A static-bound ``fori_loop`` is a
    scan, and a scan inside a layer ``scan`` under ``jax.checkpoint`` is partially evaluated even here, inside a
    custom VJP's forward: the step kept every tile's scores, probabilities and mask, stacked ``[nq, nk, b, h,
    bq, bk]`` (V3's layer on H200 at 4,096 tokens: 18 GiB per GPU). A while loop is left alone."""

    def step(carry):
        i, c = carry
        return i + 1, body(i, c)

    return jax.lax.while_loop(lambda carry: carry[0] < n, step, (jnp.int32(0), init))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash_core(q, k, v, masks, scale, s_real, bq, bk):
    return _flash_fwd(q, k, v, masks, scale, s_real, bq, bk)[0]


def _flash_fwd(q, k, v, masks, scale, s_real, bq, bk):
    (b, tp, h, _), ev, live = q.shape, v.shape[-1], masks[-1]
    nq, nk = live.shape
    mean_v = v.astype(jnp.float32).sum(1) / s_real  # [b, h, ev]: what a row with no visible key gets

    def q_block(i, carry):
        out, lse = carry
        qi = _sl(q, i, bq)

        def kv_step(j, carry):
            def visit(carry):
                m, den, acc = carry
                sc = _dot("bqhd,bkhd->bhqk", qi, _sl(k, j, bk)) * scale
                mask = _tile_mask(masks, i, j, bq, bk)
                m_new = jnp.maximum(m, jnp.where(mask, sc, _NEG).max(-1))
                p = jnp.where(mask, jnp.exp(sc - m_new[..., None]), 0.0)
                alpha = jnp.exp(m - m_new)
                acc = alpha[..., None] * acc + _dot("bhqk,bkhv->bhqv", p.astype(v.dtype), _sl(v, j, bk))
                return m_new, alpha * den + p.sum(-1), acc

            return jax.lax.cond(live[i, j], visit, lambda c: c, carry)

        init = (
            jnp.full((b, h, bq), _NEG, jnp.float32),
            jnp.zeros((b, h, bq), jnp.float32),
            jnp.zeros((b, h, bq, ev), jnp.float32),
        )
        m, den, acc = _loop(nk, kv_step, init)
        # den == 0 exactly when no key is visible (a visible row's max term contributes exp(0) = 1).
        seen = den > 0
        o = jnp.where(seen[..., None], acc / jnp.where(seen, den, 1.0)[..., None], mean_v[:, :, None, :])
        lse_i = jnp.where(seen, m + jnp.log(jnp.where(seen, den, 1.0)), jnp.inf)
        out = jax.lax.dynamic_update_slice_in_dim(out, o.astype(q.dtype).transpose(0, 2, 1, 3), i * bq, axis=1)
        return out, jax.lax.dynamic_update_slice_in_dim(lse, lse_i, i * bq, axis=2)

    init = (jnp.zeros((b, tp, h, ev), q.dtype), jnp.zeros((b, h, tp), jnp.float32))
    out, lse = _loop(nq, q_block, init)
    return out, (q, k, v, masks, out, lse)


def _flash_bwd(scale, s_real, bq, bk, res, dout):
    q, k, v, masks, out, lse = res
    live = masks[-1]
    nq, nk = live.shape
    delta = jnp.einsum("bthv,bthv->bht", dout.astype(jnp.float32), out.astype(jnp.float32))
    # Rows with no visible key averaged all s real values: each real value gets those rows' do / s.
    empty_do = jnp.einsum("bht,bthv->bhv", jnp.isinf(lse).astype(jnp.float32), dout.astype(jnp.float32)) / s_real

    def kv_block(j, carry):
        dq, dk, dv = carry
        kj, vj = _sl(k, j, bk), _sl(v, j, bk)

        def q_step(i, carry):
            dq, dk_j, dv_j = carry

            def visit(_):
                qi, doi = _sl(q, i, bq), _sl(dout, i, bq)
                sc = _dot("bqhd,bkhd->bhqk", qi, kj) * scale
                p = jnp.exp(sc - _sl(lse, i, bq, axis=2)[..., None])
                p = jnp.where(_tile_mask(masks, i, j, bq, bk), p, 0.0)
                dv_ij = _dot("bhqk,bqhv->bhkv", p.astype(dout.dtype), doi)
                ds = p * (_dot("bqhv,bkhv->bhqk", doi, vj) - _sl(delta, i, bq, axis=2)[..., None]) * scale
                dq_ij = _dot("bhqk,bkhd->bqhd", ds.astype(k.dtype), kj)
                return dq_ij, _dot("bhqk,bqhd->bhkd", ds.astype(q.dtype), qi), dv_ij

            def skip(_):
                return (
                    jnp.zeros((*dq.shape[:1], bq, *dq.shape[2:]), jnp.float32),
                    jnp.zeros_like(dk_j),
                    jnp.zeros_like(dv_j),
                )

            # Only the tile's contributions pass through the cond (not the whole dq carry, which it would copy).
            dq_ij, dk_ij, dv_ij = jax.lax.cond(live[i, j], visit, skip, None)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, _sl(dq, i, bq) + dq_ij, i * bq, axis=1)
            return dq, dk_j + dk_ij, dv_j + dv_ij

        b, _, h, d = k.shape
        zeros = (jnp.zeros((b, h, bk, d), jnp.float32), jnp.zeros((b, h, bk, v.shape[-1]), jnp.float32))
        dq, dk_j, dv_j = jax.lax.fori_loop(0, nq, q_step, (dq, *zeros))
        dv_j = dv_j + empty_do[:, :, None, :] * _sl(masks[4], j, bk, axis=0)[None, None, :, None]
        dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_j.astype(k.dtype).transpose(0, 2, 1, 3), j * bk, axis=1)
        dv = jax.lax.dynamic_update_slice_in_dim(dv, dv_j.astype(v.dtype).transpose(0, 2, 1, 3), j * bk, axis=1)
        return dq, dk, dv

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros_like(k), jnp.zeros_like(v))
    dq, dk, dv = jax.lax.fori_loop(0, nk, kv_block, init)
    return dq.astype(q.dtype), dk, dv, None


_flash_core.defvjp(_flash_fwd, _flash_bwd)


# ---- splash attention (TPU Pallas) -------------------------------------------------------------------------


def _splash_kernel(heads: int, seq: int, bq: int, bkv: int, interpret: bool):
    # Built per trace: the kernel holds its per-block mask metadata as arrays, which inside a trace are that
    # trace's tracers (caching them would leak them into the next trace; making them concrete would run them on
    # the target, which a compile-only TPU cannot). JAX caches the numpy mask processing itself.
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    mask = sa.MultiHeadMask([sa.CausalMask((seq, seq)) for _ in range(heads)])
    # MaxText's defaults for v5p: one block size for the forward, dkv and dq kernels (separate dq kernel).
    sizes = sa.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q, k, v, qs, ks, scale, block_q, block_kv, rules, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    t, h = q.shape[1], q.shape[2]
    lane_t = -(-t // _LANES) * _LANES
    bq, bkv = min(block_q or _DEFAULT_BLOCK, lane_t), min(block_kv or _DEFAULT_BLOCK, lane_t)
    if bq % _LANES or bkv % _LANES:
        raise ValueError(f"splash block sizes must be multiples of {_LANES}; got block_q={bq}, block_kv={bkv}")
    n = -(-t // np.lcm(bq, bkv)) * int(np.lcm(bq, bkv))
    # Padded keys sit after every real query, so the causal mask hides them; padded queries see their own
    # diagonal (no empty softmax row) and are sliced off.
    pad = [(0, 0), (0, n - t), (0, 0), (0, 0)]
    dtype = q.dtype
    q = (q * scale).astype(dtype)  # splash does not scale the logits: fold the scale into q
    q, k, v = (jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (q, k, v))
    kernel = _splash_kernel(h, n, bq, bkv, bool(interpret))
    args = (q, k, v)
    if qs is not None:
        args += (jnp.pad(qs, [(0, 0), (0, n - t)]), jnp.pad(ks, [(0, 0), (0, n - t)]))

    def per_shard(q, k, v, *seg):  # [b', h, n, *]: Mosaic calls carry no batch dim, so vmap over it
        if seg:
            return jax.vmap(lambda q, k, v, a, c: kernel(q, k, v, SegmentIds(a, c)))(q, k, v, *seg)
        return jax.vmap(kernel)(q, k, v)

    if jnp.dtype(dtype).itemsize < 4:
        # Mosaic rejects HIGHEST-precision dots on bf16 operands ("Bad lhs type"), e.g. under a global
        # jax_default_matmul_precision="highest"; for 16-bit inputs DEFAULT computes the same products.
        per_shard = _traced_with_precision(per_shard, "default")
    mesh = jax.sharding.get_abstract_mesh()
    free = free_axes()
    fn = per_shard
    if free:
        # Mosaic kernels cannot be partitioned automatically: run it per shard with the batch split like
        # dsjax's activations (heads and sequence whole on each device), over the axes not already manual.
        spec = P(batch_row_axes(q.shape[0], rules) or None, None, None, None)
        in_specs = (spec,) * 3 + (P(spec[0], None),) * (len(args) - 3)
        fn = jax.shard_map(
            per_shard, mesh=mesh, in_specs=in_specs, out_specs=spec, axis_names=frozenset(free), check_vma=False
        )
    return fn(*args).transpose(0, 2, 1, 3)[:, :t].astype(dtype)


def _traced_with_precision(f, precision: str):
    """``f`` whose forward and backward are both traced under ``jax.default_matmul_precision(precision)``.

    A context around the call alone would miss the backward kernels, which a custom VJP traces only when the
    gradient is taken.
    """

    @jax.custom_vjp
    def g(*args):
        with jax.default_matmul_precision(precision):
            return f(*args)

    def fwd(*args):
        with jax.default_matmul_precision(precision):
            return jax.vjp(f, *args)

    def bwd(vjp, dout):
        with jax.default_matmul_precision(precision):
            return vjp(dout)

    g.defvjp(fwd, bwd)
    return g
