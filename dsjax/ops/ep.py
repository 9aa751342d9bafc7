"""Expert parallelism: dispatch token slots to expert shards with an explicit exchange inside ``shard_map``.

Layout (inside ``jax.shard_map``, per device): ``m_l`` local tokens (the token dim is sharded over ``token_axes``,
which must include ``expert_axis``) and ``E_l = E / P`` local experts (the expert dim of the weights is sharded
over ``expert_axis`` of size ``P``; the weights are replicated over the other axes). Each device owns
``S = m_l * k`` (token, expert) slots. It

1. orders its slots by destination shard ``expert // E_l`` and, within one destination, in *priority order*:
   slot ``(t, j)`` (local token ``t``, routing column ``j``) comes before ``(t', j')`` iff ``(j, t) < (j', t')``,
   i.e. every token's first choice before any token's second choice (``dsjax.ops.routing.route`` returns the
   top-k in descending score order, so column ``j`` is the ``j``-th best expert);
2. exchanges them over ``expert_axis`` (see *Exchanges*), together with each row's local expert id;
3. sorts the received rows by local expert and runs the local experts with ``jax.lax.ragged_dot`` (``gmm``);
   steps 1-3 move rows only, so a ``gmm`` with a ``dispatch`` (:func:`dsjax.ops.moe.dispatch_rows`) may move
   another form of them: the FP8 GEMMs quantise the tokens first and move E4M3 values and scales;
   empty buffer rows carry the id ``E_l``, sort last and fall outside every group, and their gate/up activations
   are masked to zero, so they contribute nothing and cannot inject NaNs into values or gradients;
4. returns the results by the reverse exchange and combines them with the routing weights into ``[m_l, d]`` in
   ``accum_dtype``.

Exchanges (``exchange=``):

- ``"all_to_all"``: fixed-size per-destination buckets of ``C`` rows, ``jax.lax.all_to_all`` both ways. Dropless
  (``capacity_factor=None``) needs the worst case ``C = S`` (every local slot to one shard): send and receive
  buffers of ``P * S`` rows and grouped matmuls over ``P * S`` rows, ``P`` times the routed volume (a ``[P * S, f]``
  activation is kept for backward, and the all-to-all moves ``P`` times the useful bytes). With a capacity factor
  ``c``, ``C = ceil(c * S / P)``; slots beyond the first ``C`` of a (source, destination) pair, in priority order,
  are dropped.
- ``"ragged"``: ``jax.lax.ragged_all_to_all``. The ``[P, k]`` per-(destination, column) slot counts are
  all-gathered first (``P * P * k`` int32), from which every device computes the same send sizes and offsets;
  each source sends only the occupied rows of its ``S``-row, destination-sorted send buffer (no padding on the
  send side), and every source's chunk lands contiguously (in source order) in the receiver's buffer of ``R`` rows:
  ``R = round_up(ceil(c * S), 8)`` (the balanced load times ``c``; at most ``P * S``), or ``P * S`` when dropless.
  The grouped FFN runs on ``R`` rows. A receiver keeps the first ``R`` of the slots bound to it in the order
  (column ``j``, source shard, local token): all first choices from every source before any second choice, ties
  between sources going to the lower shard index; a source's kept slots are thus a prefix of its chunk, and the
  rest are dropped. (Plain source order, cheaper by only the ``k`` factor in the gathered counts, would drop the
  higher shards' tokens, i.e. fixed batch rows, first; column order costs ``P * P * k`` integers and drops the
  least preferred choices first.) The return trip is the reverse ``ragged_all_to_all``. ``ragged_all_to_all`` is
  differentiable in jax 0.10.2 (its transpose is a reverse ``ragged_all_to_all`` whose offsets it re-derives with
  two more all_to_alls); a ``custom_vjp`` sends cotangents back along the already known reverse plan instead.
  XLA:CPU (jax 0.10.2) does not implement ``ragged-all-to-all``; on CPU meshes it is emulated with exactly the
  same semantics (chunks padded to ``min(S, R)`` rows, a plain ``all_to_all``, then a scatter at the computed
  offsets), so the index arithmetic and the dropping are testable on simulated CPU devices.
- ``"auto"`` (default): ``"ragged"`` with a capacity factor (on every platform, so which slots are dropped never
  depends on the platform; CPU uses the emulation) and on TPU/GPU also when dropless (it sends ``S`` rows instead
  of ``P * S``); ``"all_to_all"`` when dropless on CPU (the emulation would only add a scatter).

The platform comes from the ``platform`` argument, else :func:`dsjax.sharding.active_platform`: the active mesh's
(``jax.set_mesh`` with a concrete ``Mesh`` records its devices' platform in the abstract mesh that ``jit`` tracing
sees), else ``jax.default_backend()``. So compiling for TPU devices on a CPU host (``jax.experimental.topologies``)
picks the real ``ragged_all_to_all``.

On TPU (jax 0.10.2) ``ragged_dot``'s weight gradient lowers to a masked dense batched matmul over all ``E_l``
groups, ``E_l`` times its useful flops, whatever the buffer size; a grouped-GEMM kernel passed as ``gmm`` avoids it.

Dropped slots contribute zero output and get zero gradient (their rows are never sent); the capacity only applies
under expert parallelism (no mesh or an expert axis of size 1 runs dropless ``moe_ragged``).
:func:`dropped_slots` counts the drops from the routing alone, for a metric.

All steps are differentiable: gradients wrt ``x``, the routing weights and the three expert weight tensors flow
through both exchanges (whose transposes are the reverse exchanges), and the weight gradients are summed over the
non-expert token axes by ``shard_map``'s replication (vma) tracking.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from dsjax.ops.moe import (
    combine_slots,
    dispatch_rows,
    gate_and_up,
    gather_slot_rows,
    moe_ragged,
    permutation_inverse,
    permute_rows,
    stable_argsort,
    swiglu,
)
from dsjax.sharding import active_platform

EXCHANGES = ("auto", "all_to_all", "ragged")


def _check_options(capacity_factor: float | None, exchange: str) -> None:
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange={exchange!r}; choose one of {EXCHANGES}")
    if capacity_factor is not None and not (math.isfinite(capacity_factor) and capacity_factor > 0):
        raise ValueError(f"capacity_factor={capacity_factor!r} must be None (dropless) or a finite number > 0")


def resolve_exchange(exchange: str, capacity_factor: float | None, platform: str) -> str:
    """The exchange ``"auto"`` stands for (see the module docstring); other values are returned as they are."""
    _check_options(capacity_factor, exchange)
    if exchange != "auto":
        return exchange
    return "ragged" if capacity_factor is not None or platform != "cpu" else "all_to_all"


def _ceil(x: float) -> int:
    # Rounded first so that e.g. 1.1 * 10 = 11.000000000000002 gives 11 rows, not 12.
    return math.ceil(round(x, 6))


def capacity_rows(capacity_factor: float | None, slots: int, shards: int, exchange: str) -> int:
    """Static buffer rows: per destination bucket for ``"all_to_all"`` (``C``), per receiver for ``"ragged"`` (``R``).

    ``slots`` is ``S = m_l * k``, the (token, expert) slots of one device; ``shards`` the expert-axis size ``P``.
    Dropless (``None``) is the worst case; a capacity never exceeds it (more rows could not be filled).
    """
    if exchange == "all_to_all":
        return slots if capacity_factor is None else min(slots, _ceil(capacity_factor * slots / shards))
    if exchange == "ragged":
        if capacity_factor is None:
            return shards * slots
        return min(shards * slots, -(-_ceil(capacity_factor * slots) // 8) * 8)
    raise ValueError(f"exchange={exchange!r} is not resolved; use 'all_to_all' or 'ragged'")


def moe_expert_parallel(
    x_md,
    weights_mk,
    experts_mk,
    w_gate_edf,
    w_up_edf,
    w_down_efd,
    *,
    accum_dtype=jnp.float32,
    expert_axis: str = "expert",
    token_axes: tuple[str, ...] = ("data", "expert"),
    gmm=None,
    capacity_factor: float | None = None,
    exchange: str = "auto",
    platform: str | None = None,
    check_vma: bool = True,
):
    """Routed-expert output ``[m, d]``, like :func:`dsjax.ops.moe.moe_ragged` but expert-parallel.

    Call under ``jax.set_mesh(mesh)`` (inside or outside ``jit``). ``x_md``, ``weights_mk`` and ``experts_mk``
    (global expert ids) are sharded over ``token_axes`` (mesh axes absent from the mesh are ignored); the expert
    weights over ``expert_axis``. Without an active mesh, or with ``expert_axis`` absent or of size 1, this is
    ``moe_ragged`` (dropless, whatever ``capacity_factor``). The output is sharded like ``x_md``. ``gmm`` replaces
    ``ragged_dot`` as in ``moe_ragged`` (expert weights may then be pytrees, e.g. FP8 ``(e4m3, scales)`` pairs, all
    sharded on their expert axis).

    ``capacity_factor``: ``None`` is dropless; a number ``c > 0`` sizes the buffers at ``c`` times the balanced
    load and drops the overflow in the documented priority order (module docstring). ``exchange``: ``"auto"``,
    ``"all_to_all"`` or ``"ragged"`` (module docstring). ``platform`` (``"cpu"``, ``"tpu"``, ``"gpu"``) decides
    between the real ``ragged_all_to_all`` and its CPU emulation and what ``"auto"`` means; ``None`` takes it
    from the active mesh's devices (:func:`dsjax.sharding.active_platform`). ``check_vma=False`` is for ``gmm``
    kernels (Pallas) whose outputs carry no replication type; gradients of the weights, replicated over the
    non-expert token axes, are then summed by ``shard_map``'s conservative transpose (tested on CPU).
    """
    _check_options(capacity_factor, exchange)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or expert_axis not in mesh.axis_names or mesh.shape[expert_axis] == 1:
        return moe_ragged(
            x_md, weights_mk, experts_mk, w_gate_edf, w_up_edf, w_down_efd, accum_dtype=accum_dtype, gmm=gmm
        )

    num_shards = mesh.shape[expert_axis]
    # Axes an enclosing shard_map made manual (the pipeline's `data` rows) hold this device's tokens already.
    token_axes = tuple(a for a in token_axes if a in mesh.axis_names and a not in mesh.manual_axes)
    if expert_axis not in token_axes:
        raise ValueError(f"token_axes {token_axes} must include the expert axis {expert_axis!r}")
    num_experts = jax.tree.leaves(w_gate_edf)[0].shape[0]
    if num_experts % num_shards:
        raise ValueError(f"{num_experts} experts do not split over {num_shards} {expert_axis!r} shards")
    token_shards = 1
    for a in token_axes:
        token_shards *= mesh.shape[a]
    if x_md.shape[0] % token_shards:
        raise ValueError(f"{x_md.shape[0]} tokens do not split over {token_shards} devices of {token_axes}")

    platform = platform or active_platform()
    exchange = resolve_exchange(exchange, capacity_factor, platform)
    slots = x_md.shape[0] // token_shards * experts_mk.shape[1]
    rows = capacity_rows(capacity_factor, slots, num_shards, exchange)
    tok = PartitionSpec(token_axes, None)
    exp = PartitionSpec(expert_axis, None, None)

    def local(x, weights, experts, w_gate, w_up, w_down):
        return _moe_local(
            x,
            weights,
            experts,
            w_gate,
            w_up,
            w_down,
            accum_dtype=accum_dtype,
            axis=expert_axis,
            shards=num_shards,
            gmm=gmm or jax.lax.ragged_dot,
            exchange=exchange,
            rows=rows,
            emulate=platform == "cpu",
        )

    return jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, exp, exp, exp), out_specs=tok, check_vma=check_vma)(
        x_md, weights_mk, experts_mk.astype(jnp.int32), w_gate_edf, w_up_edf, w_down_efd
    )


def _moe_local(
    x_md,
    weights_mk,
    experts_mk,
    w_gate_edf,
    w_up_edf,
    w_down_efd,
    *,
    accum_dtype,
    axis,
    shards,
    gmm,
    exchange,
    rows,
    emulate,
):
    """The per-device body: order slots, exchange, local grouped FFN, reverse exchange, combine."""
    m, k = experts_mk.shape
    local_experts = jax.tree.leaves(w_gate_edf)[0].shape[0]
    slots = m * k

    # Slot q = j * m + t (column-major): within a destination, a stable sort keeps every token's first choice
    # ahead of any second choice, so a capacity drops the lowest-ranked choices first.
    flat = experts_mk.T.reshape(slots)
    dest = flat // local_experts
    order = stable_argsort(dest)  # send position -> slot
    sorted_dest = dest[order]
    counts_rj = jnp.bincount(dest * k + jnp.arange(slots) // m, length=shards * k).reshape(shards, k)
    counts = counts_rj.sum(1).astype(jnp.int32)
    starts = jnp.cumsum(counts) - counts  # first send position of every destination
    rank = jnp.arange(slots, dtype=jnp.int32) - starts[sorted_dest]  # position within the destination's chunk
    inverse = permutation_inverse(order)
    send_e = (flat % local_experts)[order].astype(jnp.int32)

    if exchange == "all_to_all":
        cap = rows
        # Bucket cell of every send position; overflowing ones point past the buffer and are neither sent nor
        # gathered back (fill 0), so they get zero output and zero gradient.
        cell = jnp.where(rank < cap, sorted_dest * cap + rank, shards * cap)
        buf_e = jnp.full((shards * cap,), local_experts, jnp.int32).at[cell].set(send_e, mode="drop")
        recv_e = jax.lax.all_to_all(buf_e, axis, 0, 0, tiled=True)
        plan = (cell,)
    else:
        me = jax.lax.axis_index(axis)
        # Every device sees every source's per-(destination, column) counts and derives the same plan.
        counts_srj = jax.lax.all_gather(counts_rj.astype(jnp.int32), axis)  # [source, destination, column]
        kept = _ragged_plan(counts_srj, rows)  # [destination, source] rows kept of each chunk (a prefix)
        send_sizes = kept[:, me]
        output_offsets = (jnp.cumsum(kept, axis=1) - kept)[:, me]  # where my chunk starts in each receiver
        recv_sizes = kept[me]
        recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes
        counts_sr = counts_srj.sum(2)
        source_starts = (jnp.cumsum(counts_sr, axis=1) - counts_sr)[:, me]  # each source's chunk bound for me

        there = (starts, send_sizes, output_offsets, recv_sizes)
        back = (recv_offsets, recv_sizes, source_starts, send_sizes)  # the same chunks, the other way
        recv_e = _ragged_all_to_all(
            send_e, jnp.full_like(send_e, local_experts, shape=(rows,)), *there, axis=axis, emulate=emulate
        )
        plan = (there, back)

    r_order = stable_argsort(recv_e)  # the empty-row sentinel sorts last; bincount leaves it out
    r_inverse = permutation_inverse(r_order)
    group_sizes = jnp.bincount(recv_e, length=local_experts).astype(jnp.int32)
    move = functools.partial(
        _to_expert_rows, exchange=exchange, axis=axis, emulate=emulate, slots=slots, rows=rows, shards=shards
    )
    x_sorted = dispatch_rows(gmm, x_md, move, (order, inverse, plan, r_order, r_inverse))
    y_sorted = _grouped_ffn(x_sorted, group_sizes, w_gate_edf, w_up_edf, w_down_efd, gmm)
    y_recv = permute_rows(y_sorted, r_inverse, r_order)
    # Reverse trip: rows dropped on the way out stay zero in the send-ordered result.
    if exchange == "all_to_all":
        back_rows = jax.lax.all_to_all(y_recv, axis, 0, 0, tiled=True)
        y_sent = jnp.take(back_rows, cell, axis=0, mode="fill", fill_value=0)
    else:
        y_sent = _ragged_rows(y_recv, back, there, rows, slots, axis, emulate)

    y_slots = permute_rows(y_sent, inverse, order).reshape(k, m, -1)
    return combine_slots(y_slots, weights_mk, "kmd", accum_dtype).astype(x_md.dtype)


def _ragged_plan(counts_srj, rows):
    """Rows of each (source -> destination) chunk that fit a receiver's ``rows``: ``[destination, source]``.

    A receiver admits slots in the order (column, source): all sources' first choices before any second choice.
    Since a source's chunk is ordered by column too, what it may send is a prefix of the chunk.
    """
    shards, _, k = counts_srj.shape
    queue = counts_srj.transpose(1, 2, 0).reshape(shards, k * shards)  # per receiver, (column, source) order
    ahead = jnp.cumsum(queue, axis=1) - queue
    admitted = jnp.clip(rows - ahead, 0, queue)
    return admitted.reshape(shards, k, shards).sum(1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _ragged_rows(operand, there, back, in_rows, out_rows, axis, emulate):
    """Ragged exchange of rows (activations, or FP8 bytes and scales) into a zero ``[out_rows, ...]`` buffer along
    the plan ``there`` (input offsets, send sizes, output offsets, receive sizes); its cotangent goes back along
    ``back``, the same chunks reversed.

    ``jax.lax.ragged_all_to_all`` has a transpose rule (jax 0.10.2), but it re-derives the reverse offsets with two
    extra all_to_alls per exchange; every device already knows them from the plan. The backward also runs through
    the same function as the forward, so the CPU emulation covers the index arithmetic TPU/GPU use in backward.
    """
    del back, in_rows
    # zeros_like keeps the operand's varying mesh axes: ragged_all_to_all types its result like ``output``.
    output = jnp.zeros_like(operand, shape=(out_rows, *operand.shape[1:]))
    return _ragged_all_to_all(operand, output, *there, axis=axis, emulate=emulate)


def _ragged_rows_fwd(operand, there, back, in_rows, out_rows, axis, emulate):
    return _ragged_rows(operand, there, back, in_rows, out_rows, axis, emulate), (there, back)


def _ragged_rows_bwd(in_rows, out_rows, axis, emulate, residuals, cotangent):
    there, back = residuals
    operand_ct = _ragged_rows(cotangent, back, there, out_rows, in_rows, axis, emulate)
    return operand_ct, None, None


_ragged_rows.defvjp(_ragged_rows_fwd, _ragged_rows_bwd)


def _ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis, emulate):
    """``jax.lax.ragged_all_to_all`` (one chunk per peer), or on CPU an emulation with the same semantics."""
    if not emulate:
        return jax.lax.ragged_all_to_all(
            operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name=axis
        )
    # A chunk never exceeds either buffer, so padding every chunk to min(N, M) rows loses nothing.
    bucket = min(operand.shape[0], output.shape[0])
    i = jnp.arange(bucket, dtype=jnp.int32)[None, :]
    src = jnp.where(i < send_sizes[:, None], input_offsets[:, None] + i, operand.shape[0])  # [peer, bucket]
    chunks = jnp.take(operand, src, axis=0, mode="fill", fill_value=0)
    received = jax.lax.all_to_all(chunks, axis, 0, 0, tiled=True)  # [source, bucket, ...]
    at = jax.lax.all_to_all(output_offsets, axis, 0, 0, tiled=True)  # where each source's chunk lands here
    dst = jnp.where(i < recv_sizes[:, None], at[:, None] + i, output.shape[0]).reshape(-1)
    return output.at[dst].set(received.reshape(dst.shape[0], *operand.shape[1:]), mode="drop")


def _to_expert_rows(a, index, *, exchange, axis, emulate, slots, rows, shards):
    """Local token rows ``a [m, ...]`` moved to the grouped FFN's rows: each slot's copy in send order, exchanged
    over ``axis``, then sorted by local expert (``index``: the slot order and its inverse, the exchange's plan,
    the received rows' expert order and its inverse). A row movement (every result row a copy of one input row,
    or zeros), so it applies to any row array: activations, or their E4M3 values and scales."""
    order, inverse, plan, r_order, r_inverse = index
    send = gather_slot_rows(a, order, inverse, "kmd")
    if exchange == "all_to_all":
        (cell,) = plan
        buf = jnp.zeros((shards * rows, *a.shape[1:]), a.dtype).at[cell].set(send, mode="drop")
        recv = jax.lax.all_to_all(buf, axis, 0, 0, tiled=True)
    else:
        there, back = plan
        recv = _ragged_rows(send, there, back, slots, rows, axis, emulate)
    return permute_rows(recv, r_order, r_inverse)


def _grouped_ffn(x_sorted, group_sizes, w_gate_edf, w_up_edf, w_down_efd, gmm):
    """SwiGLU experts on expert-sorted rows (rows past the groups are empty buffer rows: their gate/up
    activations are masked to zero, so they contribute nothing and cannot inject NaNs)."""
    rows = jax.tree.leaves(x_sorted)[0].shape[0]  # an array, or FP8 rows (values, scales, gradient sink)
    valid = (jnp.arange(rows) < group_sizes.sum())[:, None]
    gate, up = (jnp.where(valid, h, 0) for h in gate_and_up(gmm, x_sorted, w_gate_edf, w_up_edf, group_sizes))
    return gmm(swiglu(gate, up), w_down_efd, group_sizes)


def dropped_slots(
    experts_mk, *, num_experts: int, expert_shards: int, token_shards: int, capacity_factor: float | None, exchange: str
):
    """How many (token, expert) slots :func:`moe_expert_parallel` drops for this routing: an int32 scalar.

    ``experts_mk`` holds the global ``[m, k]`` expert ids, the tokens split into ``token_shards`` contiguous
    blocks as ``shard_map`` sees them over ``token_axes``, with the expert axis (``expert_shards``) the last of
    ``token_axes`` (the default ``("data", "expert")``): blocks ``g * P .. g * P + P - 1`` exchange with each other.
    ``exchange`` as passed to the layer (``"auto"`` resolves like the layer; dropless gives 0 either way). Only
    counts matter (``ragged``: overflow of each receiver's ``R`` rows; ``all_to_all``: of each (source,
    destination) bucket), so this is a cheap reduction that works on sharded arrays inside ``jit``; divide by
    ``m * k`` for the drop rate. Without expert parallelism (``expert_shards == 1``) the layer is dropless: 0.
    """
    _check_options(capacity_factor, exchange)
    m, k = experts_mk.shape
    if num_experts % expert_shards or token_shards % expert_shards or m % token_shards:
        raise ValueError(
            f"{num_experts} experts over {expert_shards} shards, {m} tokens over {token_shards} token shards: "
            "experts must split over expert shards, token shards over expert shards and tokens over token shards"
        )
    if capacity_factor is None or expert_shards == 1:
        return jnp.zeros((), jnp.int32)
    exchange = "ragged" if exchange == "auto" else exchange
    rows = capacity_rows(capacity_factor, m // token_shards * k, expert_shards, exchange)
    dest = jnp.asarray(experts_mk).astype(jnp.int32) // (num_experts // expert_shards)
    dest = dest.reshape(token_shards // expert_shards, expert_shards, -1)  # [group, source, local slots]
    counts = (dest[..., None] == np.arange(expert_shards).reshape(1, 1, 1, -1)).sum(2, dtype=jnp.int32)  # [g, s, r]
    if exchange == "ragged":
        counts = counts.sum(1)  # a receiver's buffer is shared by all sources
    return jnp.maximum(counts - rows, 0).sum(dtype=jnp.int32)
