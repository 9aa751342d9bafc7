"""Replay a pipeline schedule against per-op costs: timelines, bubbles, activation and parameter memory.

Each rank runs its op list in order; an op starts at the later of the moment its rank is free and the moment
its last dependency is available (its end, plus the per-hop ``send`` cost if it ran on another rank). Costs
are exact if given as ints or `fractions.Fraction`, so Table 2 of arXiv 2412.19437 can be checked with ``==``.
Table 2 assumes communication is hidden (``send = 0``). With a send cost every schedule's bubble grows with the
number of micro-batches too: the model charges the hop on the critical path and overlaps no transfer with
compute (which is what DualPipe's F&B pairs do on real hardware), so steady states wait on round trips.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction

from dsjax.pipeline.schedules import Kind, Op, Part, Schedule, execution_order, op_dependencies

Number = int | Fraction | float


@dataclasses.dataclass(frozen=True)
class Costs:
    """Execution times, in Table 2's symbols.

    Attributes:
        F: forward of one stage.
        B: *full* backward of one stage (input and weight gradients). A zero-bubble ``B`` op (input gradient
            only) costs ``B - W``, a ``BW`` op costs ``B``.
        W: weight-gradient part of the backward.
        FB: an overlapped forward + full backward pair (Table 2's F&B); ``None`` means ``F + B`` (no overlap
            gain, the cost model of the DualPipe README figure).
        send: per-hop point-to-point transfer time, charged on every cross-rank dependency.
    """

    F: Number = 1
    B: Number = 2
    W: Number = 1
    FB: Number | None = None
    send: Number = 0

    def __post_init__(self) -> None:
        for name in ("F", "B", "W", "send"):
            if getattr(self, name) < 0:
                raise ValueError(f"cost {name} must be >= 0, got {getattr(self, name)}")
        if self.W > self.B:
            raise ValueError(f"W ({self.W}) is part of the full backward B ({self.B}); it cannot exceed it")
        if self.FB is not None and self.FB < 0:
            raise ValueError(f"cost FB must be >= 0, got {self.FB}")

    @property
    def fb(self) -> Number:
        """F&B: the given overlapped cost, or F + B."""
        return self.F + self.B if self.FB is None else self.FB

    def of(self, op: Op) -> Number:
        """Execution time of one op."""
        return {Kind.F: self.F, Kind.B: self.B - self.W, Kind.W: self.W, Kind.BW: self.B, Kind.FB: self.fb}[op.kind]


@dataclasses.dataclass(frozen=True)
class Result:
    """A simulated step.

    Attributes:
        schedule: what was simulated.
        costs: with which costs.
        start: ``start[rank][i]``: start time of op i of that rank.
        end: ``end[rank][i]``: its end time.
        total: the step's makespan (every rank starts at 0).
        busy: per rank, the time spent computing.
        bubble: per rank, ``total - busy``: the time the rank idles inside the step, at its start, in between and
            at its end (Table 2's bubble: it counts against the rank whether or not it has started yet).
        activations: per rank, the peak number of stage activations alive, a stage's activation of a
            micro-batch living from the start of its F to the end of its input-gradient B. An ``FB`` op holds its
            new forward's and its backward's activations at once.
        param_copies: per rank, stage parameter sets held, in units of one stage's parameters.
    """

    schedule: Schedule
    costs: Costs
    start: tuple[tuple[Number, ...], ...]
    end: tuple[tuple[Number, ...], ...]
    total: Number
    busy: tuple[Number, ...]
    bubble: tuple[Number, ...]
    activations: tuple[int, ...]
    param_copies: tuple[int, ...]


def simulate(schedule: Schedule, costs: Costs | None = None) -> Result:
    """Simulate ``schedule`` (validated first) under ``costs`` (default: F=1, B=2, W=1, F&B=F+B, no send cost)."""
    costs = Costs() if costs is None else costs
    start: list[list[Number]] = [[0] * len(ops) for ops in schedule.ops]
    end: list[list[Number]] = [[0] * len(ops) for ops in schedule.ops]
    ready: dict[tuple[Part, int, int], tuple[Number, int]] = {}  # part -> (end time, rank)
    for rank, i in execution_order(schedule):  # validates; every op comes after its dependencies
        op = schedule.ops[rank][i]
        t = end[rank][i - 1] if i else 0
        for dep in op_dependencies(schedule, op):
            done, where = ready[dep]
            t = max(t, done + (costs.send if where != rank else 0))
        start[rank][i], end[rank][i] = t, t + costs.of(op)
        ready.update((part, (end[rank][i], rank)) for part in op.parts())
    total = max((e[-1] for e in end if e), default=0)
    busy = tuple(sum((costs.of(op) for op in ops), start=0) for ops in schedule.ops)
    return Result(
        schedule=schedule,
        costs=costs,
        start=tuple(map(tuple, start)),
        end=tuple(map(tuple, end)),
        total=total,
        busy=busy,
        bubble=tuple(total - b for b in busy),
        activations=tuple(peak_activations(ops) for ops in schedule.ops),
        param_copies=schedule.param_copies,
    )


def peak_activations(ops: tuple[Op, ...]) -> int:
    """Peak live stage activations on a rank running ``ops`` in order (see `Result.activations`)."""
    live = peak = 0
    for op in ops:
        parts = [p for p, _, _ in op.parts()]
        live += Part.F in parts  # an op forwards and backwards at most one micro-batch each
        peak = max(peak, live)
        live -= Part.B in parts
    return peak


def table2(kind: str, stages: int, costs: Costs) -> tuple[Number, int, int]:
    """Table 2 of arXiv 2412.19437 for ``stages`` = PP: (bubble, parameters per device, activations per device).

    Parameters are in units of one stage's parameters (1/PP of the model), activations in units of one stage's
    activations of one micro-batch; both are per-device maxima. ``B`` is the full backward, as in the table.
    The bubble is the most idle rank's `Result.bubble`. When `simulate` reproduces it exactly (checked by the
    tests for PP in {4, 8, 16} and any valid micro-batch count):

    - 1F1B: for all costs; every rank idles (PP-1)(F+B).
    - ZB1P: when W <= min(F, B-W), i.e. each deferred W fits in a forward- or input-gradient-sized gap. In
      general every rank idles (PP-1)(F + B - W - min(W, F, B-W)).
    - DualPipe, DualPipeV: when the input-gradient backward costs as much as the forward (B - W = F, the cost
      model of the DualPipe figures), W <= F and max(F, B) <= F&B <= F + B. With F&B = F + B every rank idles
      the table's amount; with F&B < F + B the ranks running the most F&B pairs (DualPipe's middle pair,
      DualPipeV's last two ranks) do, and the rank at position h of its half (h = min(r, PP-1-r) for DualPipe,
      r for DualPipeV) idles max(0, PP/2-2-h) * (F + B - F&B) less. Outside these assumptions the formula is an
      approximation (e.g. F=2, B=4, W=1, PP=8: 19 simulated, 21 in the table).
    """
    pp, f, b, w = stages, costs.F, costs.B, costs.W
    if kind == "1f1b":
        return (pp - 1) * (f + b), 1, pp
    if kind == "zb1p":
        return (pp - 1) * (f + b - 2 * w), 1, pp
    if kind in ("dualpipe", "dualpipev"):
        return (pp // 2 - 1) * (costs.fb + b - 3 * w), 2, pp + 1
    raise ValueError(f"unknown schedule kind {kind!r}")
