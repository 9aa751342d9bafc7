"""Compile a `Schedule` into the executor's static program: global time steps, buffer slots and an int table.

- `timesteps`: an as-soon-as-possible replay with unit op times, in which an op runs at step t once its rank has
  run all its earlier ops and every cross-rank dependency ran at a step < t (its result crosses ranks between
  the steps). At each step every rank runs one op or nothing.
- `allocate_slots`: each rank keeps stage inputs (activations received from the previous stage) and output
  gradients (received from the next stage) in fixed-size buffers. An entry lives from the end of the step it
  arrives in to the last step that reads it; a greedy colouring of these intervals in arrival order (optimal
  for interval graphs) gives each entry a slot and sizes the buffers at the schedule's real peak instead of
  ``chunks * microbatches``.
- `encode`: the ``[T, ranks, fields]`` int32 table the executor scans over.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

from dsjax.pipeline.schedules import Kind, Part, Schedule, op_dependencies, validate


class Code(enum.IntEnum):
    """Executor op codes (one `lax.switch` branch each)."""

    NOOP = 0
    F = 1
    B = 2
    W = 3
    BW = 4
    FB = 5


# Fixed fields per (step, rank), for the F, B and W parts of the op: local chunk, micro-batch, stage kind,
# activation slot (and for B / W: output-gradient slot, residual slot). Receive fields follow, 2 per channel
# (valid, slot).
CODE = 0
CF, MF, KF, AF = 1, 2, 3, 4
CB, MB, KB, AB, GB, RB = 5, 6, 7, 8, 9, 10
CW, MW, KW, AW, GW, RW = 11, 12, 13, 14, 15, 16
FIXED = 17


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


def _part_steps(schedule: Schedule, steps: list[list[int | None]]) -> dict[tuple[Part, int, int], int]:
    at = {}
    for t, row in enumerate(steps):
        for r, i in enumerate(row):
            if i is not None:
                at.update((part, t) for part in schedule.ops[r][i].parts())
    return at


@dataclasses.dataclass(frozen=True)
class Slots:
    """Buffer slots per rank.

    Attributes:
        act: ``(microbatch, stage) -> slot`` of the stage's input activation (stages > 0) in its rank's buffer.
        grad: ``(microbatch, stage) -> slot`` of the stage's output gradient (stages < last).
        res: ``(microbatch, stage) -> slot`` of the vjp residuals a separate B keeps for its W (``keep_residuals``).
        act_slots: activation buffer size (the largest over ranks).
        grad_slots: output-gradient buffer size.
        res_slots: residual buffer size.
        act_peak: per rank, the most activation entries alive at once (``act_slots`` is their maximum).
    """

    act: dict[tuple[int, int], int]
    grad: dict[tuple[int, int], int]
    res: dict[tuple[int, int], int]
    act_slots: int
    grad_slots: int
    res_slots: int
    act_peak: tuple[int, ...]


def _colour(intervals: list[tuple[int, int, tuple[int, int]]]) -> tuple[dict[tuple[int, int], int], int]:
    """Greedy interval colouring: an entry written at the end of step ``w`` and last read at step ``u`` may take a
    slot whose previous entry was last read at a step <= w (reads happen before the step's writes)."""
    free_at: list[int] = []  # per slot: the last step that reads its current entry
    out = {}
    for w, u, key in sorted(intervals):
        slot = next((i for i, f in enumerate(free_at) if f <= w), None)
        if slot is None:
            slot = len(free_at)
            free_at.append(u)
        free_at[slot] = u
        out[key] = slot
    return out, len(free_at)


def allocate_slots(schedule: Schedule, steps: list[list[int | None]], *, keep_residuals: bool = False) -> Slots:
    """Assign buffer slots to every stage input, output gradient and (``keep_residuals``: a separate B keeps its
    vjp residuals for W, so W reads neither the stage input nor recomputes the forward) residual set."""
    at = _part_steps(schedule, steps)
    last = schedule.stages - 1
    acts: list[list] = [[] for _ in range(schedule.ranks)]
    grads: list[list] = [[] for _ in range(schedule.ranks)]
    res: list[list] = [[] for _ in range(schedule.ranks)]
    for mb in range(schedule.microbatches):
        for s in range(schedule.stages):
            r = schedule.rank_of(mb, s)
            t_b, t_w = at[(Part.B, mb, s)], at[(Part.W, mb, s)]
            split = t_w != t_b  # a B op with its W later (BW and FB run both at once)
            uses = max(at[(Part.F, mb, s)], t_b) if keep_residuals else max(at[(Part.F, mb, s)], t_b, t_w)
            if s > 0:
                acts[r].append((at[(Part.F, mb, s - 1)], uses, (mb, s)))
            if s < last:
                grads[r].append((at[(Part.B, mb, s + 1)], max(t_b, t_w), (mb, s)))
            if keep_residuals and split:
                res[r].append((t_b, t_w, (mb, s)))
    out: list[dict] = [{}, {}, {}]
    sizes = [1, 1, 1]  # buffers of size 0 would need special cases; one unused slot costs nothing
    act_peak = []
    for r in range(schedule.ranks):
        for i, entries in enumerate((acts[r], grads[r], res[r])):
            assigned, n = _colour(entries)
            out[i].update(assigned)
            sizes[i] = max(sizes[i], n)
            if i == 0:
                act_peak.append(n)
    return Slots(*out, *sizes, tuple(act_peak))


def encode(
    schedule: Schedule, steps: list[list[int | None]], slots: Slots, kind_of: tuple[int, ...]
) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """The int32 table ``[T, ranks, fields]`` of ``steps`` and the (payload, hop) channels it uses.

    An F part sends its output to the next stage's rank ("act"), a B part its input gradient to the previous
    stage's rank ("grad"); hop = destination - source rank (0: DualPipeV's turn of the V on the last rank).
    ``kind_of[stage]`` is the stage's kind (which stage function runs).
    """
    last = schedule.stages - 1
    sends = []  # [t] -> list of (payload, hop, dst, slot)
    channels: set[tuple[str, int]] = set()
    for row in steps:
        out = []
        for r, i in enumerate(row):
            for part, mb, stage in () if i is None else schedule.ops[r][i].parts():
                if part is Part.F and stage < last:
                    dst, payload, slot = schedule.rank_of(mb, stage + 1), "act", slots.act[(mb, stage + 1)]
                elif part is Part.B and stage > 0:
                    dst, payload, slot = schedule.rank_of(mb, stage - 1), "grad", slots.grad[(mb, stage - 1)]
                else:
                    continue
                out.append((payload, dst - r, dst, slot))
                channels.add((payload, dst - r))
        sends.append(out)
    chans = sorted(channels)
    table = np.zeros((len(steps), schedule.ranks, FIXED + 2 * len(chans)), np.int32)

    def fill(f, fields, mb, stage, grad_slot=True):
        f[fields[0]] = schedule.chunk_id(mb, stage)
        f[fields[1]] = mb
        f[fields[2]] = kind_of[stage]
        f[fields[3]] = slots.act.get((mb, stage), 0)  # stage 0 reads its input from the micro-batch inputs
        if grad_slot:
            f[fields[4]] = slots.grad.get((mb, stage), 0)  # the last stage's output gradient is unused
            f[fields[5]] = slots.res.get((mb, stage), 0)  # only a separate B / W pair has residuals

    for t, row in enumerate(steps):
        for r, i in enumerate(row):
            if i is None:
                continue
            op = schedule.ops[r][i]
            f = table[t, r]
            f[CODE] = {Kind.F: Code.F, Kind.B: Code.B, Kind.W: Code.W, Kind.BW: Code.BW, Kind.FB: Code.FB}[op.kind]
            if op.kind in (Kind.F, Kind.FB):
                fill(f, (CF, MF, KF, AF), op.microbatch, op.stage, grad_slot=False)
            if op.kind is Kind.FB:
                fill(f, (CB, MB, KB, AB, GB, RB), op.b_microbatch, op.b_stage)
                fill(f, (CW, MW, KW, AW, GW, RW), op.b_microbatch, op.b_stage)
            elif op.kind in (Kind.B, Kind.BW):
                fill(f, (CB, MB, KB, AB, GB, RB), op.microbatch, op.stage)
                fill(f, (CW, MW, KW, AW, GW, RW), op.microbatch, op.stage)
            elif op.kind is Kind.W:
                fill(f, (CW, MW, KW, AW, GW, RW), op.microbatch, op.stage)
        for payload, hop, dst, slot in sends[t]:
            k = FIXED + 2 * chans.index((payload, hop))
            if table[t, dst, k]:  # a rank sends at most one payload of each kind per step
                raise AssertionError(f"step {t}: two {payload} messages for rank {dst} on hop {hop}")
            table[t, dst, k : k + 2] = (1, slot)
    return table, chans
