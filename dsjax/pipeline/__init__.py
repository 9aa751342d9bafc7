"""Pipeline-parallel schedules (1F1B, ZB1P, DualPipe, DualPipeV) as data, a validator, a timeline simulator and an
executor that runs a schedule on a ``stage`` mesh axis (toy stages, or the DeepSeek model: `dsjax.pipeline.model`)."""

from dsjax.pipeline.executor import (
    EngineResult,
    PipelineResult,
    make_engine,
    make_pipeline_step,
    run_schedule,
    sum_stages,
    timesteps,
)
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
    "EngineResult",
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
    "make_engine",
    "make_pipeline_step",
    "one_f_one_b",
    "op_dependencies",
    "run_schedule",
    "sum_stages",
    "timesteps",
    "validate",
    "zb1p",
]
