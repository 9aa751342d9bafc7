"""The pretraining step with the loss and gradients computed by a pipeline schedule.

Same contract as `dsjax.train.step.make_train_step` (``(state, batch) -> (state, metrics)``, the same
`TrainState`, metrics, optimizer, bias update and non-finite skipping), so checkpoints, resume and the HF export
are unchanged; only the forward/backward runs as `PipelinedLoss` over the ``stage`` mesh axis.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from dsjax.config import ModelConfig
from dsjax.pipeline.model import PipelinedLoss
from dsjax.pipeline.schedules import Schedule
from dsjax.train.config import TrainConfig
from dsjax.train.step import TrainState, apply_gradients

STAGE_AXIS = "stage"


def make_pipeline_mesh(stages: int, data: int = 1, expert: int = 1, devices=None) -> Mesh:
    """A ``stage`` x ``data`` x ``expert`` mesh over the first ``stages * data * expert`` devices."""
    n = stages * data * expert
    devices = list(devices if devices is not None else jax.devices())[:n]
    if len(devices) != n:
        raise ValueError(f"a {stages}x{data}x{expert} pipeline mesh needs {n} devices, {len(devices)} available")
    axis_types = (jax.sharding.AxisType.Auto,) * 3
    return Mesh(np.array(devices).reshape(stages, data, expert), (STAGE_AXIS, "data", "expert"), axis_types=axis_types)


def make_pipeline_train_step(
    graphdef: nnx.GraphDef,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    tx: optax.GradientTransformation,
    schedule: Schedule,
    mesh: Mesh,
):
    """The pipelined step function (not yet jitted; see `dsjax.train.step.jit_train_step`)."""
    loss = PipelinedLoss(graphdef, model_cfg, cfg, schedule, mesh=mesh, batch_rows=cfg.batch_size)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        total, aux, grads = loss.loss_and_grad(state.params, state.rest, batch)
        return apply_gradients(state, total, aux, grads, tx, model_cfg, cfg)

    step.pipelined_loss = loss
    return step
