"""A process killed while it saves a training checkpoint, for ``tests/test_faults.py``.

  python tests/fault_worker.py DIR

Saves step 1, then SIGKILLs itself inside the save of step 2 at the worst moment: every file of checkpoint 2 is
written, the atomic rename that commits it has not happened yet. The state saved at step N is :func:`state` (N).
"""

from __future__ import annotations

import os
import signal
import sys

os.environ["JAX_PLATFORMS"] = "cpu"


def state(step: int, size: int = 1 << 20):
    """The train state saved at ``step``: random (incompressible) arrays determined by the step."""
    import jax
    import jax.numpy as jnp

    from dsjax.train.step import TrainState

    zero = jnp.zeros((), jnp.int32)
    keys = jax.random.split(jax.random.key(step), 2)
    params = {"w": jax.random.normal(keys[0], (size,)), "b": jax.random.normal(keys[1], (7,))}
    return TrainState(jnp.int32(step), params, {"bias": jnp.full((3,), float(step))}, (jnp.ones(5),), zero, zero)


def main(directory: str) -> int:
    from dsjax.train import checkpoint

    ckpt = checkpoint.TrainCheckpointer(directory, keep=2, every=1)
    ckpt.save(1, state(1), {"step": 1})
    ckpt.wait()
    # Orbax calls the checksum hook on process 0 after all files are written, just before the rename.
    checkpoint.write_checksums = lambda step_dir: os.kill(os.getpid(), signal.SIGKILL)
    ckpt.save(2, state(2), {"step": 2})
    ckpt.wait()
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
