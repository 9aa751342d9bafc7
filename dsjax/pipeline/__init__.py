"""Pipeline-parallel schedules (1F1B, ZB1P, DualPipe, DualPipeV) as data, a validator and a timeline simulator."""

from dsjax.pipeline.schedules import (
    GENERATORS,
    Kind,
    Op,
    Part,
    Schedule,
    ScheduleError,
    dependencies,
    dualpipe,
    dualpipev,
    execution_order,
    fb,
    one_f_one_b,
    op_dependencies,
    validate,
    zb1p,
)

__all__ = [
    "GENERATORS",
    "Kind",
    "Op",
    "Part",
    "Schedule",
    "ScheduleError",
    "dependencies",
    "dualpipe",
    "dualpipev",
    "execution_order",
    "fb",
    "one_f_one_b",
    "op_dependencies",
    "validate",
    "zb1p",
]
