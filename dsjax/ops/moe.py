"""Dropless expert dispatch: sort token slots by expert and run grouped matmuls, or a dense reference.

Expert FFN: ``down(silu(x . W_gate) * (x . W_up))`` with ``w_gate, w_up [e, d, f]`` and ``w_down [e, f, d]``.
"""

import functools
import math

import jax
import jax.numpy as jnp

from dsjax.sharding import varying_axes


def swiglu(gate, up):
    return jax.nn.silu(gate) * up


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def combine_slots(y_slots, weights_mk, layout: str, accum_dtype):
    """``sum_k weights[m, k] * y[.., m, k, ..]`` in ``accum_dtype``: the experts' outputs of each token weighted
    and summed (``layout`` ``"mkd"`` or ``"kmd"``, the order of ``y_slots``' dims). The same values and
    gradients as the einsum of the two cast to ``accum_dtype``, but the backward keeps ``y_slots`` in its own
    dtype: autodiff would keep the fp32 cast, ``tokens x k x d x 4`` bytes (940 MB per 4K tokens of DeepSeek-V3),
    live from the forward to the layer's backward."""
    return _combine(y_slots, weights_mk, layout, accum_dtype)


def _combine(y_slots, weights_mk, layout, accum_dtype):
    return jnp.einsum(f"{layout},mk->md", y_slots.astype(accum_dtype), weights_mk.astype(accum_dtype))


def _combine_fwd(y_slots, weights_mk, layout, accum_dtype):
    return _combine(y_slots, weights_mk, layout, accum_dtype), (y_slots, weights_mk)


def _combine_bwd(layout, accum_dtype, residuals, g_md):
    y_slots, weights_mk = residuals
    dy = jnp.einsum(f"md,mk->{layout}", g_md, weights_mk.astype(accum_dtype)).astype(y_slots.dtype)
    # The barrier keeps XLA from merging this cast with the forward's (one fp32 copy, kept alive in between).
    y_accum = jax.lax.optimization_barrier(y_slots).astype(accum_dtype)
    dw = jnp.einsum(f"{layout},md->mk", y_accum, g_md).astype(weights_mk.dtype)
    return dy, dw


combine_slots.defvjp(_combine_fwd, _combine_bwd)


def varying_like(a, ref):
    """``a`` typed as varying over every manual mesh axis ``ref`` varies over (inside ``shard_map``).

    Some index-producing operations drop the varying-axes type of their input (jax 0.10: ``jnp.argsort``'s
    result, and a scatter of varying indices into a fresh array, come out typed as replicated). A permutation
    typed replicated while its values differ per device is silently wrong where the type is acted on: as a
    vjp residual, ``shard_map`` gives it a replicated spec, and a pipeline that stores the residual and
    restores it later (`dsjax.pipeline`) hands every device one device's permutation.
    """
    missing = tuple(sorted(varying_axes(ref) - varying_axes(a)))
    return jax.lax.pcast(a, missing, to="varying") if missing else a


def stable_argsort(keys):
    """``jnp.argsort(keys, stable=True)``, typed as varying where ``keys`` is (see `varying_like`)."""
    return varying_like(jnp.argsort(keys, stable=True), keys)


def permutation_inverse(perm):
    """``inverse`` with ``inverse[perm[i]] = i`` for a permutation ``perm`` of ``0..n-1`` (a scatter of n ints),
    typed as varying where ``perm`` is."""
    n = perm.shape[0]
    return varying_like(jnp.zeros((n,), perm.dtype).at[perm].set(jnp.arange(n, dtype=perm.dtype)), perm)


@jax.custom_vjp
def permute_rows(x, perm, inverse):
    """``x[perm]`` for a permutation ``perm`` of ``x``'s rows and its ``inverse``: the same values, and a
    gradient that gathers the cotangent's rows back (``g[inverse]``) where autodiff would scatter-add them.
    Row scatters are the costly way to move rows on accelerators: an H200 profile of a V2-Lite train step
    spent 8.8 of 127 ms in the dispatch's scatters (one [49152, 2048] bf16 scatter-add 4.6 ms, ~50x a copy),
    and XLA:TPU lowers a bf16 row scatter through u32 buffers of the full size (two u32[131072, 7168], 7 GiB,
    at the peak of a V3 layer's step at 16K tokens per chip)."""
    return x[perm]


def _permute_rows_fwd(x, perm, inverse):
    return x[perm], inverse


def _permute_rows_bwd(inverse, g):
    return g[inverse], None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gather_slot_rows(x_md, order, inverse, layout: str):
    """Token rows of expert slots in ``order``: ``x_md[token(order)]`` with slot ``q``'s token ``q // k``
    (``layout="mkd"``: slot ``q = t * k + j``) or ``q % m`` (``"kmd"``: ``q = j * m + t``); ``order`` is a
    permutation of the ``m * k`` slots and ``inverse`` its inverse. The gradient gathers every slot's cotangent
    back into slot order and sums each token's ``k`` copies (in fp32), instead of autodiff's scatter-add."""
    return x_md[_slot_tokens(order, x_md.shape[0], layout)]


def _slot_tokens(order, m, layout):
    return order % m if layout == "kmd" else order // (order.shape[0] // m)


def _gather_slot_rows_fwd(x_md, order, inverse, layout):
    # A [m, 0] array carries x's row count and dtype to the backward (residuals must be arrays).
    return x_md[_slot_tokens(order, x_md.shape[0], layout)], (inverse, jnp.zeros((x_md.shape[0], 0), x_md.dtype))


def _gather_slot_rows_bwd(layout, residuals, g):
    inverse, like_x = residuals
    m, d = like_x.shape[0], g.shape[-1]
    g_slots = g[inverse].reshape((-1, m, d) if layout == "kmd" else (m, -1, d))  # back in slot order
    return g_slots.sum(layout.index("k"), dtype=jnp.float32).astype(like_x.dtype), None, None


gather_slot_rows.defvjp(_gather_slot_rows_fwd, _gather_slot_rows_bwd)


def megablox_gmm(x, w, group_sizes, *, interpret: bool = False):
    """``jax.lax.ragged_dot`` through JAX's Pallas grouped-matmul kernels for TPU (megablox ``gmm``, whose
    weight gradient is the grouped ``tgmm``): XLA's own TPU lowering of ``ragged_dot``'s weight gradient is a
    masked dense product over every local expert (E_l times the useful flops). Rows are padded to the kernel's
    tile; rows past ``sum(group_sizes)`` give zeros, as ``ragged_dot``. ``interpret`` runs it on any backend
    (slowly), for tests."""
    from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

    m, k = x.shape
    n = w.shape[-1]
    tile_m = 512 if m >= 512 else 128
    pad = -m % tile_m

    def tile(dim: int) -> int:  # the largest of 512 / 256 / 128 that divides the dim, else the whole dim
        return next((t for t in (512, 256, 128) if dim % t == 0), dim)

    xp = jnp.pad(x, ((0, pad), (0, 0))) if pad else x
    y = megablox.gmm(
        xp,
        w.astype(x.dtype),
        group_sizes.astype(jnp.int32),
        preferred_element_type=x.dtype,
        tiling=(tile_m, tile(k), tile(n)),
        interpret=interpret,
    )[:m]
    return zero_rows_past_groups(y, group_sizes)


def zero_rows_past_groups(y, group_sizes):
    """``y [rows, ...]`` with the rows past ``sum(group_sizes)`` zeroed: what ``ragged_dot`` gives there, and
    what grouped kernels that never visit those rows leave uninitialised."""
    used = jnp.arange(y.shape[0]) < jnp.sum(group_sizes)
    return jnp.where(used.reshape(-1, *(1,) * (y.ndim - 1)), y, 0).astype(y.dtype)


def dispatch_rows(gmm, x, move, index):
    """``move(x, index)``: token rows moved to where the grouped GEMMs take them (``move`` is a row movement --
    every result row a copy of one row of ``x``, or zeros -- e.g. each token's slots sorted by expert, or
    exchanged under expert parallelism; ``index`` its index arrays). Through ``gmm.dispatch(x, move, index)``
    where the ``gmm`` has one: the FP8 GEMMs quantise the tokens first and move their E4M3 values and scales,
    half the bytes of bf16 rows (DeepSeek-V3 dispatches in FP8), with the same values as quantising the moved
    rows."""
    dispatch = getattr(gmm, "dispatch", None)
    return move(x, index) if dispatch is None else dispatch(x, move, index)


def _expert_slot_rows(a, index):
    """The rows of ``a [m, ...]`` of every ``"mkd"`` slot, in ``index = (order, inverse)``'s order."""
    return gather_slot_rows(a, *index, "mkd")


def gate_and_up(gmm, x, w_gate, w_up, group_sizes):
    """The experts' two SwiGLU input projections of the same rows: ``gmm.pair`` where the ``gmm`` has one (the
    FP8 kernels compute both together), else two ``gmm`` calls."""
    pair = getattr(gmm, "pair", None)
    if pair is not None:
        return pair(x, w_gate, w_up, group_sizes)
    return gmm(x, w_gate, group_sizes), gmm(x, w_up, group_sizes)


def moe_ragged(x_md, weights_mk, experts_mk, w_gate_edf, w_up_edf, w_down_efd, *, accum_dtype=jnp.float32, gmm=None):
    """Routed-expert output ``[m, d]`` via ``jax.lax.ragged_dot`` over expert-sorted token slots.

    Every (token, expert) pair is computed (no capacity, no dropping). Outputs are weighted, un-sorted and
    summed over the k experts of each token in ``accum_dtype`` (fp32 as HF; bf16 as DeepSeek's code).
    ``gmm(x, w, group_sizes)`` replaces ``ragged_dot`` for the three grouped GEMMs (e.g. the FP8 one, whose
    weights may be ``(e4m3, scales)`` pairs).
    """
    gmm = gmm or jax.lax.ragged_dot
    m, k = experts_mk.shape
    num_experts = jax.tree.leaves(w_gate_edf)[0].shape[0]
    flat = experts_mk.reshape(-1)
    order = stable_argsort(flat)  # slot ids grouped by expert
    inverse = permutation_inverse(order)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    x_sorted = dispatch_rows(gmm, x_md, _expert_slot_rows, (order, inverse))
    hidden = swiglu(*gate_and_up(gmm, x_sorted, w_gate_edf, w_up_edf, group_sizes))
    y_sorted = gmm(hidden, w_down_efd, group_sizes)
    y_slots = permute_rows(y_sorted, inverse, order).reshape(m, k, -1)
    return combine_slots(y_slots, weights_mk, "mkd", accum_dtype).astype(x_md.dtype)


def moe_dense(x_md, weights_mk, experts_mk, w_gate_edf, w_up_edf, w_down_efd, *, accum_dtype=jnp.float32):
    """Every expert on every token, masked by the combine weights: O(m * e) work, no sorting or gathers.

    The reference path, and the fastest one on CPU when there are about as many tokens as experts (decoding a
    batch): all weights are read once either way, and the weighted sum over experts is folded into one down
    projection GEMM over (expert, width), accumulated in ``accum_dtype``.
    """
    m, num_experts = x_md.shape[0], w_gate_edf.shape[0]
    combine_me = jnp.zeros((m, num_experts), accum_dtype)
    combine_me = combine_me.at[jnp.arange(m)[:, None], experts_mk].add(weights_mk.astype(accum_dtype))
    hidden = swiglu(jnp.einsum("md,edf->mef", x_md, w_gate_edf), jnp.einsum("md,edf->mef", x_md, w_up_edf))
    weighted = (hidden.astype(accum_dtype) * combine_me[:, :, None]).astype(x_md.dtype)
    y = jnp.einsum("mef,efd->md", weighted, w_down_efd, preferred_element_type=accum_dtype)
    return y.astype(x_md.dtype)


def moe_blocked(
    x_md,
    weights_mk,
    experts_mk,
    w_gate_edf,
    w_up_edf,
    w_down_efd,
    *,
    accum_dtype=jnp.float32,
    block: int | None = None,
    bmm=None,
):
    """Dropless grouped matmul as a batched matmul over fixed-size blocks (a CPU fast path).

    Slots are sorted by expert and each expert's run is padded to a multiple of ``block`` rows, so every
    block belongs to one expert; the blocks then run as one batched matmul against their experts' weights.
    XLA:CPU lowers ``ragged_dot`` to slow loops, which this avoids. The cost is gathering a copy of the expert
    weights per block (``blocks * d * f`` values), fine for small models; accelerators should use ``ragged``.
    ``bmm(x [n, b, k], w, block_expert [n]) -> [n, b, out]`` replaces the batched matmul against the gathered
    weights ``w[block_expert]`` (e.g. the FP8 one, whose weights may be ``(e4m3, scales)`` pairs).
    """
    m, k = experts_mk.shape
    num_experts, d, _ = jax.tree.leaves(w_gate_edf)[0].shape
    if bmm is None:

        def bmm(x, w, block_expert):
            return jnp.einsum("nbd,ndf->nbf", x, w[block_expert])

    slots = m * k
    if block is None:
        # Cost ~ rows computed (slots + e * block, padding included) + weight copies (slots / block + e): the
        # optimum is block ~ sqrt(c * slots / e), c ~ 16 on CPU. Measured on fwd + bwd: 64-128 best at 256-512
        # slots per expert (0.75-0.9x the time of one block per expert). Below 16 slots per expert (decoding)
        # blocks stay at about one per expert, down to 1 row: padding would cost more than copies there.
        load = max(slots / num_experts, 1)
        block = int(min(128, 2 ** round(math.log2(load)), 2 ** round(math.log2(math.sqrt(16 * load)))))
    flat = experts_mk.reshape(-1)
    order = stable_argsort(flat)
    counts = jnp.bincount(flat, length=num_experts)
    padded = (counts + block - 1) // block * block
    padded_end = jnp.cumsum(padded)
    sorted_expert = flat[order]
    rank = jnp.arange(slots) - (jnp.cumsum(counts) - counts)[sorted_expert]
    row = (padded_end - padded)[sorted_expert] + rank  # each slot's row in the padded layout
    # Static bound on the blocks: sum_e ceil(c_e / block) over at most min(e, slots) experts with c_e > 0.
    num_blocks = (slots + min(num_experts, slots) * (block - 1)) // block
    x_rows = jnp.zeros((num_blocks * block, d), x_md.dtype).at[row].set(x_md[order // k], unique_indices=True)
    # Blocks past the last expert's region hold zero rows; give them a valid expert id (their output is 0).
    block_expert = jnp.minimum(
        jnp.searchsorted(padded_end, jnp.arange(num_blocks) * block, side="right"), num_experts - 1
    )
    xb = x_rows.reshape(num_blocks, block, d)
    hidden = swiglu(bmm(xb, w_gate_edf, block_expert), bmm(xb, w_up_edf, block_expert))
    y_rows = bmm(hidden, w_down_efd, block_expert).reshape(-1, d)
    y_slots = jnp.zeros((slots, d), y_rows.dtype).at[order].set(y_rows[row], unique_indices=True).reshape(m, k, d)
    return combine_slots(y_slots, weights_mk, "mkd", accum_dtype).astype(x_md.dtype)
