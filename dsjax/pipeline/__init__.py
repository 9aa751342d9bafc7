"""Pipeline-parallel schedules (1F1B, ZB1P, DualPipe, DualPipeV) as data, a validator, a timeline simulator and an
executor that runs a schedule on a ``stage`` mesh axis."""

from dsjax.pipeline.executor import PipelineResult, make_pipeline_step, run_schedule, timesteps
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
    "PipelineResult",
    "Schedule",
    "ScheduleError",
    "dependencies",
    "dualpipe",
    "dualpipev",
    "execution_order",
    "fb",
    "make_pipeline_step",
    "one_f_one_b",
    "op_dependencies",
    "run_schedule",
    "timesteps",
    "validate",
    "zb1p",
]
