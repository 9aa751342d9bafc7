"""The pretraining step with the loss and gradients computed by a pipeline schedule.

Same contract as `dsjax.train.step.make_train_step` (``(state, batch) -> (state, metrics)``, the same
`TrainState`, metrics, optimizer, bias update and non-finite skipping), so checkpoints, resume and the HF export
are unchanged; only the forward/backward runs as `PipelinedLoss` over the ``stage`` mesh axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from dsjax.config import ModelConfig
from dsjax.pipeline.model import PipelinedLoss
from dsjax.pipeline.schedules import Schedule
from dsjax.train.config import TrainConfig
from dsjax.train.optim import learning_rate
from dsjax.train.step import TrainState, _update_biases

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
    lr_schedule = learning_rate(cfg)
    use_bias = model_cfg.has_routing_bias and cfg.bias_gamma > 0
    loss = PipelinedLoss(graphdef, model_cfg, cfg, schedule, mesh=mesh, batch_rows=cfg.batch_size)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        total, aux, grads = loss.loss_and_grad(state.params, state.rest, batch)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rest = state.rest
        if use_bias and aux["load"] is not None:
            rest = _update_biases(rest, aux["load"], model_cfg, cfg.bias_gamma)

        def keep_if_finite(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        new_state = TrainState(
            step=state.step + 1,
            params=keep_if_finite(params, state.params),
            rest=keep_if_finite(rest, state.rest),
            opt_state=keep_if_finite(opt_state, state.opt_state),
            nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
        )
        metrics = dict(
            loss=total,
            ce=aux["ce"],
            mtp=aux["mtp"],
            balance=aux["balance"],
            grad_norm=grad_norm,
            lr=lr_schedule(state.step),
            finite=finite,
            tokens=aux["tokens"],
        )
        if aux["load"] is not None:
            metrics["load"] = aux["load"]
        return new_state, metrics

    step.pipelined_loss = loss
    return step
