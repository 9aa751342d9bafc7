"""Dropless expert parallelism: dispatch token slots to expert shards with an explicit all-to-all.

Layout (inside ``jax.shard_map``, per device): ``m_l`` local tokens (the token dim is sharded over ``token_axes``,
which must include ``expert_axis``) and ``E_l = E / P`` local experts (the expert dim of the weights is sharded
over ``expert_axis`` of size ``P``; the weights are replicated over the other axes). Each device

1. buckets its ``S = m_l * k`` (token, expert) slots by destination shard ``expert // E_l`` into a fixed-size send
   buffer ``[P, C, d]`` with ``C = S`` rows per destination, plus the local expert id of every row (``E_l`` marks
   padding, so padding sorts last and is not counted in any group);
2. exchanges the buffers with ``jax.lax.all_to_all`` over ``expert_axis``;
3. sorts the ``P * C`` received rows by local expert and runs the local experts with ``jax.lax.ragged_dot``
   (padding rows are outside every group; their gate/up activations are masked to zero, so they contribute
   nothing and cannot inject NaNs into values or gradients);
4. returns the results with the inverse ``all_to_all`` and combines them with the routing weights into
   ``[m_l, d]`` in ``accum_dtype``.

Memory cost of staying dropless with static shapes: ``C = m_l * k`` is the worst case (every slot of every local
token goes to one shard), so the send and receive buffers hold ``P * m_l * k * d`` elements each (``P`` times the
``m_l * k * d`` actually routed), the grouped matmuls see ``P * m_l * k`` rows (padding rows are skipped by real
grouped-GEMM kernels but still occupy memory, e.g. the ``[P * m_l * k, f]`` activations kept for backward), and
the all-to-all moves ``P`` times the useful bytes. A capacity factor would cut this at the price of dropping
tokens. The upgrade path on GPU/TPU is ``jax.lax.ragged_all_to_all``, which sends only the occupied rows of each
bucket (sizes exchanged by a small all_to_all first) into a receive buffer sized by the real load; XLA:CPU (jax
0.10) does not implement ``ragged-all-to-all``, so it is not offered here.

All steps are differentiable: gradients wrt ``x``, the routing weights and the three expert weight tensors flow
through both all-to-alls (whose transposes are all-to-alls), and the weight gradients are summed over the
non-expert token axes by ``shard_map``'s replication (vma) tracking.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from dsjax.ops.moe import moe_ragged, swiglu


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
):
    """Routed-expert output ``[m, d]``, like :func:`dsjax.ops.moe.moe_ragged` but expert-parallel.

    Call under ``jax.set_mesh(mesh)`` (inside or outside ``jit``). ``x_md``, ``weights_mk`` and ``experts_mk``
    (global expert ids) are sharded over ``token_axes`` (mesh axes absent from the mesh are ignored); the expert
    weights over ``expert_axis``. Without an active mesh, or with ``expert_axis`` absent or of size 1, this is
    ``moe_ragged``. The output is sharded like ``x_md``. ``gmm`` replaces ``ragged_dot`` as in ``moe_ragged``
    (expert weights may then be pytrees, e.g. FP8 ``(e4m3, scales)`` pairs, all sharded on their expert axis).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or expert_axis not in mesh.axis_names or mesh.shape[expert_axis] == 1:
        return moe_ragged(
            x_md, weights_mk, experts_mk, w_gate_edf, w_up_edf, w_down_efd, accum_dtype=accum_dtype, gmm=gmm
        )

    num_shards = mesh.shape[expert_axis]
    token_axes = tuple(a for a in token_axes if a in mesh.axis_names)
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
        )

    return jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, exp, exp, exp), out_specs=tok)(
        x_md, weights_mk, experts_mk.astype(jnp.int32), w_gate_edf, w_up_edf, w_down_efd
    )


def _moe_local(x_md, weights_mk, experts_mk, w_gate_edf, w_up_edf, w_down_efd, *, accum_dtype, axis, shards, gmm):
    """The per-device body: bucket, all_to_all, local grouped FFN, all_to_all back, combine."""
    m, k = experts_mk.shape
    d = x_md.shape[1]
    local_experts = jax.tree.leaves(w_gate_edf)[0].shape[0]
    slots = m * k
    cap = slots  # rows per destination shard: the worst case, every local slot to one shard (dropless)

    # Buffer cell of every slot: destination shard * cap + rank among the slots bound for that shard. Sorting by
    # global expert groups slots by destination and, within one, by local expert.
    flat = experts_mk.reshape(slots)
    dest = flat // local_experts
    order = jnp.argsort(flat, stable=True)
    counts = jnp.bincount(dest, length=shards).astype(jnp.int32)
    starts = jnp.cumsum(counts) - counts
    sorted_dest = dest[order]
    cell_sorted = sorted_dest * cap + jnp.arange(slots, dtype=jnp.int32) - starts[sorted_dest]
    cell = jnp.zeros((slots,), jnp.int32).at[order].set(cell_sorted)

    send_x = jnp.zeros((shards * cap, d), x_md.dtype).at[cell].set(x_md[jnp.arange(slots) // k])
    send_e = jnp.full((shards * cap,), local_experts, jnp.int32).at[cell].set(flat % local_experts)
    recv_x = jax.lax.all_to_all(send_x.reshape(shards, cap, d), axis, 0, 0).reshape(shards * cap, d)
    recv_e = jax.lax.all_to_all(send_e.reshape(shards, cap), axis, 0, 0).reshape(shards * cap)

    # Local experts on the received rows; the padding sentinel sorts last and bincount drops it.
    r_order = jnp.argsort(recv_e, stable=True)
    group_sizes = jnp.bincount(recv_e, length=local_experts).astype(jnp.int32)
    valid = (jnp.arange(shards * cap) < group_sizes.sum())[:, None]
    x_sorted = recv_x[r_order]
    gate = jnp.where(valid, gmm(x_sorted, w_gate_edf, group_sizes), 0)
    up = jnp.where(valid, gmm(x_sorted, w_up_edf, group_sizes), 0)
    y_sorted = gmm(swiglu(gate, up), w_down_efd, group_sizes)
    y_recv = jnp.zeros_like(y_sorted).at[r_order].set(y_sorted)

    back = jax.lax.all_to_all(y_recv.reshape(shards, cap, d), axis, 0, 0).reshape(shards * cap, d)
    y_slots = back[cell].reshape(m, k, d)
    return jnp.einsum("mkd,mk->md", y_slots.astype(accum_dtype), weights_mk.astype(accum_dtype)).astype(x_md.dtype)
