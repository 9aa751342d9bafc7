"""Training checkpoints with orbax: periodic, asynchronous, atomic, keeping the last K.

Each checkpoint holds the whole :class:`~dsjax.train.step.TrainState` (weights, routing biases, optimizer
moments, step and skip counters) and the data iterator's JSON state, so a resumed run continues exactly where
the saved one stood. Orbax writes into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoints intact and the partial one invisible.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from dsjax.checkpoint.safetensors_io import CheckpointError
from dsjax.train.step import TrainState


class TrainCheckpointer:
    """Save / restore train states under ``directory/<step>/``."""

    def __init__(self, directory: str | os.PathLike, *, keep: int, every: int, use_async: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        # Save every `every` steps (and when forced); orbax's default policy would also save the first step.
        policy = ocp.checkpoint_managers.FixedIntervalPolicy(every)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_decision_policy=policy, enable_async_checkpointing=use_async, create=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict, *, force: bool = False) -> bool:
        """Start saving (returns at once when asynchronous); False if ``step`` is not a save step."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state._asdict()), data=ocp.args.JsonSave(data_state))
        return self._manager.save(step, args=args, force=force)

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """Restore ``step`` (default: the latest) into the shapes, dtypes and shardings of ``abstract_state``."""
        step = self._manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state._asdict()
        )
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} cannot be restored into this run's state "
                f"(corrupt, or saved with another model/optimizer config): {e}"
            ) from None
        return TrainState(**restored["state"]), restored["data"]

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
