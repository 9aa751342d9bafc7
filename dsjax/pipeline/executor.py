"""Execute a pipeline `Schedule` for real: one jitted SPMD program over a ``stage`` mesh axis.

Design (see `run_schedule`):

- **Time steps.** The per-rank op lists are turned into a global sequence of time steps (`timesteps`): an
  as-soon-as-possible replay with unit op times, in which an op runs at step t once its rank has run all its
  earlier ops and every cross-rank dependency ran at a step < t. At each step every rank runs one op or
  nothing. Since `validate` has proved the schedule deadlock-free, the replay always finishes.
- **One program.** The steps are encoded as an int table ``[T, ranks, fields]`` (op code, the (local chunk,
  micro-batch) slots the op reads and writes, and where to store what arrives). Inside `jax.shard_map` over
  the ``stage`` axis each rank scans over its column of the table; a step is a `lax.switch` on the op code
  (no-op, F, F of the last stage, B, W, BW, FB, FB with a last-stage forward), then one `lax.ppermute` per
  (payload, hop) pair the schedule ever uses (activations to the next stage's rank, activation gradients to
  the previous stage's rank; hops of +1 / -1 for the generated schedules, 0 = local for DualPipeV's turn),
  then masked writes of what arrived into fixed-size buffers indexed by (local chunk, micro-batch). The
  whole step is compiled once: program size does not grow with the number of micro-batches or steps.
- **B/W split.** F stores only the stage *input* (the activation buffer). B (input gradient) runs `jax.vjp`
  of the stage with respect to its input on the stored input and the received output gradient; the output
  gradient stays in its buffer, so W has what it needs: W runs `jax.vjp` with respect to the parameters on
  the same (input, output gradient) pair, whenever the schedule places it. BW and FB run one `jax.vjp` with
  respect to both. The last stage's F also evaluates the loss and its gradient with respect to the stage
  output (the reference's loss lives in the last stage), storing it as that stage's output gradient.
- **FB** is one `lax.switch` branch holding a forward of one micro-batch and a full backward of another: one
  traced computation with no data dependency between its halves, so XLA may interleave them (on GPU, overlap
  one's communication with the other's compute; DualPipe's F&B).
- **Parameters.** Stage parameters are stacked per rank as ``[ranks, chunks, ...]`` and sharded on the
  ``stage`` axis: rank r holds the parameter sets of its `Schedule.chunks` (DualPipe: stages r and PP-1-r,
  the same weights as its mirror rank; DualPipeV: stages r and 2R-1-r). Weight gradients accumulate per rank
  and chunk; on return they are summed per model stage (DualPipe's mirror copies add up).

Why this form and not per-rank Python driving separate programs: JAX is single-controller; a per-rank op
stream with point-to-point sends is expressed natively as one SPMD program where every device runs the
same step and differs by data (its table column), and `ppermute` is the collective form of send/receive.

Overheads (correctness first): (1) every step runs one `ppermute` per used (payload, hop) channel on every
rank, also when the rank has nothing to send (zeros are sent); (2) buffers hold every micro-batch of every
local chunk (``chunks * microbatches`` stage inputs and as many output gradients per rank), not the
schedule's peak of PP+1 live activations; a static slot allocator over the live ranges would fix it;
(3) B and W recompute the stage forward from its stored input (activation checkpointing at stage
granularity), and W recomputes the part of the backward chain its weight gradient needs: stage functions
that keep intermediate activations / cotangents (the reference's ``LinearFunc``) would need a split-backward
hook; (4) a step with no W part still adds a zero gradient to the accumulator; (5) the unit-time replay puts
ops of different costs in the same step, so the step time is the slowest rank's op; the real schedule's
timing is the simulator's concern; (6) the micro-batch inputs are scattered from the caller's array to their
first-stage ranks and labels are replicated to every rank.

Requirements: all stages have the same parameter structure and shapes, and map an activation to one of the
same shape and dtype (the toy stages of the DualPipe check; the real model's embedding / head stages are
remaining work).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsjax.pipeline.schedules import Kind, Part, Schedule, op_dependencies, validate

PyTree = Any


class _Code(enum.IntEnum):
    NOOP = 0
    F = 1
    F_LAST = 2
    B = 3
    W = 4
    BW = 5
    FB = 6
    FB_LAST = 7


# Fixed table fields per (step, rank); receive fields follow, 3 per channel (valid, chunk, micro-batch).
_CODE, _CF, _MF, _CB, _MB, _CW, _MW = range(7)
_FIXED = 7


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


def timesteps(schedule: Schedule) -> list[list[int | None]]:
    """Global time steps of ``schedule``: ``steps[t][rank]`` is the index of the op the rank runs at step t.

    As-soon-as-possible with unit op times: an op runs once its rank's previous op ran and each dependency on
    another rank ran at an earlier step (its result then crosses ranks between the steps). Validates first.

    Raises:
        ScheduleError: the schedule is invalid (`validate`).
    """
    validate(schedule)
    pos = [0] * schedule.ranks
    done: dict[tuple[Part, int, int], int] = {}
    steps: list[list[int | None]] = []
    while any(pos[r] < len(schedule.ops[r]) for r in range(schedule.ranks)):
        t = len(steps)
        row: list[int | None] = [None] * schedule.ranks
        for r, ops in enumerate(schedule.ops):
            if pos[r] < len(ops) and all(done.get(d, t) < t for d in op_dependencies(schedule, ops[pos[r]])):
                row[r] = pos[r]
        if all(i is None for i in row):  # unreachable after validate(); guards against an infinite loop
            raise AssertionError("executor replay made no progress")
        for r, i in enumerate(row):
            if i is not None:
                done.update((part, t) for part in schedule.ops[r][i].parts())
                pos[r] += 1
        steps.append(row)
    return steps


def _tables(schedule: Schedule, steps: list[list[int | None]]) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """Encode ``steps`` as an int32 table ``[T, ranks, fields]``; also the (payload, hop) channels used."""
    last = schedule.stages - 1
    # Which channels exist: an F part sends its output to the next stage's rank, a B part its input gradient
    # to the previous stage's rank; hop = destination - source rank (0: same rank).
    sends: list[list[list[tuple[str, int, int, int, int]]]] = []  # [t][src] -> (payload, hop, dst, chunk, mb)
    channels: set[tuple[str, int]] = set()
    for row in steps:
        srow = []
        for r, i in enumerate(row):
            out = []
            for part, mb, stage in () if i is None else schedule.ops[r][i].parts():
                if part is Part.F and stage < last:
                    dst, dst_stage, payload = schedule.rank_of(mb, stage + 1), stage + 1, "act"
                elif part is Part.B and stage > 0:
                    dst, dst_stage, payload = schedule.rank_of(mb, stage - 1), stage - 1, "grad"
                else:
                    continue
                out.append((payload, dst - r, dst, schedule.chunk_id(mb, dst_stage), mb))
                channels.add((payload, dst - r))
            srow.append(out)
        sends.append(srow)
    chans = sorted(channels)
    table = np.zeros((len(steps), schedule.ranks, _FIXED + 3 * len(chans)), np.int32)
    for t, row in enumerate(steps):
        for r, i in enumerate(row):
            if i is None:
                continue
            op = schedule.ops[r][i]
            f = table[t, r]
            if op.kind in (Kind.F, Kind.FB):
                f[_CF], f[_MF] = schedule.chunk_id(op.microbatch, op.stage), op.microbatch
                is_last = op.stage == last
            if op.kind is Kind.F:
                f[_CODE] = _Code.F_LAST if is_last else _Code.F
            elif op.kind is Kind.FB:
                f[_CODE] = _Code.FB_LAST if is_last else _Code.FB
                mb, stage = op.b_microbatch, op.b_stage
                f[_CB] = f[_CW] = schedule.chunk_id(mb, stage)
                f[_MB] = f[_MW] = mb
            elif op.kind is Kind.B:
                f[_CODE], f[_CB], f[_MB] = _Code.B, schedule.chunk_id(op.microbatch, op.stage), op.microbatch
            elif op.kind is Kind.W:
                f[_CODE], f[_CW], f[_MW] = _Code.W, schedule.chunk_id(op.microbatch, op.stage), op.microbatch
            else:  # BW
                f[_CODE] = _Code.BW
                f[_CB] = f[_CW] = schedule.chunk_id(op.microbatch, op.stage)
                f[_MB] = f[_MW] = op.microbatch
        for out in sends[t]:
            for payload, hop, dst, chunk, mb in out:
                k = _FIXED + 3 * chans.index((payload, hop))
                if table[t, dst, k]:  # a rank sends at most one payload of each kind per step
                    raise AssertionError(f"step {t}: two {payload} messages for rank {dst} on hop {hop}")
                table[t, dst, k : k + 3] = (1, chunk, mb)
    return table, chans


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
    """Run one training step of ``schedule`` on ``mesh``: losses and parameter gradients.

    Micro-batch m enters stage 0 (on rank ``schedule.rank_of(m, 0)``), passes through stages
    ``0 .. schedule.stages-1`` (``y = stage_fn(stage_params[s], x)``) and its loss is
    ``loss_fn(y_last, labels_m)``. The result equals the plain sequential loop over the micro-batches: the
    losses to float32 round-off of identical operations (bitwise on the tested backend), the gradients to
    summation-order round-off (accumulated in schedule order, DualPipe's mirror copies summed).

    Args:
        schedule: a schedule from `dsjax.pipeline` (1F1B, ZB1P, DualPipe, DualPipeV) or hand-written; it is
            validated first.
        stage_fn: ``(params, x) -> y`` with ``y`` of ``x``'s shape and dtype; the same function for every stage.
        stage_params: one parameter pytree per stage (``schedule.stages`` of them, same structure and shapes).
        microbatches: ``[schedule.microbatches, *x_shape]`` stage-0 inputs.
        labels: pytree of arrays with leading dimension ``schedule.microbatches`` (replicated to every rank).
        loss_fn: ``(y_last, labels_m) -> scalar``.
        mesh: a mesh with axis ``stage_axis`` of size ``schedule.ranks`` (other axes: everything replicated).
        stage_axis: the pipeline axis name.

    Returns:
        `PipelineResult`: summed loss, per-micro-batch losses, per-stage gradients laid out like ``stage_params``.

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
    """`run_schedule` as a reusable function ``(stage_params, microbatches, labels) -> PipelineResult``.

    The schedule is validated and encoded once; the jitted program is cached per input shapes.
    """
    if stage_axis not in mesh.shape:
        raise ValueError(f"mesh has no axis {stage_axis!r} (axes: {tuple(mesh.shape)})")
    if mesh.shape[stage_axis] != schedule.ranks:
        raise ValueError(
            f"mesh axis {stage_axis!r} has {mesh.shape[stage_axis]} devices, the schedule {schedule.ranks} ranks"
        )
    table_np, chans = _tables(schedule, timesteps(schedule))  # validates
    used = sorted({_Code.NOOP, *(_Code(c) for c in np.unique(table_np[:, :, _CODE]))})
    table_np[:, :, _CODE] = np.searchsorted(np.asarray(used), table_np[:, :, _CODE])  # code -> branch index
    R, S, M = schedule.ranks, schedule.stages, schedule.microbatches
    chunks = [schedule.chunks(r) for r in range(R)]
    C = max(len(c) for c in chunks)
    # Model stage of each (rank, local chunk); -1 for padding (a rank with fewer chunks than another).
    chunk_stage = np.full((R, C), -1, np.int64)
    for r, cs in enumerate(chunks):
        for c, (_, stage) in enumerate(cs):
            chunk_stage[r, c] = stage
    first = np.array([(schedule.rank_of(m, 0), schedule.chunk_id(m, 0)) for m in range(M)], np.int64)
    perms = {hop: [(r, r + hop) for r in range(R) if 0 <= r + hop < R] for _, hop in chans}

    def local(stage_params_local, act, labels_, table):
        params = jax.tree.map(lambda a: a[0], stage_params_local)  # [C, ...]
        act = act[0]  # [C, M, *x]
        grad = jnp.zeros_like(act)
        gacc = jax.tree.map(jnp.zeros_like, params)
        x_like = act[0, 0]
        loss_dtype = jax.eval_shape(loss_fn, x_like, jax.tree.map(lambda a: a[0], labels_)).dtype
        losses = jnp.zeros((M,), loss_dtype)
        zero_x = jnp.zeros_like(x_like)
        zero_loss = jnp.zeros((), loss_dtype)
        zero_p = jax.tree.map(lambda a: jnp.zeros_like(a[0]), params)

        def fwd(p, x):
            return stage_fn(p, x)

        def fwd_last(p, x, lab):
            y = stage_fn(p, x)
            return jax.value_and_grad(lambda y: loss_fn(y, lab))(y)  # (loss, output gradient)

        def bwd_input(p, x, dy):
            return jax.vjp(lambda x: stage_fn(p, x), x)[1](dy)[0]

        def bwd_weight(p, x, dy):
            return jax.vjp(lambda p: stage_fn(p, x), p)[1](dy)[0]

        def bwd_full(p, x, dy):
            dp, dx = jax.vjp(stage_fn, p, x)[1](dy)
            return dx, dp

        # Branch operands: (p_f, x_f, lab, p_b, x_b, dy_b, p_w, x_w, dy_w);
        # results: (activation out, input gradient out, last-stage output gradient, loss, weight gradient).
        def noop(*_):
            return zero_x, zero_x, zero_x, zero_loss, zero_p

        def op_f(pf, xf, lab, *_):
            return fwd(pf, xf), zero_x, zero_x, zero_loss, zero_p

        def op_f_last(pf, xf, lab, *_):
            loss, dy = fwd_last(pf, xf, lab)
            return zero_x, zero_x, dy, loss, zero_p

        def op_b(pf, xf, lab, pb, xb, dyb, *_):
            return zero_x, bwd_input(pb, xb, dyb), zero_x, zero_loss, zero_p

        def op_w(pf, xf, lab, pb, xb, dyb, pw, xw, dyw):
            return zero_x, zero_x, zero_x, zero_loss, bwd_weight(pw, xw, dyw)

        def op_bw(pf, xf, lab, pb, xb, dyb, *_):
            dx, dp = bwd_full(pb, xb, dyb)
            return zero_x, dx, zero_x, zero_loss, dp

        def op_fb(pf, xf, lab, pb, xb, dyb, *_):
            y = fwd(pf, xf)
            dx, dp = bwd_full(pb, xb, dyb)
            return y, dx, zero_x, zero_loss, dp

        def op_fb_last(pf, xf, lab, pb, xb, dyb, *_):
            loss, dy = fwd_last(pf, xf, lab)
            dx, dp = bwd_full(pb, xb, dyb)
            return zero_x, dx, dy, loss, dp

        all_branches = [noop, op_f, op_f_last, op_b, op_w, op_bw, op_fb, op_fb_last]
        assert [b.__name__ for b in all_branches] == ["noop"] + ["op_" + c.name.lower() for c in list(_Code)[1:]]
        branches = [all_branches[c] for c in used]  # only the op kinds this schedule has: less to compile
        last_code = jnp.asarray([c in (_Code.F_LAST, _Code.FB_LAST) for c in used])

        def put(buf, valid, c, m, val):
            return buf.at[c, m].set(jnp.where(valid, val, buf[c, m]))

        def step(state, row):
            act, grad, gacc, losses = state
            code, cf, mf, cb, mb, cw, mw = (row[i] for i in range(_FIXED))

            def pick(c):
                return jax.tree.map(lambda a: a[c], params)

            lab = jax.tree.map(lambda a: a[mf], labels_)
            out_act, out_grad, dy_new, loss, dp = lax.switch(
                code,
                branches,
                pick(cf),
                act[cf, mf],
                lab,
                pick(cb),
                act[cb, mb],
                grad[cb, mb],
                pick(cw),
                act[cw, mw],
                grad[cw, mw],
            )
            is_last = last_code[code]
            grad = put(grad, is_last, cf, mf, dy_new)
            losses = losses.at[mf].set(jnp.where(is_last, loss, losses[mf]))
            gacc = jax.tree.map(lambda g, d: g.at[cw].add(d), gacc, dp)
            for k, (payload, hop) in enumerate(chans):
                val = out_act if payload == "act" else out_grad
                if hop:
                    val = lax.ppermute(val, stage_axis, perms[hop])
                valid, c, m = (row[_FIXED + 3 * k + i] for i in range(3))
                if payload == "act":
                    act = put(act, valid > 0, c, m, val)
                else:
                    grad = put(grad, valid > 0, c, m, val)
            return (act, grad, gacc, losses), None

        (_, _, gacc, losses), _ = lax.scan(step, (act, grad, gacc, losses), table[:, 0])
        return jax.tree.map(lambda g: g[None], gacc), losses[None]

    spec = P(stage_axis)
    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(spec, spec, P(), P(None, stage_axis)),
        out_specs=(spec, spec),
        check_vma=False,  # the per-rank state is varying by construction; nothing here is differentiated
    )
    gather = chunk_stage.clip(0)
    valid_chunk = chunk_stage >= 0

    @jax.jit
    def program(stacked, microbatches, labels, table):
        rank_params = jax.tree.map(lambda a: a[gather], stacked)  # [R, C, ...]
        rank_params = jax.lax.with_sharding_constraint(rank_params, NamedSharding(mesh, spec))
        act = jnp.zeros((R, C, *microbatches.shape), microbatches.dtype)
        act = act.at[first[:, 0], first[:, 1], np.arange(M)].set(microbatches)
        gacc, losses = sharded(rank_params, act, labels, table)
        losses = losses.sum(0)  # one rank holds each micro-batch's loss, the others zeros: exact

        def per_stage(g):  # [R, C, ...] per (rank, chunk) -> [S, ...] per model stage; mirror copies add up
            g = g.reshape(R * C, *g.shape[2:])
            g = jnp.where(valid_chunk.reshape(-1, *[1] * (g.ndim - 1)), g, 0)
            return jnp.zeros((S, *g.shape[1:]), g.dtype).at[gather.reshape(-1)].add(g)

        grads = jax.tree.map(per_stage, gacc)
        return jnp.sum(losses), losses, grads

    table = jnp.asarray(table_np)

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
        for leaf in jax.tree.leaves(labels):
            if leaf.shape[:1] != (M,):
                raise ValueError(f"labels leaf of shape {leaf.shape}: leading dimension must be {M}")
        x_struct = jax.ShapeDtypeStruct(microbatches.shape[1:], microbatches.dtype)
        out = jax.eval_shape(stage_fn, stage_params[0], x_struct)
        if (out.shape, out.dtype) != (microbatches.shape[1:], microbatches.dtype):
            raise ValueError(f"stage_fn maps {microbatches.shape[1:]} {microbatches.dtype} to {out.shape} {out.dtype}")
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *stage_params)
        loss, losses, grads = program(stacked, microbatches, labels, table)
        return PipelineResult(loss, losses, [jax.tree.map(lambda g, s=s: g[s], grads) for s in range(S)])

    return run
