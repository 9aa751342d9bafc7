"""Pipeline schedules (1F1B, ZB1P, DualPipe, DualPipeV): validation, simulation against Table 2 of the V3 report.

Costs are ints or Fractions, so bubbles are compared exactly. The Table 2 formulas hold under the cost
assumptions stated in `dsjax.pipeline.simulator.table2`; the tests check them there, and check the exact
general form where the table is only an approximation.
"""

import dataclasses
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsjax.pipeline import (
    GENERATORS,
    Kind,
    Op,
    ScheduleError,
    dualpipe,
    dualpipev,
    one_f_one_b,
    op_dependencies,
    validate,
    zb1p,
)
from dsjax.pipeline.plot import plot_timeline
from dsjax.pipeline.simulator import Costs, simulate, table2

PPS = (4, 8, 16)


def make(name: str, pp: int, microbatches: int):
    """The schedule at ``pp`` stages (Table 2's comparison: DualPipeV runs them on pp/2 ranks)."""
    return GENERATORS[name](pp // 2 if name == "dualpipev" else pp, microbatches)


def counts(pp: int) -> tuple[int, ...]:
    """Micro-batch counts valid for every schedule at ``pp`` stages (fewer at 16, for time)."""
    return (2 * pp, 2 * pp + 2, 3 * pp) if pp < 16 else (2 * pp, 2 * pp + 2)


def half_position(name: str, ranks: int, rank: int) -> int:
    return min(rank, ranks - 1 - rank) if name == "dualpipe" else rank


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("ranks", [1, 2, 4, 8, 16])
def test_generated_schedules_validate(ranks):
    for name, gen in GENERATORS.items():
        for mb in sorted({1, ranks, ranks + 1, 2 * ranks, 2 * ranks + 1, 2 * ranks + 2, 3 * ranks}):
            invalid = (
                (name == "zb1p" and mb < ranks)
                or (name in ("dualpipe", "dualpipev") and mb < 2 * ranks)
                or (name == "dualpipe" and (ranks % 2 or mb % 2))
            )
            if invalid:
                with pytest.raises(ValueError):
                    gen(ranks, mb)
                continue
            sched = gen(ranks, mb)
            validate(sched)
            assert (sched.ranks, sched.microbatches) == (ranks, mb)
            assert sched.stages == (2 * ranks if name == "dualpipev" else ranks)


def test_layouts():
    dp = dualpipe(4, 8)
    assert dp.chunks(0) == ((0, 0), (1, 3)) and dp.chunks(2) == ((0, 2), (1, 1))  # stage r and PP-1-r
    assert dp.directions == (0,) * 4 + (1,) * 4 and dp.rank_of(4, 0) == 3  # reverse half enters at the last rank
    dv = dualpipev(4, 8)
    assert dv.stages == 8 and dv.chunks(0) == ((0, 0), (0, 7)) and dv.chunks(3) == ((0, 3), (0, 4))
    assert dv.chunk_id(0, 7) == 1 and dv.chunk_id(0, 0) == 0
    # The reference's warm-up on rank 0: 2 * (PP/2 - 1) forwards of its own direction, then one of each.
    assert [str(op) for op in dp.ops[0][:4]] == ["F(mb0 s0)", "F(mb1 s0)", "F(mb2 s0)", "F(mb4 s3)"]
    fb_ops = [op for op in dp.ops[0] if op.kind is Kind.FB]
    assert fb_ops and all(op.parts()[0][0] == "F" and len(op.parts()) == 3 for op in fb_ops)


def check_timeline(res):
    """Each rank runs its ops back to back in list order, each op after its dependencies (plus a hop if remote)."""
    sched, costs = res.schedule, res.costs
    ends = {}
    for rank, ops in enumerate(sched.ops):
        for i, op in enumerate(ops):
            assert res.end[rank][i] - res.start[rank][i] == costs.of(op)
            assert i == 0 or res.start[rank][i] >= res.end[rank][i - 1]
            ends.update((part, (res.end[rank][i], rank)) for part in op.parts())
    for rank, ops in enumerate(sched.ops):
        for i, op in enumerate(ops):
            for dep in op_dependencies(sched, op):
                end, where = ends[dep]
                assert res.start[rank][i] >= end + (costs.send if where != rank else 0)
    assert res.total == max(e[-1] for e in res.end) and all(b >= 0 for b in res.bubble)


def test_timelines_respect_dependencies():
    for name in GENERATORS:
        for costs in (Costs(3, 5, 2, FB=6), Costs(1, 2, 1, send=Fraction(1, 3))):
            res = simulate(make(name, 8, 18), costs)
            check_timeline(res)
            assert res.busy == tuple(sum(costs.of(op) for op in ops) for ops in res.schedule.ops)


def replace_ops(sched, rank, ops):
    return dataclasses.replace(sched, ops=tuple(tuple(ops) if r == rank else o for r, o in enumerate(sched.ops)))


def test_validate_rejects_missing_w():
    sched = zb1p(4, 4)
    ops = list(sched.ops[2])
    i = next(i for i, op in enumerate(ops) if op.kind is Kind.W and op.microbatch == 1)
    del ops[i]
    with pytest.raises(ScheduleError, match=r"^rank 2: missing W of micro-batch 1 stage 2$"):
        validate(replace_ops(sched, 2, ops))


@pytest.mark.parametrize(("gen", "kind"), [(one_f_one_b, "BW"), (zb1p, "B")])
def test_validate_rejects_b_before_its_f(gen, kind):
    sched = gen(2, 2)  # rank 1: F0 BW0 F1 BW1 (1F1B), F0 B0 F1 B1 W0 W1 (ZB1P)
    ops = list(sched.ops[1])
    ops[2], ops[3] = ops[3], ops[2]
    with pytest.raises(
        ScheduleError, match=rf"rank 1 op 2 {kind}\(mb1 s1\) needs F of micro-batch 1 stage 1, .*later \(op 3\)"
    ):
        validate(replace_ops(sched, 1, ops))


def test_validate_rejects_deadlock():
    sched = one_f_one_b(2, 2)  # rank 0: F0 F1 BW0 BW1; rank 1: F0 BW0 F1 BW1
    a = list(sched.ops[0])
    a[1], a[2] = a[2], a[1]  # rank 0 now waits for micro-batch 0's gradient before sending micro-batch 1 ...
    b = list(sched.ops[1])
    b[0], b[2] = b[2], b[0]  # ... which rank 1 now wants first
    broken = replace_ops(replace_ops(sched, 0, a), 1, b)
    with pytest.raises(ScheduleError) as err:
        validate(broken)
    msg = str(err.value)
    assert msg.startswith("deadlock: ")
    assert "rank 0 op 1 BW(mb0 s0) waits for B of micro-batch 0 stage 1 (rank 1 op 1)" in msg
    assert "rank 1 op 0 F(mb1 s1) waits for F of micro-batch 1 stage 0 (rank 0 op 2)" in msg


def test_validate_rejects_misplaced_and_duplicate_ops():
    sched = one_f_one_b(2, 2)
    with pytest.raises(ScheduleError, match=r"rank 0 op 4 F\(mb0 s1\): stage 1 of micro-batch 0 is placed on rank 1"):
        validate(replace_ops(sched, 0, [*sched.ops[0], Op(Kind.F, 0, 1)]))
    with pytest.raises(
        ScheduleError, match=r"rank 0 op 4 BW\(mb1 s0\): B of micro-batch 1 stage 0 already runs at op 3"
    ):
        validate(replace_ops(sched, 0, [*sched.ops[0], Op(Kind.BW, 1, 0)]))
    with pytest.raises(ScheduleError, match="no F of micro-batch 5"):
        validate(replace_ops(sched, 0, [*sched.ops[0], Op(Kind.F, 5, 0)]))


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(sorted(GENERATORS)),
    swaps=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 40)), min_size=1, max_size=3),
)
def test_validator_on_random_swaps(name, swaps):
    """Swapping neighbouring ops gives either a ScheduleError or a valid schedule that simulates consistently."""
    sched = make(name, 4, 8)
    ops = [list(o) for o in sched.ops]
    for rank, i in swaps:
        rank %= sched.ranks
        i %= len(ops[rank]) - 1
        ops[rank][i], ops[rank][i + 1] = ops[rank][i + 1], ops[rank][i]
    broken = dataclasses.replace(sched, ops=tuple(map(tuple, ops)))
    try:
        validate(broken)
    except ScheduleError as e:
        assert str(e).startswith(("rank ", "deadlock: rank "))
        return
    check_timeline(simulate(broken, Costs(1, 2, 1, send=1)))


def test_bad_arguments():
    cases = [
        (lambda: dualpipe(3, 12), "ranks must be even"),
        (lambda: dualpipe(4, 10 - 1), "microbatches must be even"),
        (lambda: dualpipe(4, 6), r"must be >= 2 \* ranks \(8\)"),
        (lambda: dualpipev(4, 7), r"must be >= 2 \* ranks \(8\)"),
        (lambda: zb1p(4, 3), r"must be >= ranks \(4\)"),
        (lambda: one_f_one_b(0, 4), "ranks must be >= 1"),
        (lambda: one_f_one_b(4, 0), "microbatches must be >= 1"),
        (lambda: one_f_one_b(4.0, 4), "ranks must be an int"),
        (lambda: Costs(F=1, B=1, W=2), "cannot exceed"),
        (lambda: Costs(F=-1), "F must be >= 0"),
        (lambda: Costs(FB=-1), "FB must be >= 0"),
        (lambda: Op(Kind.FB, 0, 0), "required for FB"),
        (lambda: Op(Kind.F, 0, 0, 1, 1), "only for FB"),
        (lambda: table2("gpipe", 4, Costs()), "unknown schedule kind"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


# ---------------------------------------------------------------------------------------------- Table 2

FIGURE = Costs(1, 2, 1)  # the DualPipe figures: F = input-grad B = W = one cell, F&B = F + B
DUAL_COSTS = [  # B - W = F and W <= F (table2's assumptions), F&B from F + B down to max(F, B)
    FIGURE,
    Costs(3, 5, 2),
    Costs(3, 5, 2, FB=6),
    Costs(2, 3, 1, FB=3),
    Costs(Fraction(3, 2), 2, Fraction(1, 2), FB=Fraction(11, 4)),
    Costs(2, 2, 0, FB=3),
]


@pytest.mark.parametrize("pp", PPS)
def test_1f1b_and_zb1p_bubbles(pp):
    for mb in (pp, 2 * pp + 1):
        for costs in (FIGURE, Costs(3, 5, 2), Costs(2, 7, 0)):  # ZB1P: W <= min(F, B - W)
            for name in ("1f1b", "zb1p"):
                res = simulate(make(name, pp, mb), costs)
                assert set(res.bubble) == {table2(name, pp, costs)[0]}, (name, mb, costs)
        for f, b, w in ((1, 3, 2), (3, 4, 2), (1, 1, 1)):  # W too large to hide: the general form
            res = simulate(zb1p(pp, mb), Costs(f, b, w))
            assert set(res.bubble) == {(pp - 1) * (f + b - w - min(w, f, b - w))}


@pytest.mark.parametrize("pp", PPS)
@pytest.mark.parametrize("name", ["dualpipe", "dualpipev"])
def test_dualpipe_bubbles(name, pp):
    for mb in counts(pp):
        for costs in DUAL_COSTS:
            res = simulate(make(name, pp, mb), costs)
            formula = table2(name, pp, costs)[0]
            assert max(res.bubble) == formula, (mb, costs)
            gain = costs.F + costs.B - costs.fb  # what one overlapped pair saves
            expected = [
                formula - max(0, pp // 2 - 2 - half_position(name, res.schedule.ranks, r)) * gain
                for r in range(res.schedule.ranks)
            ]
            assert list(res.bubble) == expected, (mb, costs)


def test_dualpipe_formula_is_an_approximation_outside_its_assumptions():
    # Input-gradient backward (3) longer than the forward (2): less idle than the table says.
    costs = Costs(2, 4, 1)
    assert table2("dualpipe", 8, costs)[0] == 21
    assert set(simulate(dualpipe(8, 20), costs).bubble) == {19}


@pytest.mark.parametrize("pp", PPS)
def test_activations_and_params(pp):
    for name in GENERATORS:
        res = simulate(make(name, pp, 2 * pp + 2), Costs(3, 5, 2, FB=6))
        _, params, activations = table2(name, pp, res.costs)
        assert max(res.activations) == activations and max(res.param_copies) == params
        if name in ("1f1b", "zb1p"):
            assert res.activations == tuple(range(pp, 0, -1))  # rank r keeps PP - r micro-batches
        else:
            assert set(res.activations) == {pp + 1} and set(res.param_copies) == {2}  # balanced across ranks


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(["dualpipe", "dualpipev"]),
    pp=st.sampled_from([4, 8]),
    extra=st.integers(0, 4),
    f=st.integers(1, 6),
    data=st.data(),
)
def test_dualpipe_bubble_property(name, pp, extra, f, data):
    """Table 2's DualPipe bubble, for any costs under its assumptions (B - W = F, W <= F, max(F,B) <= F&B <= F+B)."""
    w = data.draw(st.integers(0, f))
    b = f + w
    costs = Costs(f, b, w, FB=data.draw(st.integers(max(f, b), f + b)))
    res = simulate(make(name, pp, 2 * pp + 2 * extra), costs)
    assert max(res.bubble) == table2(name, pp, costs)[0]


def test_send_cost():
    pp, c = 4, Costs(1, 2, 1, send=Fraction(1, 2))
    res = simulate(one_f_one_b(pp, 1), c)  # one micro-batch: the chain down and back, 2 (PP-1) hops
    assert res.total == pp * (c.F + c.B) + 2 * (pp - 1) * c.send
    res = simulate(dualpipev(1, 4), c)  # the V's turn stays on the rank: no hop, no idle
    assert res.bubble == (0,)


def test_plot_writes_png(tmp_path):
    path = plot_timeline(simulate(dualpipe(4, 8), Costs(3, 5, 2, FB=6)), tmp_path / "sub" / "dualpipe.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
