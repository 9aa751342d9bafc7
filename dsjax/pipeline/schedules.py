"""Pipeline-parallel schedules as data: 1F1B, ZB1P (ZB-H1), DualPipe and DualPipeV.

A schedule is, for each rank, the list of compute ops it runs in order. An op names a micro-batch and a *stage*:
the position of a model chunk along that micro-batch's path (0 = the chunk holding the embedding). Which rank
runs a stage is a separate placement table, indexed by the micro-batch's *direction* (DualPipe feeds half of the
micro-batches from the last rank, so their stage 0 sits on rank PP-1). Sends and receives are not ops: every
dependency between ops on different ranks is a point-to-point transfer, sent as soon as the producing op ends
(the simulator charges an optional per-hop cost for it). The DualPipe reference batches its communication
(``batch_isend_irecv`` and a wait before each compute), which posts a few sends one compute later and makes a
few ops wait for a receive meant for the next op; those only add waits, so with the same op order and costs
the timelines here are a lower bound of the reference's; they reproduce Table 2 exactly under its cost
assumptions (`simulator.table2`).

Op kinds mirror the compute primitives of deepseek-ai/DualPipe (arXiv 2412.19437 §3.2.1, Table 2):

- ``F``: forward of one stage for one micro-batch.
- ``B``: backward for the input only (activation gradient); the weight gradient is deferred to a later ``W``
  (zero-bubble split, `WeightGradStore` enabled in the reference).
- ``W``: the deferred weight gradient of an earlier ``B`` of the same micro-batch and stage.
- ``BW``: a full backward (input and weight gradients together; the reference's backward with zero-bubble off).
- ``FB``: the forward of one micro-batch overlapped with the *full* backward of another (the reference's
  ``_forward_backward_chunk``; its backward runs with `WeightGradStore` off, so it includes the weight gradient).

Every op decomposes into parts ``F``, ``B`` (input grad) and ``W`` (weight grad) of (micro-batch, stage) pairs;
each pair needs each part exactly once (`validate`).
"""

from __future__ import annotations

import collections
import dataclasses
import enum


class Kind(enum.StrEnum):
    """What an op computes (see the module docstring)."""

    F = "F"
    B = "B"
    W = "W"
    BW = "BW"
    FB = "FB"


class Part(enum.StrEnum):
    """The three per-(micro-batch, stage) computations every op is made of."""

    F = "F"
    B = "B"  # input gradient
    W = "W"  # weight gradient


@dataclasses.dataclass(frozen=True)
class Op:
    """One compute op of one rank.

    Attributes:
        kind: what the op computes.
        microbatch: micro-batch id (for ``FB``: the forward's micro-batch).
        stage: stage along the micro-batch's path (for ``FB``: the forward's stage).
        b_microbatch: ``FB`` only: the micro-batch whose full backward is overlapped with the forward.
        b_stage: ``FB`` only: the stage of that backward.
    """

    kind: Kind
    microbatch: int
    stage: int
    b_microbatch: int | None = None
    b_stage: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Kind(self.kind))  # accept "F" as well as Kind.F
        if (self.kind is Kind.FB) != (self.b_microbatch is not None and self.b_stage is not None):
            raise ValueError(f"{self.kind} op: b_microbatch/b_stage are required for FB and only for FB")
        m, s = self.microbatch, self.stage
        if self.kind is Kind.FB:
            bm, bs = self.b_microbatch, self.b_stage
            parts = ((Part.F, m, s), (Part.B, bm, bs), (Part.W, bm, bs))
        elif self.kind is Kind.BW:
            parts = ((Part.B, m, s), (Part.W, m, s))
        else:
            parts = ((Part(self.kind.value), m, s),)
        # Not a field (no effect on ==, hash or repr); computed once because the replays ask for it per op.
        object.__setattr__(self, "_parts", parts)

    def parts(self) -> tuple[tuple[Part, int, int], ...]:
        """The (part, micro-batch, stage) computations of this op, in execution order."""
        return self._parts

    def __str__(self) -> str:
        if self.kind is Kind.FB:
            return f"FB(F mb{self.microbatch} s{self.stage} & B mb{self.b_microbatch} s{self.b_stage})"
        return f"{self.kind}(mb{self.microbatch} s{self.stage})"


def fb(f_mb: int, f_stage: int, b_mb: int, b_stage: int) -> Op:
    """An ``FB`` op: forward of (f_mb, f_stage) overlapped with the full backward of (b_mb, b_stage)."""
    return Op(Kind.FB, f_mb, f_stage, b_mb, b_stage)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A pipeline schedule: per-rank op lists plus the layout they run on.

    Attributes:
        kind: generator name (``"1f1b"``, ``"zb1p"``, ``"dualpipe"``, ``"dualpipev"``).
        ranks: pipeline devices.
        stages: model stages a micro-batch passes through (*PP* of Table 2: ``ranks`` except for DualPipeV,
            where it is ``2 * ranks``).
        microbatches: micro-batches per step (all directions together).
        directions: direction of each micro-batch (0, or 1 for DualPipe's half fed from the last rank).
        placement: ``placement[direction][stage]`` is the rank that runs that stage for that direction.
        ops: ``ops[rank]`` is the rank's op list, run in order.
    """

    kind: str
    ranks: int
    stages: int
    microbatches: int
    directions: tuple[int, ...]
    placement: tuple[tuple[int, ...], ...]
    ops: tuple[tuple[Op, ...], ...]

    def rank_of(self, microbatch: int, stage: int) -> int:
        """The rank that runs ``stage`` of ``microbatch``."""
        return self.placement[self.directions[microbatch]][stage]

    def chunks(self, rank: int) -> tuple[tuple[int, int], ...]:
        """The (direction, stage) model chunks a rank holds; the index in this tuple is the local chunk id."""
        return tuple((d, s) for d, row in enumerate(self.placement) for s, r in enumerate(row) if r == rank)

    def chunk_id(self, microbatch: int, stage: int) -> int:
        """Local chunk id (0 or 1) of ``stage`` of ``microbatch`` on its rank (the reference's module index)."""
        key = (self.directions[microbatch], stage)
        return self.chunks(self.placement[key[0]][stage]).index(key)

    @property
    def param_copies(self) -> tuple[int, ...]:
        """Per rank: stage parameter sets held, in units of one stage's parameters (1/``stages`` of the model).

        DualPipe's two sets are duplicates of its mirror rank's (stage r and PP-1-r); DualPipeV's are distinct.
        """
        return tuple(len(self.chunks(r)) for r in range(self.ranks))


class ScheduleError(ValueError):
    """A schedule is malformed: an op is missing, misplaced, out of order, or the ranks deadlock."""


def _check_args(name: str, ranks: int, microbatches: int) -> None:
    for arg, value in (("ranks", ranks), ("microbatches", microbatches)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: {arg} must be an int, got {value!r}")
    if ranks < 1:
        raise ValueError(f"{name}: ranks must be >= 1, got {ranks}")
    if microbatches < 1:
        raise ValueError(f"{name}: microbatches must be >= 1, got {microbatches}")


def _straight(kind: str, ranks: int, microbatches: int, ops: list[list[Op]]) -> Schedule:
    return Schedule(
        kind=kind,
        ranks=ranks,
        stages=ranks,
        microbatches=microbatches,
        directions=(0,) * microbatches,
        placement=(tuple(range(ranks)),),
        ops=tuple(tuple(o) for o in ops),
    )


def one_f_one_b(ranks: int, microbatches: int) -> Schedule:
    """1F1B (PipeDream-flush): rank r runs PP-1-r warm-up forwards, then alternates F and full backward.

    Valid for any ``microbatches >= 1``; its bubble is (PP-1)(F+B) for every count.
    """
    _check_args("1f1b", ranks, microbatches)
    ops = []
    for r in range(ranks):
        warmup = min(ranks - r - 1, microbatches)
        lst = [Op(Kind.F, m, r) for m in range(warmup)]
        for i in range(microbatches - warmup):
            lst += [Op(Kind.F, warmup + i, r), Op(Kind.BW, i, r)]
        lst += [Op(Kind.BW, m, r) for m in range(microbatches - warmup, microbatches)]
        ops.append(lst)
    return _straight("1f1b", ranks, microbatches, ops)


def zb1p(ranks: int, microbatches: int) -> Schedule:
    """ZB1P, the handcrafted ZB-H1 schedule of Qi et al. (arXiv 2401.10241 §3.1).

    1F1B's order of F and input-gradient B, with each W deferred on rank r by r backwards (the W of micro-batch
    i follows the B of micro-batch i+r; the last r run at the end), so the deferred W's fill the cool-down gaps
    where 1F1B waits for gradients. Rank r then holds at most PP micro-batches between F and W, 1F1B's peak
    (on rank 0). Requires ``microbatches >= ranks`` (a full steady phase on every rank).
    """
    _check_args("zb1p", ranks, microbatches)
    if microbatches < ranks:
        raise ValueError(f"zb1p: microbatches ({microbatches}) must be >= ranks ({ranks})")
    ops = []
    for r in range(ranks):
        warmup = ranks - r - 1
        lst = [Op(Kind.F, m, r) for m in range(warmup)]
        deferred: collections.deque[int] = collections.deque()  # micro-batches whose W is still to run
        for i in range(microbatches):
            if i < microbatches - warmup:
                lst.append(Op(Kind.F, warmup + i, r))
            lst.append(Op(Kind.B, i, r))
            deferred.append(i)
            if i >= r:  # the first r backwards keep their W: r more in flight than 1F1B on rank r, PP at most
                lst.append(Op(Kind.W, deferred.popleft(), r))
        lst += [Op(Kind.W, m, r) for m in deferred]
        ops.append(lst)
    return _straight("zb1p", ranks, microbatches, ops)


class _Builder:
    """Per-rank emitter mirroring the reference's chunk counters (phase -> next F / B micro-batch, W FIFO)."""

    def __init__(self, slots: tuple[tuple[int, int], tuple[int, int]], first_mb: tuple[int, int]) -> None:
        self.slots = slots  # phase -> (direction, stage)
        self.first_mb = first_mb  # phase -> id of the first micro-batch of that phase's direction
        self.next_f = [0, 0]
        self.next_b = [0, 0]
        self.w_queue: collections.deque[tuple[int, int]] = collections.deque()
        self.ops: list[Op] = []

    def _take(self, counter: list[int], phase: int) -> tuple[int, int]:
        mb = self.first_mb[phase] + counter[phase]
        counter[phase] += 1
        return mb, self.slots[phase][1]

    def forward(self, phase: int) -> None:
        self.ops.append(Op(Kind.F, *self._take(self.next_f, phase)))

    def backward(self, phase: int, zero_bubble: bool = False) -> None:
        mb, stage = self._take(self.next_b, phase)
        if zero_bubble:
            self.ops.append(Op(Kind.B, mb, stage))
            self.w_queue.append((mb, stage))
        else:
            self.ops.append(Op(Kind.BW, mb, stage))

    def weight(self) -> None:
        self.ops.append(Op(Kind.W, *self.w_queue.popleft()))

    def forward_backward(self, f_phase: int, b_phase: int) -> None:
        f = self._take(self.next_f, f_phase)
        self.ops.append(fb(*f, *self._take(self.next_b, b_phase)))


def _dual_steps(b: _Builder, half: int, pos: int, chunks: int, is_middle: bool) -> None:
    """The 8 steps of the reference ``step()``: ``half`` ranks per direction, this rank at ``pos`` in its half,
    ``chunks`` micro-batches per direction; ``is_middle`` ranks run the main step's first pair un-overlapped."""
    for _ in range((half - pos - 1) * 2):  # 1: nF0, warm-up of phase 0
        b.forward(0)
    for _ in range(pos + 1):  # 2: nF0F1
        b.forward(0)
        b.forward(1)
    for _ in range(half - pos - 1):  # 3: nB1W1F1, zero-bubble backward, its W, a forward
        b.backward(1, zero_bubble=True)
        b.weight()
        b.forward(1)
    for i in range(chunks - 2 * half + pos + 1):  # 4: nF0B1F1B0, the main overlapped step
        if i == 0 and is_middle:
            b.forward(0)  # the reference does not overlap this first pair, to shorten the bubble
            b.backward(1)
        else:
            b.forward_backward(0, 1)
        b.forward_backward(1, 0)
    for _ in range(half - pos - 1):  # 5: nB1F1B0
        b.backward(1)
        b.forward_backward(1, 0)
    zero_bubble = False
    for i in range(pos + 1):  # 6: nB1B0, zero-bubble from half way through
        if i == (pos + 1) // 2 and pos % 2 == 1:
            zero_bubble = True
        b.backward(1, zero_bubble)
        if i == (pos + 1) // 2 and pos % 2 == 0:
            zero_bubble = True
        b.backward(0, zero_bubble)
    for _ in range(half - pos - 1):  # 7: nWB0
        b.weight()
        b.backward(0, zero_bubble=True)
    for _ in range(pos + 1):  # 8: nW, drain
        b.weight()
    assert not b.w_queue, "weight-gradient queue must drain"  # invariant of the step counts above


def _check_dual(name: str, ranks: int, microbatches: int, even: bool) -> None:
    _check_args(name, ranks, microbatches)
    if even and ranks % 2:
        raise ValueError(f"{name}: ranks must be even (half of them feed each direction), got {ranks}")
    if even and microbatches % 2:
        raise ValueError(f"{name}: microbatches must be even (half per direction), got {microbatches}")
    if microbatches < 2 * ranks:
        raise ValueError(f"{name}: microbatches ({microbatches}) must be >= 2 * ranks ({2 * ranks})")


def dualpipe(ranks: int, microbatches: int) -> Schedule:
    """DualPipe (arXiv 2412.19437 §3.2.1; deepseek-ai/DualPipe ``dualpipe.py::step``).

    Rank r holds stage r of direction 0 and stage PP-1-r of direction 1 (two copies of the parameters per
    stage across the mirror pair). Micro-batches 0..C/2-1 enter at rank 0, C/2..C-1 at rank PP-1. Requires even
    ``ranks``, even ``microbatches`` and ``microbatches >= 2 * ranks`` (as the reference).
    """
    _check_dual("dualpipe", ranks, microbatches, even=True)
    half, chunks = ranks // 2, microbatches // 2
    placement = (tuple(range(ranks)), tuple(reversed(range(ranks))))
    ops = []
    for r in range(ranks):
        second = r >= half
        # The reference's "phase 0" is direction 0 on the first half of the ranks and direction 1 on the second.
        dirs = (1, 0) if second else (0, 1)
        slots = tuple((d, placement[d].index(r)) for d in dirs)
        b = _Builder(slots, tuple(d * chunks for d in dirs))
        _dual_steps(b, half, min(r, ranks - 1 - r), chunks, is_middle=r in (half - 1, half))
        ops.append(tuple(b.ops))
    return Schedule(
        kind="dualpipe",
        ranks=ranks,
        stages=ranks,
        microbatches=microbatches,
        directions=(0,) * chunks + (1,) * chunks,
        placement=placement,
        ops=tuple(ops),
    )


def dualpipev(ranks: int, microbatches: int) -> Schedule:
    """DualPipeV, DualPipe "cut in half" (deepseek-ai/DualPipe ``dualpipev.py::step``, after Sea AI Lab).

    One direction over ``2 * ranks`` stages in a V: rank r holds stages r and 2*ranks-1-r, so no parameter is
    duplicated; the last rank turns the V locally. Requires ``microbatches >= 2 * ranks``, odd counts included
    (as the reference; Table 2's bubble holds for them too). Any ``ranks >= 1``.
    """
    _check_dual("dualpipev", ranks, microbatches, even=False)
    stages = 2 * ranks
    placement = (tuple(range(ranks)) + tuple(reversed(range(ranks))),)
    ops = []
    for r in range(ranks):
        b = _Builder(((0, r), (0, stages - 1 - r)), (0, 0))
        # The V is DualPipe's first half: each rank is at position r of a "half" of `ranks` ranks, and the
        # middle pair of DualPipe becomes the last rank.
        _dual_steps(b, ranks, r, microbatches, is_middle=r == ranks - 1)
        ops.append(tuple(b.ops))
    return Schedule(
        kind="dualpipev",
        ranks=ranks,
        stages=stages,
        microbatches=microbatches,
        directions=(0,) * microbatches,
        placement=placement,
        ops=tuple(ops),
    )


GENERATORS = {"1f1b": one_f_one_b, "zb1p": zb1p, "dualpipe": dualpipe, "dualpipev": dualpipev}


def dependencies(schedule: Schedule, part: Part, microbatch: int, stage: int) -> tuple[tuple[Part, int, int], ...]:
    """The parts that must finish before ``part`` of (microbatch, stage) can start.

    F of stage s needs F of stage s-1; B (input grad) of stage s needs its own F and B of stage s+1 (the last
    stage's B needs only its F: the loss is computed inside the last stage's F); W needs its B.
    """
    if part is Part.F:
        return ((Part.F, microbatch, stage - 1),) if stage > 0 else ()
    if part is Part.B:
        deps = ((Part.F, microbatch, stage),)
        return (*deps, (Part.B, microbatch, stage + 1)) if stage < schedule.stages - 1 else deps
    return ((Part.B, microbatch, stage),)


def _name(part: Part, microbatch: int, stage: int) -> str:
    return f"{part} of micro-batch {microbatch} stage {stage}"


def _check_parts(schedule: Schedule) -> dict[tuple[Part, int, int], tuple[int, int]]:
    """Placement and exactly-once checks; returns where each part runs: part -> (rank, op index)."""
    where: dict[tuple[Part, int, int], tuple[int, int]] = {}
    if len(schedule.ops) != schedule.ranks:
        raise ScheduleError(f"{len(schedule.ops)} op lists for {schedule.ranks} ranks")
    for rank, ops in enumerate(schedule.ops):
        for i, op in enumerate(ops):
            for key in op.parts():
                part, mb, stage = key
                if not (0 <= mb < schedule.microbatches and 0 <= stage < schedule.stages):
                    raise ScheduleError(f"rank {rank} op {i} {op}: no {_name(*key)} in this schedule")
                if schedule.rank_of(mb, stage) != rank:
                    raise ScheduleError(
                        f"rank {rank} op {i} {op}: stage {stage} of micro-batch {mb} is placed on rank "
                        f"{schedule.rank_of(mb, stage)}"
                    )
                if key in where:
                    raise ScheduleError(f"rank {rank} op {i} {op}: {_name(*key)} already runs at op {where[key][1]}")
                where[key] = (rank, i)
    for mb in range(schedule.microbatches):
        for stage in range(schedule.stages):
            for part in Part:
                if (part, mb, stage) not in where:
                    raise ScheduleError(f"rank {schedule.rank_of(mb, stage)}: missing {_name(part, mb, stage)}")
    return where


def validate(schedule: Schedule) -> None:
    """Check that a schedule is complete, well placed, ordered and deadlock-free; raise `ScheduleError` if not.

    Every (micro-batch, stage) has exactly one F, B and W part, on the rank that holds the stage. A replay in
    which each rank runs its list in order, an op starting only once all its dependencies (`dependencies`,
    other than those inside the op itself) have run, must finish every list. The message names the rank, the
    op index and the unmet dependency: a same-rank dependency listed later, or the cycle of waiting ranks.
    """
    execution_order(schedule)


def execution_order(schedule: Schedule) -> list[tuple[int, int]]:
    """The (rank, op index) pairs in the order of `validate`'s replay: each op after all its dependencies.

    Raises:
        ScheduleError: as `validate`.
    """
    where = _check_parts(schedule)
    done: set[tuple[Part, int, int]] = set()
    pos = [0] * schedule.ranks
    order: list[tuple[int, int]] = []
    progress = True
    while progress:
        progress = False
        for rank, ops in enumerate(schedule.ops):
            while pos[rank] < len(ops):
                op = ops[pos[rank]]
                unmet = _unmet(schedule, op, done)
                if unmet:
                    dep_rank, dep_index = where[unmet[0]]
                    if dep_rank == rank:
                        raise ScheduleError(
                            f"rank {rank} op {pos[rank]} {op} needs {_name(*unmet[0])}, which rank {rank} runs "
                            f"later (op {dep_index})"
                        )
                    break
                done.update(op.parts())
                order.append((rank, pos[rank]))
                pos[rank] += 1
                progress = True
    stuck = [r for r in range(schedule.ranks) if pos[r] < len(schedule.ops[r])]
    if stuck:
        waits = []
        for r in stuck:
            op = schedule.ops[r][pos[r]]
            dep = _unmet(schedule, op, done)[0]
            waits.append(f"rank {r} op {pos[r]} {op} waits for {_name(*dep)} (rank {where[dep][0]} op {where[dep][1]})")
        raise ScheduleError("deadlock: " + "; ".join(waits))
    return order


def op_dependencies(schedule: Schedule, op: Op) -> list[tuple[Part, int, int]]:
    """The parts other ops must have finished before ``op`` starts (its parts' dependencies, less its own)."""
    own = op.parts()
    return [d for p in own for d in dependencies(schedule, *p) if d not in own]


def _unmet(schedule: Schedule, op: Op, done: set[tuple[Part, int, int]]) -> list[tuple[Part, int, int]]:
    return [d for d in op_dependencies(schedule, op) if d not in done]
