"""Execute a pipeline `Schedule` for real: one jitted SPMD program over a ``stage`` mesh axis.

Design (see `make_engine`):

- **Time steps.** The per-rank op lists become a global sequence of unit-time steps (`tables.timesteps`); at
  each step every rank runs one op or nothing. Since `validate` has proved the schedule deadlock-free, the
  replay always finishes.
- **One program.** The steps are encoded as an int table ``[T, ranks, fields]`` (op code; for its F, B and W
  parts the local chunk, micro-batch, stage kind and buffer slots; where to store what arrives). Inside
  `jax.shard_map` over the ``stage`` axis (other mesh axes stay automatic: expert parallelism inside a stage
  works as without the pipeline) each rank scans over its column of the table; a step is a `lax.switch` on the
  op code (no-op, F, B, W, BW, FB), each part a `lax.switch` on the stage *kind* (the embedding stage, a middle
  stage, the loss stage: stages of different shapes and code), then one `lax.ppermute` per (payload, hop) pair
  the schedule ever uses (activations to the next stage's rank, activation gradients to the previous stage's
  rank; hops of +1 / -1, 0 for DualPipeV's turn of the V), then masked writes of what arrived into fixed-size
  buffers. The whole step is compiled once: program size does not grow with micro-batches or steps.
- **Buffers** are sized by the schedule's live ranges (`tables.allocate_slots`), not ``chunks * microbatches``.
- **Stage functions.** ``fn(params, consts, shared, shared_consts, x, inputs_m) -> (y, loss, aux)`` per kind:
  ``params`` / ``consts`` are the stage's slice of pytrees stacked on a leading stage axis (differentiated /
  not), ``shared`` / ``shared_consts`` pytrees every rank holds whole (e.g. the embedding, used by the first and
  the last stage); ``x`` the activation from the previous stage (ignored by stage 0, which reads its micro-batch
  from ``inputs_m``); ``y`` the activation for the next stage (None for the last); ``loss`` this stage's part of
  the micro-batch's loss (a stage may contribute several: the MoE balance loss of its layers); ``aux`` a pytree
  of the same structure for every kind (metrics such as expert loads), summed over micro-batches.
- **B/W split.** F keeps only the stage input. B (input gradient) runs `jax.vjp` of the stage on the stored
  input with cotangents (received output gradient, 1 for its loss) and returns only the input gradient (XLA drops
  the weight-gradient half). With ``keep_residuals`` (the default) a B whose W comes later also stores the vjp
  closure's residuals that depend on the micro-batch (`dsjax.pipeline.residuals`: not the parameters nor what
  they alone determine), laid out per dtype in a residual buffer slot split over the automatic mesh axes; its W
  rebuilds the closure from them and computes only the weight gradients: no forward recompute, and the stage
  input is freed at B. Without it, W re-runs the vjp from the stored input.
  BW and FB compute both gradients at once.
- **FB** is one `lax.switch` branch with a forward of one micro-batch and a full backward of another: one traced
  computation with no data dependency between its halves, so XLA may interleave them (DualPipe's F&B).
- **Parameters.** The stacked ``[stages, ...]`` stage parameters are sharded over the ``stage`` axis in stage
  order (rank r holds ``stages / ranks`` consecutive stages: no rank holds the whole stack, at rest or in the
  step). Inside the step each rank receives the stages of its `Schedule.chunks` by `ppermute` (`_placement_moves`:
  none for 1F1B / ZB1P; DualPipe: its mirror stage PP-1-r, the same weights as the mirror rank's; DualPipeV:
  stages r and 2R-1-r, from the ranks holding them at rest). Weight gradients accumulate per rank and chunk and
  go back the same way (DualPipe's mirror copies add up), sharded like the parameters. Shared-parameter
  gradients are summed over ranks.

Why one SPMD program and not per-rank Python driving separate programs: JAX is single-controller; a per-rank op
stream with point-to-point sends is expressed natively as one program where every device runs the same step and
differs by data (its table column), and `ppermute` is the collective form of send/receive.

Overheads (correctness first): (1) every step runs one `ppermute` per used (payload, hop) channel on every
rank, also when the rank has nothing to send (zeros are sent); (2) B recomputes the stage forward from the
stored input (activation checkpointing at stage granularity; a real system keeps F's residuals instead, at much
more memory); (3) a step with no W part still adds a zero gradient; (4) the unit-time replay puts ops of
different costs in one step, so the step time is the slowest rank's op (real timing is the simulator's concern);
(5) micro-batch inputs are replicated to every rank; (6) shared parameters (embedding, dense layers, head, MTP)
are held by every stage rank (FSDP rules split them over ``data`` x ``expert`` within the rank: DeepSeek-V3's
are ~4.6B parameters, 43 GiB per chip with their moments unsplit), and residual slots are as wide as the widest
stage kind's (the last stage's logits, unless ``loss_chunk`` chunks the head). Activation, gradient and residual
slots are split over the mesh axes that stay automatic (``expert``) along their first dimension those divide.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dsjax.pipeline import tables as tb
from dsjax.pipeline.residuals import ResidualLayout, data_dependent, split_spec
from dsjax.pipeline.schedules import Schedule
from dsjax.pipeline.tables import Code, allocate_slots, encode, timesteps

PyTree = Any
StageFn = Callable[..., tuple[jax.Array | None, jax.Array, PyTree]]

__all__ = [
    "EngineResult",
    "PipelineResult",
    "make_engine",
    "make_pipeline_step",
    "run_schedule",
    "sum_stages",
    "timesteps",
]


class EngineResult(NamedTuple):
    """What an engine from `make_engine` returns.

    Attributes:
        losses: ``[stages, microbatches]`` each stage's loss contribution per micro-batch.
        aux: the stages' ``aux`` summed over stages and micro-batches.
        stage_grads: gradients of the summed loss for the stacked stage parameters (leading stage axis).
        shared_grads: gradients for the shared parameters.
    """

    losses: jax.Array
    aux: PyTree
    stage_grads: PyTree
    shared_grads: PyTree


def sum_stages(losses_sm: jax.Array) -> jax.Array:
    """``[stages, M] -> [M]``: per micro-batch loss, the stage contributions added in stage order (a fixed order,
    so a sequential reference adding them the same way rounds identically)."""
    total = losses_sm[0]
    for s in range(1, losses_sm.shape[0]):
        total = total + losses_sm[s]
    return total


def make_engine(
    schedule: Schedule,
    fns: Sequence[StageFn],
    kind_of: Sequence[int],
    *,
    mesh: Mesh,
    x_struct: jax.ShapeDtypeStruct,
    stage_axis: str = "stage",
    keep_residuals: bool = True,
) -> Callable[[PyTree, PyTree, PyTree, PyTree, PyTree], EngineResult]:
    """Compile ``schedule`` into ``run(stage_params, stage_consts, shared, shared_consts, inputs) -> EngineResult``.

    Args:
        schedule: a validated-on-entry schedule (1F1B, ZB1P, DualPipe, DualPipeV or hand-written).
        fns: stage functions, one per kind (see the module docstring).
        kind_of: the kind of each of the ``schedule.stages`` stages.
        mesh: a mesh with axis ``stage_axis`` of ``schedule.ranks`` devices; other axes stay automatic.
        x_struct: shape and dtype of the activation passed between stages.
        stage_axis: the pipeline axis name.
        keep_residuals: a B whose W comes later keeps its vjp residuals (the activations the weight gradients
            need) for that W, which then neither recomputes the forward nor reads the stage input (freed at B);
            False: W recomputes the stage forward from the stored input (less memory between B and W).

    ``run``'s stacked pytrees have a leading axis of ``schedule.stages``; ``inputs`` leaves a leading axis of
    ``schedule.microbatches`` (micro-batch m's inputs are ``inputs[m]``), then the rows (``x_struct``'s first
    axis; split over a ``data`` mesh axis of size > 1, whose devices then each run the stages on their rows).

    Raises:
        ScheduleError: the schedule fails `validate`.
        ValueError: the mesh or ``kind_of`` do not fit the schedule.
    """
    if stage_axis not in mesh.shape:
        raise ValueError(f"mesh has no axis {stage_axis!r} (axes: {tuple(mesh.shape)})")
    if mesh.shape[stage_axis] != schedule.ranks:
        raise ValueError(
            f"mesh axis {stage_axis!r} has {mesh.shape[stage_axis]} devices, the schedule {schedule.ranks} ranks"
        )
    kind_of = tuple(int(k) for k in kind_of)
    if len(kind_of) != schedule.stages or not all(0 <= k < len(fns) for k in kind_of):
        raise ValueError(f"kind_of must give each of {schedule.stages} stages a kind in [0, {len(fns)})")
    # Data parallelism inside the pipeline: with a ``data`` axis of size > 1 the micro-batch rows are split over
    # it by hand (manual in the shard_map, gradients are summed at the end). Left to the automatic partitioner,
    # the data-parallel collectives would sit inside the per-rank `lax.switch` branches, which differ between
    # stage ranks: XLA:CPU's collective-permute waits for every device and the program deadlocks (seen). The
    # ``expert`` axis stays automatic: a stage's EP exchange runs among the devices of one (stage, data) group,
    # which all take the same branch. Without an ``expert`` axis the stage functions see no mesh at all.
    batch_axis = "data" if mesh.shape.get("data", 1) > 1 else None
    n_rows = mesh.shape[batch_axis] if batch_axis else 1
    hide_mesh = batch_axis is not None and mesh.shape.get("expert", 1) == 1
    if not x_struct.shape or x_struct.shape[0] % n_rows:
        raise ValueError(f"activation rows {x_struct.shape[:1]} do not split over {n_rows} {batch_axis!r} devices")
    x_struct = jax.ShapeDtypeStruct((x_struct.shape[0] // n_rows, *x_struct.shape[1:]), x_struct.dtype)
    steps = timesteps(schedule)  # validates
    slots = allocate_slots(schedule, steps, keep_residuals=keep_residuals)
    table_np, chans = encode(schedule, steps, slots, kind_of)
    used = sorted({Code.NOOP, *(Code(c) for c in np.unique(table_np[:, :, tb.CODE]))})
    table_np[:, :, tb.CODE] = np.searchsorted(np.asarray(used), table_np[:, :, tb.CODE])  # code -> branch index
    R, S, M = schedule.ranks, schedule.stages, schedule.microbatches
    chunks = [schedule.chunks(r) for r in range(R)]
    C = max(len(c) for c in chunks)
    chunk_stage = np.full((R, C), -1, np.int64)  # model stage of each (rank, local chunk); -1: padding
    for r, cs in enumerate(chunks):
        for c, (_, stage) in enumerate(cs):
            chunk_stage[r, c] = stage
    if S % R:
        raise ValueError(f"{S} stages do not split evenly over {R} ranks (stage parameters are sharded by rank)")
    moves = _placement_moves(chunk_stage, S // R)
    # 1F1B / ZB1P (and any schedule whose ranks run their resting stages in order): no move, no copy.
    in_place = C == S // R and bool((chunk_stage == np.arange(S).reshape(R, C)).all())
    perms = {hop: [(r, r + hop) for r in range(R) if 0 <= r + hop < R] for _, hop in chans}
    has_f = jnp.asarray([c in (Code.F, Code.FB) for c in used])
    kinds = range(len(fns))

    def by_kind(impl, k, *args):
        if len(fns) == 1:
            return impl(0, *args)
        return lax.switch(k, [functools.partial(impl, j) for j in kinds], *args)

    def no_mesh():  # the stage functions' view when rows are split by hand and no expert axis: no collectives
        return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())) if hide_mesh else nullcontext()

    residual_layout: list[ResidualLayout] = []  # the residual buffers' layout (filled when traced)
    # Buffers the steps keep (activation, gradient and residual slots) are split over the mesh axes that stay
    # automatic (``expert``) like the activations they hold; left to XLA, a slot buffer built by masked writes
    # was kept whole on every device.
    manual = {stage_axis, batch_axis} if batch_axis else {stage_axis}
    auto_axes = tuple(a for a in mesh.axis_names if a not in manual and mesh.shape[a] > 1)
    n_auto = math.prod(mesh.shape[a] for a in auto_axes)
    slot_spec = split_spec(x_struct.shape, auto_axes, n_auto)

    def slot_constrain(buf):  # [slots, *x_struct.shape]
        if slot_spec is None or hide_mesh:
            return buf
        return lax.with_sharding_constraint(buf, P(None, *slot_spec))

    def place(a):  # this rank's [S/R, ...] stages at rest -> [C, ...] its chunks' (DualPipe: with mirror copies)
        if in_place:
            return a
        rank = lax.axis_index(stage_axis)
        out = jnp.zeros((C, *a.shape[1:]), a.dtype)
        for c, j, pairs, receives in moves:
            if all(src == dst for src, dst in pairs):
                got = jnp.where(jnp.asarray(receives)[rank], a[j], jnp.zeros_like(a[j]))
            else:
                got = lax.ppermute(a[j], stage_axis, pairs)  # ranks not receiving get zeros
            out = out.at[c].add(got)
        return out

    def unplace(g):  # [C, ...] chunk gradients -> [S/R, ...]: `place` transposed (mirror copies add up)
        if in_place:
            return g
        (out,) = jax.linear_transpose(place, jax.ShapeDtypeStruct((S // R, *g.shape[1:]), g.dtype))(g)
        return out

    def local(sp, sc, shared, shared_c, inputs, table):
        sp, sc = jax.tree.map(place, (sp, sc))  # [C, ...]
        x_zero = jnp.zeros(x_struct.shape, x_struct.dtype)
        inp0 = jax.tree.map(lambda a: a[0], inputs)
        with no_mesh():
            probe = [jax.eval_shape(fns[k], *jax.tree.map(lambda a: a[0], (sp, sc)), shared, shared_c, x_zero, inp0)
                     for k in kinds]  # fmt: skip
        loss_struct, aux_struct = probe[0][1], probe[0][2]
        for k, (_, loss_k, aux_k) in enumerate(probe):
            if jax.tree.structure(aux_k) != jax.tree.structure(aux_struct) or loss_k.shape != ():
                raise ValueError(f"stage kind {k}: loss must be a scalar and aux shaped like kind 0's")
        zeros = functools.partial(jax.tree.map, jnp.zeros_like)
        zero_loss = jnp.zeros((), loss_struct.dtype)
        zero_aux = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_struct)
        zero_p = jax.tree.map(lambda a: jnp.zeros_like(a[0]), sp)
        zero_s = zeros(shared)

        def fwd(k, p, c, x, inp):
            with no_mesh():
                y, loss, aux = fns[k](p, c, shared, shared_c, x, inp)
            return x_zero if y is None else y, loss, aux

        def pullback(k, p, c, x, inp):  # (this stage's loss, its vjp closure over (params, shared, x))
            def f(p, s, x):
                y, loss, aux = fns[k](p, c, s, shared_c, x, inp)
                return (x_zero if y is None else y, loss), aux  # the last stage's y: a constant, dy is dropped

            with no_mesh():
                (_, loss), pull, _ = jax.vjp(f, p, shared, x, has_aux=True)
            return loss, pull

        def vjp(k, p, c, x, inp, dy):
            loss, pull = pullback(k, p, c, x, inp)
            with no_mesh():
                return pull((dy, jnp.ones_like(loss)))  # (dp, ds, dx)

        def bwd_x(k, p, c, x, inp, dy):
            return vjp(k, p, c, x, inp, dy)[2]

        def bwd_w(k, p, c, x, inp, dy):
            return vjp(k, p, c, x, inp, dy)[:2]

        # Residuals (keep_residuals): the leaves of B's vjp closure that depend on the micro-batch (see
        # `dsjax.pipeline.residuals`), laid out per dtype in one row of a buffer shared by all kinds; W rebuilds
        # the closure from a traced template (its forward is dead code XLA removes, except what only the
        # parameters determine) with the stored leaves in place.
        stored: list[list[int]] = []  # per kind: the closure leaves B stores
        layout = None
        if keep_residuals and Code.W in used:
            p0, c0 = jax.tree.map(lambda a: a[0], (sp, sc))
            kinds_stored = []
            for k in kinds:
                args = (p0, c0, x_zero, inp0)
                closed = jax.make_jaxpr(lambda p, c, x, inp, k=k: jax.tree.leaves(pullback(k, p, c, x, inp)[1]))(*args)
                sources = [i in (2, 3) for i, a in enumerate(args) for _ in jax.tree.leaves(a)]
                dependent = data_dependent(closed, sources)
                leaves = closed.out_avals
                stored.append([i for i, d in enumerate(dependent) if d])
                kinds_stored.append([(leaves[i].dtype, leaves[i].shape) for i in stored[-1]])
            layout = ResidualLayout(kinds_stored, auto_axes, n_auto)
        residual_layout.clear()
        if layout is not None:
            residual_layout.append(layout)
        zero_rows = tuple(jnp.zeros(r.shape, r.dtype) for r in layout.rows) if layout else ()

        def bwd_x_keep(k, p, c, x, inp, dy):
            loss, pull = pullback(k, p, c, x, inp)
            leaves, treedef = jax.tree.flatten(pull)
            with no_mesh():
                dx = jax.tree.unflatten(treedef, leaves)((dy, jnp.ones_like(loss)))[2]
            return dx, layout.pack(k, [leaves[i] for i in stored[k]])

        def bwd_w_keep(k, p, c, x, inp, dy, rows):
            loss, pull = pullback(k, p, c, x_zero, inp)  # a template; what it keeps: parameters only
            leaves, treedef = jax.tree.flatten(pull)
            for i, a in zip(stored[k], layout.unpack(k, rows), strict=True):
                leaves[i] = a
            with no_mesh():
                return jax.tree.unflatten(treedef, leaves)((dy, jnp.ones_like(loss)))[:2]

        # Operands: F part (k, p, c, x, inp), B part (k, p, c, x, inp, dy), W part (same, + stored residual rows);
        # results: (activation out, input gradient out, loss, aux, weight gradient, shared gradient, residual rows).
        def noop(f, b, w):
            return x_zero, x_zero, zero_loss, zero_aux, zero_p, zero_s, zero_rows

        def op_f(f, b, w):
            y, loss, aux = by_kind(fwd, *f)
            return y, x_zero, loss, aux, zero_p, zero_s, zero_rows

        def op_b(f, b, w):
            if layout is not None:
                dx, rows = by_kind(bwd_x_keep, *b)
                return x_zero, dx, zero_loss, zero_aux, zero_p, zero_s, rows
            return x_zero, by_kind(bwd_x, *b), zero_loss, zero_aux, zero_p, zero_s, zero_rows

        def op_w(f, b, w):
            if layout is not None:
                return x_zero, x_zero, zero_loss, zero_aux, *by_kind(bwd_w_keep, *w), zero_rows
            return x_zero, x_zero, zero_loss, zero_aux, *by_kind(bwd_w, *w[:-1]), zero_rows

        def op_bw(f, b, w):
            dp, ds, dx = by_kind(vjp, *b)
            return x_zero, dx, zero_loss, zero_aux, dp, ds, zero_rows

        def op_fb(f, b, w):
            y, loss, aux = by_kind(fwd, *f)
            dp, ds, dx = by_kind(vjp, *b)
            return y, dx, loss, aux, dp, ds, zero_rows

        branches = {Code.NOOP: noop, Code.F: op_f, Code.B: op_b, Code.W: op_w, Code.BW: op_bw, Code.FB: op_fb}
        branches = [branches[c] for c in used]  # only the op kinds this schedule has: less to compile

        def put(buf, valid, slot, val):
            return buf.at[slot].set(jnp.where(valid, val, buf[slot]))

        is_b = jnp.asarray([c == Code.B for c in used])

        def step(state, row):
            act, grad, res, gacc, sacc, losses, aux_acc = state

            def pick(c):
                return jax.tree.map(lambda a: a[c], sp), jax.tree.map(lambda a: a[c], sc)

            def mb_inputs(m):
                return jax.tree.map(lambda a: a[m], inputs)

            f = (row[tb.KF], *pick(row[tb.CF]), act[row[tb.AF]], mb_inputs(row[tb.MF]))
            b = (row[tb.KB], *pick(row[tb.CB]), act[row[tb.AB]], mb_inputs(row[tb.MB]), grad[row[tb.GB]])
            w = (row[tb.KW], *pick(row[tb.CW]), act[row[tb.AW]], mb_inputs(row[tb.MW]), grad[row[tb.GW]],
                 tuple(r[row[tb.RW]] for r in res))  # fmt: skip
            y, dx, loss, aux, dp, ds, rows = lax.switch(row[tb.CODE], branches, f, b, w)
            res = tuple(layout.constrain(put(r, is_b[row[tb.CODE]], row[tb.RB], v), 1) for r, v in zip(res, rows))
            cf, mf = row[tb.CF], row[tb.MF]
            losses = losses.at[cf, mf].set(jnp.where(has_f[row[tb.CODE]], loss, losses[cf, mf]))
            aux_acc = jax.tree.map(jnp.add, aux_acc, aux)
            gacc = jax.tree.map(lambda g, d: g.at[row[tb.CW]].add(d), gacc, dp)
            sacc = jax.tree.map(jnp.add, sacc, ds)
            for k, (payload, hop) in enumerate(chans):
                val = y if payload == "act" else dx
                if hop:
                    val = lax.ppermute(val, stage_axis, perms[hop])
                valid, slot = row[tb.FIXED + 2 * k] > 0, row[tb.FIXED + 2 * k + 1]
                if payload == "act":
                    act = slot_constrain(put(act, valid, slot, val))
                else:
                    grad = slot_constrain(put(grad, valid, slot, val))
            return (act, grad, res, gacc, sacc, losses, aux_acc), None

        act = jnp.zeros((slots.act_slots, *x_struct.shape), x_struct.dtype)
        grad = jnp.zeros((slots.grad_slots, *x_struct.shape), x_struct.dtype)
        gacc = zeros(sp)
        losses = jnp.zeros((C, M), loss_struct.dtype)
        res = tuple(jnp.zeros((slots.res_slots, *r.shape), r.dtype) for r in (layout.rows if layout else ()))
        act, grad = (slot_constrain(a) for a in (act, grad))
        res = tuple(layout.constrain(r, 1) for r in res)
        state = (act, grad, res, gacc, zero_s, losses, zero_aux)
        (_, _, _, gacc, sacc, losses, aux_acc), _ = lax.scan(step, state, table[:, 0])
        if batch_axis:  # every stage's sums over its rows
            gacc, losses = lax.psum((gacc, losses), batch_axis)
        sacc, aux_acc = lax.psum((sacc, aux_acc), (stage_axis, batch_axis) if batch_axis else stage_axis)
        return jax.tree.map(unplace, gacc), sacc, losses[None], aux_acc

    spec = P(stage_axis)
    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(spec, spec, P(), P(), P(None, batch_axis), P(None, stage_axis)),
        out_specs=(spec, P(), spec, P()),
        axis_names={stage_axis, batch_axis} if batch_axis else {stage_axis},
        check_vma=False,  # per-rank state is varying by construction; nothing here is differentiated
    )
    gather = chunk_stage.clip(0)
    valid_chunk = chunk_stage >= 0

    def per_stage(g):  # [R, C, ...] per (rank, chunk) -> [S, ...] per model stage; mirror copies add up
        g = g.reshape(R * C, *g.shape[2:])
        g = jnp.where(valid_chunk.reshape(-1, *[1] * (g.ndim - 1)), g, 0)
        return jnp.zeros((S, *g.shape[1:]), g.dtype).at[gather.reshape(-1)].add(g)

    table = jnp.asarray(table_np)

    def run(stage_params, stage_consts, shared, shared_consts, inputs) -> EngineResult:
        for leaf in jax.tree.leaves((stage_params, stage_consts)):
            if leaf.shape[:1] != (S,):
                raise ValueError(f"stacked stage leaf of shape {leaf.shape}: leading dimension must be {S} stages")
        for leaf in jax.tree.leaves(inputs):
            if leaf.shape[:1] != (M,):
                raise ValueError(f"inputs leaf of shape {leaf.shape}: leading dimension must be {M} micro-batches")
        gacc, sacc, losses, aux = sharded(stage_params, stage_consts, shared, shared_consts, inputs, table)
        return EngineResult(per_stage(losses), aux, gacc, sacc)

    run.slots = slots  # buffer sizes, for reports and tests
    run.residual_layout = residual_layout
    run.steps = len(steps)
    return run


def _placement_moves(chunk_stage: np.ndarray, per_rank: int) -> list[tuple[int, int, tuple, tuple[bool, ...]]]:
    """How stage parameters move from where they rest to where the schedule runs them.

    At rest the ``[S, ...]`` stacks are sharded over the stage axis in order: rank r holds stages
    ``r * per_rank .. (r + 1) * per_rank - 1`` (1F1B / ZB1P / DualPipe: stage r; DualPipeV: 2r and 2r+1). The
    schedule runs stage ``chunk_stage[d, c]`` as local chunk c of rank d (DualPipeV: r and 2R-1-r). Returns
    ``(c, j, pairs, receives)``: chunk c of the ranks in ``pairs`` (``(source, destination)`` ranks) comes from
    the source's resting stage j; ``receives[d]`` says whether rank d gets one. For a fixed (c, j) every
    destination needs another stage, hence another source: ``pairs`` is a (partial) permutation, one
    ``ppermute`` (none where every source is its own destination: 1F1B, ZB1P and DualPipe's own chunks).
    """
    ranks, chunks = chunk_stage.shape
    moves = []
    for c in range(chunks):
        for j in range(per_rank):
            pairs = tuple(
                (int(s) // per_rank, d) for d in range(ranks) if (s := chunk_stage[d, c]) >= 0 and s % per_rank == j
            )
            if pairs:
                receives = tuple(any(dst == d for _, dst in pairs) for d in range(ranks))
                moves.append((c, j, pairs, receives))
    return moves


@dataclasses.dataclass(frozen=True)
class PipelineResult:
    """What `run_schedule` returns.

    Attributes:
        loss: sum of the per-micro-batch losses (``jnp.sum(losses)``).
        losses: ``[microbatches]`` loss of each micro-batch.
        grads: gradient of ``loss`` for each stage's parameters, a list laid out like ``stage_params``.
    """

    loss: jax.Array
    losses: jax.Array
    grads: list[PyTree]


def run_schedule(
    schedule: Schedule,
    stage_fn: Callable[[PyTree, jax.Array], jax.Array],
    stage_params: Sequence[PyTree],
    microbatches: jax.Array,
    labels: PyTree,
    loss_fn: Callable[[jax.Array, PyTree], jax.Array],
    *,
    mesh: Mesh,
    stage_axis: str = "stage",
) -> PipelineResult:
    """Run one training step of ``schedule`` over identical stages: losses and parameter gradients.

    Micro-batch m enters stage 0 (on rank ``schedule.rank_of(m, 0)``), passes through stages
    ``0 .. schedule.stages-1`` (``y = stage_fn(stage_params[s], x)``) and its loss is
    ``loss_fn(y_last, labels_m)``. The result equals the plain sequential loop over the micro-batches: the
    losses to float32 round-off of identical operations (bitwise on the tested backend), the gradients to
    summation-order round-off (accumulated in schedule order, DualPipe's mirror copies summed).
    Stages of different shapes (a real model): `make_engine`.

    Args:
        schedule: a schedule from `dsjax.pipeline` or hand-written; it is validated first.
        stage_fn: ``(params, x) -> y`` with ``y`` of ``x``'s shape and dtype; the same function for every stage.
        stage_params: one parameter pytree per stage (``schedule.stages`` of them, same structure and shapes).
        microbatches: ``[schedule.microbatches, *x_shape]`` stage-0 inputs.
        labels: pytree of arrays with leading dimension ``schedule.microbatches`` (replicated to every rank).
        loss_fn: ``(y_last, labels_m) -> scalar``.
        mesh: a mesh with axis ``stage_axis`` of size ``schedule.ranks`` (other axes: everything replicated).
        stage_axis: the pipeline axis name.

    Raises:
        ScheduleError: the schedule fails `validate`.
        ValueError: stage / micro-batch / rank counts or shapes do not match the schedule or mesh.
    """
    fn = make_pipeline_step(schedule, stage_fn, loss_fn, mesh=mesh, stage_axis=stage_axis)
    return fn(stage_params, microbatches, labels)


def make_pipeline_step(
    schedule: Schedule,
    stage_fn: Callable[[PyTree, jax.Array], jax.Array],
    loss_fn: Callable[[jax.Array, PyTree], jax.Array],
    *,
    mesh: Mesh,
    stage_axis: str = "stage",
) -> Callable[[Sequence[PyTree], jax.Array, PyTree], PipelineResult]:
    """`run_schedule` as a reusable function ``(stage_params, microbatches, labels) -> PipelineResult``."""
    S, M = schedule.stages, schedule.microbatches
    # Kinds: 0 reads the micro-batch, 1 a received activation, 2 (the last stage) adds the loss; one stage: both.

    def first(p, c, s, sc, x, inp):
        return stage_fn(p, inp["x"]), jnp.zeros((), jnp.float32), ()

    def middle(p, c, s, sc, x, inp):
        return stage_fn(p, x), jnp.zeros((), jnp.float32), ()

    def tail(p, c, s, sc, x, inp):
        return None, loss_fn(stage_fn(p, x), inp["label"]), ()

    def only(p, c, s, sc, x, inp):
        return None, loss_fn(stage_fn(p, inp["x"]), inp["label"]), ()

    fns, kind_of = ([first, middle, tail], [0] + [1] * (S - 2) + [2]) if S > 1 else ([only], [0])
    engines: dict = {}
    if stage_axis not in mesh.shape or mesh.shape[stage_axis] != schedule.ranks:  # fail early, like the engine
        make_engine(schedule, [first], [0] * S, mesh=mesh, x_struct=jax.ShapeDtypeStruct((), jnp.float32))

    def run(stage_params: Sequence[PyTree], microbatches: jax.Array, labels: PyTree) -> PipelineResult:
        stage_params = list(stage_params)
        if len(stage_params) != S:
            raise ValueError(f"{len(stage_params)} stage parameter sets for a schedule of {S} stages")
        struct = jax.tree.structure(stage_params[0])
        shapes = [(a.shape, a.dtype) for a in jax.tree.leaves(stage_params[0])]
        for s, p in enumerate(stage_params):
            if jax.tree.structure(p) != struct or [(a.shape, a.dtype) for a in jax.tree.leaves(p)] != shapes:
                raise ValueError(f"stage {s} parameters differ in structure or shapes from stage 0's")
        if microbatches.shape[:1] != (M,):
            raise ValueError(f"microbatches has leading shape {microbatches.shape[:1]}, schedule has {M} micro-batches")
        x_struct = jax.ShapeDtypeStruct(microbatches.shape[1:], microbatches.dtype)
        out = jax.eval_shape(stage_fn, stage_params[0], x_struct)
        if (out.shape, out.dtype) != (x_struct.shape, x_struct.dtype):
            raise ValueError(f"stage_fn maps {x_struct.shape} {x_struct.dtype} to {out.shape} {out.dtype}")
        key = (x_struct.shape, str(x_struct.dtype))
        if key not in engines:
            engines[key] = jax.jit(
                make_engine(schedule, fns, kind_of, mesh=mesh, x_struct=x_struct, stage_axis=stage_axis)
            )
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *stage_params)
        res = engines[key](stacked, (), (), (), {"x": microbatches, "label": labels})
        losses = sum_stages(res.losses)
        grads = [jax.tree.map(lambda g, s=s: g[s], res.stage_grads) for s in range(S)]
        return PipelineResult(jnp.sum(losses), losses, grads)

    return run
