"""Stopping a run cleanly at a step boundary: preemption notices (SIGTERM) and wall-clock limits.

Spot VMs and queued resources announce the end of a job with SIGTERM a short while before they kill it. The
training and RL loops ask a :class:`StopGuard` after every step whether to stop; when it says so they save a
checkpoint of that step, flush their logs and raise :class:`Preempted`, and the scripts exit with
:data:`PREEMPTED_EXIT_CODE`. Running the same command again resumes from that checkpoint.

Every process of a multi-host job must stop after the same step, or the checkpoint (a collective write) would
hang or mix steps. Under ``jax.distributed`` the guard therefore uses JAX's preemption sync service: JAX installs
its own SIGTERM handler at ``jax.distributed.initialize``, the coordination service spreads one process's notice
to all, and :func:`jax.experimental.multihost_utils.reached_preemption_sync_point` becomes true at the same step
everywhere (orbax's ``CheckpointManager`` consults the same service). A single process without ``jax.distributed``
installs a Python SIGTERM handler that only sets a flag, and puts the previous handler back afterwards; a second
SIGTERM puts it back at once and re-raises the signal, so a run hung in a step or a save can still be stopped
without SIGKILL.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import numpy as np

log = logging.getLogger(__name__)

# sysexits.h's EX_TEMPFAIL ("temporary failure; the user is invited to retry"): a job wrapper can restart on it
# and tell a preemption from a failure (1) or a crash (signals, 134).
PREEMPTED_EXIT_CODE = 75

SIGTERM_REASON = "a preemption notice (SIGTERM)"
TIME_LIMIT_REASON = "the time limit"


class Preempted(Exception):
    """The run stopped early, after saving a checkpoint of ``step``; running it again resumes from there.

    Attributes:
      step: the last completed (and checkpointed) step.
      reason: what stopped it (a preemption notice or the time limit).
      checkpoint_dir: the directory holding the checkpoint.
    """

    def __init__(self, step: int, reason: str, checkpoint_dir: str):
        self.step, self.reason, self.checkpoint_dir = step, reason, checkpoint_dir
        super().__init__(
            f"stopped after step {step} on {reason}; checkpoint {step} is saved in {checkpoint_dir}. "
            "Run the same command again to resume from it."
        )


def _jax_sync_available() -> bool:
    """Whether JAX's preemption sync service runs in this process (``jax.distributed`` with the service on)."""
    import jax

    if not jax.distributed.is_initialized():
        return False
    # The sync manager is only reachable through JAX's private module; tolerate a JAX that moved or renamed it.
    try:
        from jax._src import distributed
    except ImportError:
        distributed = None
    manager = getattr(getattr(distributed, "global_state", None), "preemption_sync_manager", None)
    if manager is None:
        log.warning(
            "JAX's preemption sync service is not available (jax_enable_preemption_service off, or a JAX version "
            "that does not expose it): the processes agree on stopping through one small allgather per step"
        )
    return manager is not None


class StopGuard:
    """Tells a training loop when to stop: after a preemption notice (SIGTERM) or ``max_runtime_s`` seconds.

    Use as a context manager around the loop and call :meth:`check` once per completed step, with the same
    step numbers on every process (JAX's sync service requires every step, in order)::

        with StopGuard(max_runtime_s=3600) as guard:
            guard.start(first_step)
            for step in range(first_step + 1, last_step + 1):
                ...
                if (reason := guard.check(step)) is not None:
                    save the checkpoint of `step`; raise Preempted(step, reason, ...)

    Where the guard installs its own handler (no JAX sync service), a second SIGTERM before the loop stopped
    restores the previous handler and re-raises the signal: by default the process terminates at once, without a
    checkpoint (the previous one is intact).

    Args:
      max_runtime_s: stop at the first step that ends ``max_runtime_s`` seconds or more after ``start_time``; 0
        means no limit. Leave room below the job's real limit for one step and a checkpoint save.
      start_time: ``time.monotonic()`` value the limit counts from (default: when the guard is entered).
    """

    def __init__(self, *, max_runtime_s: float = 0.0, start_time: float | None = None):
        if max_runtime_s < 0:
            raise ValueError(f"max_runtime_s must be >= 0, got {max_runtime_s}")
        self.max_runtime_s = max_runtime_s
        self._start_time = start_time
        self._mode = "local"
        self._reason: str | None = None  # set by the signal handler or the time limit
        self._limit_reached = False
        self._previous_handler = None
        self._installed = False
        self._notices = 0  # SIGTERMs received by our handler

    def __enter__(self) -> StopGuard:
        import jax

        if self._start_time is None:
            self._start_time = time.monotonic()
        # JAX installs a C++ SIGTERM handler (invisible to signal.getsignal, which then still reports the default)
        # that feeds its sync service; installing a Python handler would replace it. A Python handler already in
        # place means JAX's was replaced: notices cannot reach the service, so fall back to our own handler.
        if _jax_sync_available() and not callable(signal.getsignal(signal.SIGTERM)):
            self._mode = "jax"
        else:
            self._mode = "allgather" if jax.process_count() > 1 else "local"
            if threading.current_thread() is threading.main_thread():
                self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
                self._installed = True
            else:  # Python only lets the main thread install handlers
                log.warning("StopGuard outside the main thread: SIGTERM is not caught, only the time limit applies")
        return self

    def __exit__(self, *exc) -> None:
        self._restore_handler()

    def _restore_handler(self) -> None:
        if self._installed:
            # signal.signal returned None: the previous handler was installed from C, which Python cannot put
            # back; the default (terminate) is the closest.
            previous = signal.SIG_DFL if self._previous_handler is None else self._previous_handler
            signal.signal(signal.SIGTERM, previous)
            self._installed = False

    def _on_sigterm(self, signum, frame) -> None:
        self._notices += 1
        if self._notices == 1:
            # Only a flag: the loop checkpoints at its next step boundary, outside the handler.
            self._reason = SIGTERM_REASON
            return
        # A second notice: the run did not stop in time (a hung step or save). Let the previous handler (by default:
        # terminate) have it now. os.write, not logging: the handler may interrupt the logging machinery itself.
        os.write(2, b"StopGuard: second SIGTERM, stopping without waiting for the step to end\n")
        self._restore_handler()
        signal.raise_signal(signum)

    def start(self, step: int) -> None:
        """Declare the step the loop resumes from, before its first :meth:`check`."""
        if self._mode == "jax":
            from jax.experimental import multihost_utils

            # The sync service sets the stop step to (largest step reported so far) + 1; report the real start so
            # that a notice arriving before the first step is not matched against step 0 of a resumed run.
            multihost_utils.reached_preemption_sync_point(step)

    def check(self, step: int) -> str | None:
        """Call after each completed ``step``, on every process: the reason to stop now, or None."""
        elapsed = time.monotonic() - self._start_time
        if self.max_runtime_s and not self._limit_reached and elapsed >= self.max_runtime_s:
            self._limit_reached = True
            if self._mode == "jax":
                # Deliver the limit as a notice through JAX's handler, so that all processes agree on the stop step
                # whichever one's clock ran out first.
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                self._reason = TIME_LIMIT_REASON
        if self._mode == "jax":
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                return TIME_LIMIT_REASON if self._limit_reached else SIGTERM_REASON
            return None
        if self._mode == "allgather":
            from jax.experimental import multihost_utils

            # No sync service (jax_enable_preemption_service off): one tiny collective per step decides together.
            codes = multihost_utils.process_allgather(np.int32({None: 0, SIGTERM_REASON: 1}.get(self._reason, 2)))
            code = int(np.max(codes))
            return None if code == 0 else SIGTERM_REASON if code == 1 else TIME_LIMIT_REASON
        return self._reason
