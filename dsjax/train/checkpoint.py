"""Training checkpoints with orbax: periodic, asynchronous, atomic, checksummed, keeping the last K.

Each checkpoint holds the whole :class:`~dsjax.train.step.TrainState` (weights, routing biases, optimizer
moments, step and skip counters) and the data iterator's JSON state, so a resumed run continues exactly where
the saved one stood.

What protects a run against faults:

* Orbax writes into ``<step>.orbax-checkpoint-tmp`` and renames it when every process has finished, so a run
  killed mid-save, or a save that fails (disk full), leaves the previous checkpoints intact and the partial one
  invisible; partial directories are removed when the next run opens the directory (not by the failing run: other
  processes may still be writing into it). Old checkpoints are deleted
  (``keep``) only after a newer one has been committed, so the newest good checkpoint is never deleted.
* Just before that rename, process 0 records the size and CRC-32 of every file of the checkpoint in
  ``dsjax_checksums.json`` (inside the directory, so it commits atomically with it). Restoring verifies them
  first: orbax stores array bytes without checksums, and a flipped byte would otherwise restore as a silently
  different weight (tested). A truncated or edited file is reported by name. The cost: process 0 reads every
  file back once per save, and each process reads its share once per restore, at the speed of CRC-32 (about
  1.5-2 GB/s per core) or of the disk if slower: seconds for a small model, minutes for hundreds of GB, which is
  when to turn ``train.checkpoint_checksums`` off.
* A restored state with a NaN or Inf anywhere is rejected, naming the array (training skips non-finite updates,
  so a good checkpoint never holds one).
* These three are damage (:class:`DamagedCheckpointError`). :meth:`TrainCheckpointer.restore_latest` with
  ``fallback=True`` then tries the previous checkpoint, and once one restores moves the damaged newer ones aside
  (into ``<directory>.rejected/``). A checkpoint that is intact but does not fit the run's state (another model
  or optimizer config: a different tree, shape or dtype) is a plain :class:`CheckpointError` naming the
  differences, and nothing is moved: the checkpoints are good, the config is not.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import time
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from dsjax.checkpoint.orbax_io import nonfinite_arrays, pytree_handler
from dsjax.checkpoint.safetensors_io import CheckpointError, listing
from dsjax.train.step import TrainState

log = logging.getLogger(__name__)

CHECKSUMS_FILE = "dsjax_checksums.json"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
# Written after the checksums: the commit markers, and orbax's step metadata (rewritten at commit).
_UNCHECKED = {CHECKSUMS_FILE, "commit_success.txt", "_CHECKPOINT_METADATA"}
_CHUNK = 16 << 20


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files are damaged: missing, truncated or edited (checksum mismatch), unreadable by orbax,
    or holding NaN/Inf values. Unlike a checkpoint saved with another config, falling back to an older one helps.
    """


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(root: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, n), root) for n in names if n not in _UNCHECKED]
    return sorted(out)


def write_checksums(step_dir: str) -> None:
    """Record size and CRC-32 of every file under ``step_dir`` in ``step_dir/dsjax_checksums.json``."""
    files = {rel: [os.path.getsize(os.path.join(step_dir, rel)), _crc32(os.path.join(step_dir, rel))]
             for rel in _files(step_dir)}  # fmt: skip
    tmp = os.path.join(step_dir, CHECKSUMS_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"algorithm": "crc32", "files": files}, f)
    os.replace(tmp, os.path.join(step_dir, CHECKSUMS_FILE))


def verify_checksums(step_dir: str, *, shard: int = 0, num_shards: int = 1) -> list[str]:
    """Problems with the files of ``step_dir`` against its checksum record (empty: all good, or no record).

    ``shard``/``num_shards`` split the files between processes so that each reads only its part.
    """
    path = os.path.join(step_dir, CHECKSUMS_FILE)
    if not os.path.exists(path):
        return []  # written by an older dsjax, or with checksums off: orbax's own checks only
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{path} is unreadable ({e})"]
    problems = []
    for i, (rel, (size, crc)) in enumerate(sorted(files.items())):
        if i % num_shards != shard:
            continue
        full = os.path.join(step_dir, rel)
        # A read error is a problem to report like the others, not an exception: the other processes are about to
        # wait for this one's verdict in a collective.
        try:
            if not os.path.exists(full):
                problems.append(f"{full} is missing")
            elif (actual := os.path.getsize(full)) != size:
                problems.append(f"{full} has {actual} bytes, {size} when saved (truncated?)")
            elif _crc32(full) != crc:
                problems.append(f"{full} differs from what was saved (CRC-32 mismatch: edited or corrupted)")
        except OSError as e:
            problems.append(f"{full} cannot be read ({e})")
    return problems


def _agree(ok: bool) -> bool:
    """True on every process iff ``ok`` on every process (a collective under several processes)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def _path_names(path) -> tuple[str, ...]:
    # Key paths of the run's state (namedtuple attributes, dict keys, indices) and of orbax's metadata tree (which
    # stores namedtuples as dicts and tuples as lists) compared as plain names.
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _differences(saved_tree, target) -> list[str]:
    """How the arrays recorded in a checkpoint's metadata differ from ``target`` (missing, extra, shape, dtype)."""
    saved = {_path_names(p): x for p, x in jax.tree_util.tree_leaves_with_path(saved_tree)}
    wanted = {_path_names(p): x for p, x in jax.tree_util.tree_leaves_with_path(target)}
    out = [f"{'/'.join(p)} (not in the checkpoint)" for p in wanted.keys() - saved.keys()]
    out += [f"{'/'.join(p)} (only in the checkpoint)" for p in saved.keys() - wanted.keys()]
    for p in wanted.keys() & saved.keys():
        a, b = saved[p], wanted[p]
        if tuple(a.shape) != tuple(b.shape):
            out.append(f"{'/'.join(p)} (shape {tuple(a.shape)} saved, {tuple(b.shape)} here)")
        elif np.dtype(a.dtype) != np.dtype(b.dtype):  # orbax would cast silently
            out.append(f"{'/'.join(p)} (dtype {np.dtype(a.dtype)} saved, {np.dtype(b.dtype)} here)")
    return out


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:500] if text else type(error).__name__


class _CheckpointManager(ocp.CheckpointManager):
    """Orbax's manager, minus its own calls into JAX's preemption sync service.

    The service needs one caller per process passing every step in increasing order; the training loop's
    :class:`~dsjax.train.preemption.StopGuard` is that caller, and force-saves the agreed step itself. Orbax would
    also report the step of a just-committed (older) checkpoint from its background thread, moving the process's
    counter back: a notice arriving then could set the stop step to one this process has already passed.
    """

    def reached_preemption(self, step: int) -> bool:
        return False


class TrainCheckpointer:
    """Save / restore train states under ``directory/<step>/``.

    Args:
      directory: where the step directories live (one shared directory for all processes).
      keep: how many of the newest checkpoints to keep (keep >= 2 leaves something to fall back to).
      every: save every ``every`` steps (and when forced).
      use_async: write in the background while training continues; False waits for each save.
      checksums: record and verify per-file CRC-32s. Costs one read-back of every file by process 0 per save (in
        the background, but it delays the commit) and one read of every file per restore (shared by the
        processes), at about 1.5-2 GB/s: turn it off for checkpoints of hundreds of GB.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int, every: int, use_async: bool = True,
                 checksums: bool = True):  # fmt: skip
        self.directory = os.path.abspath(os.fspath(directory))
        self._sync = not use_async
        self._checksums = checksums
        self._saving: int | None = None  # the step whose save may still be in flight
        # Save every `every` steps (and when forced); orbax's default policy would also save the first step.
        policy = ocp.checkpoint_managers.FixedIntervalPolicy(every)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_decision_policy=policy,
            # Always asynchronous internally: the checksum hook needs orbax's AsyncCheckpointer (use_async=False
            # waits after each save instead).
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._before_commit),
            create=True,
            cleanup_tmp_directories=True,  # partial saves of a killed run
        )
        # Handlers named up front, so that a fresh manager can read a checkpoint's metadata before any restore.
        handlers = {"state": pytree_handler(), "data": ocp.JsonCheckpointHandler()}
        self._manager = _CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        """The newest committed checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of all committed checkpoints, oldest first (partial saves are not listed)."""
        return sorted(self._manager.all_steps())

    def _before_commit(self) -> None:
        # Orbax calls this on process 0 once every process has written its part, before the atomic rename.
        if not self._checksums or self._saving is None:
            return
        candidates = glob.glob(os.path.join(self.directory, f"{self._saving}{_TMP_SUFFIX}*"))
        if len(candidates) != 1:
            # Raised here, the save fails (reported by the next save or wait) and the step is not committed.
            raise CheckpointError(
                f"cannot record checksums of checkpoint {self._saving}: expected one temporary directory "
                f"{self._saving}{_TMP_SUFFIX}* in {self.directory}, found {len(candidates)} (a storage backend that "
                "commits in place, or a concurrent writer?). Set train.checkpoint_checksums=false for such storage."
            )
        write_checksums(candidates[0])

    def _failed(self, error: BaseException) -> CheckpointError:
        step = self._saving
        self._saving = None
        # The partial directory stays until the next run opens the directory (orbax removes it then): another
        # process may still be writing into it now, and this run stops on the error anyway.
        self._manager.reload()  # orbax forgets committed steps after a failed save
        previous = self._manager.latest_step()
        kept = (f"The earlier checkpoint {previous} is intact and a new run resumes from it." if previous is not None
                else "There is no earlier checkpoint.")  # fmt: skip
        return CheckpointError(f"saving checkpoint {step} in {self.directory} failed: {error}. {kept}")

    def save(self, step: int, state: TrainState, data_state: dict, *, force: bool = False) -> bool:
        """Start saving (returns at once when asynchronous); False if ``step`` is not a save step.

        A step that does not save returns at once, even while an earlier save is still being written.

        Raises:
          CheckpointError: this save, or the previous asynchronous one, failed (e.g. the disk is full). A failure
            of a background save is raised by the next saving step (or :meth:`wait`, :meth:`close`).
        """
        # Decided first, without waiting: the step after a save must not block on that save's write and checksums.
        # (A host-side decision: no device sync, no collective.)
        if not (force or self._manager.should_save(step)):
            return False
        try:
            self._manager.wait_until_finished()  # raises the previous save's error, naming that step
        except Exception as e:  # orbax re-raises whatever its writer threads hit
            raise self._failed(e) from e
        # Only now: the previous save's commit callback (finished above) reads it in the background.
        self._saving = step
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(state._asdict()), data=ocp.args.JsonSave(data_state))
        try:
            saved = self._manager.save(step, args=args, force=force)
            if saved and self._sync:
                self._manager.wait_until_finished()
        except Exception as e:
            raise self._failed(e) from e
        if not saved:
            self._saving = None
        return saved

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed.

        Raises:
          CheckpointError: the pending save failed.
        """
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._failed(e) from e
        self._saving = None

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """Restore ``step`` (default: the latest) into the shapes, dtypes and shardings of ``abstract_state``.

        Raises:
          DamagedCheckpointError: a file that is missing, truncated or edited (named); metadata or arrays orbax
            cannot read; a NaN/Inf in any array (named).
          CheckpointError: no checkpoint; an intact one that does not fit this run's state (saved with another
            model or optimizer config: the differing arrays are named).
        """
        step = self._manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        step_dir = os.path.join(self.directory, str(step))
        problems = verify_checksums(step_dir, shard=jax.process_index(), num_shards=jax.process_count())
        if not _agree(not problems):
            detail = "; ".join(problems) if problems else "another process found damaged files (see its log)"
            raise DamagedCheckpointError(f"checkpoint {step} is damaged: {detail}")
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state._asdict()
        )
        # The saved tree, shapes and dtypes against this run's, before reading any array: a mismatch is a config
        # change, not damage (so fallback must not move the checkpoint aside), and orbax would cast dtypes silently.
        error, differences = None, []
        try:
            saved = self._manager.item_metadata(step)["state"]
            if saved is None:
                raise ValueError("no metadata for the state")
            differences = _differences(getattr(saved, "tree", saved), target)
        except Exception as e:  # missing or corrupt metadata files: orbax raises assorted types
            error = _first_line(e)
        if not _agree(error is None):
            raise DamagedCheckpointError(
                f"checkpoint {step} in {step_dir}: its metadata cannot be read: {error or 'on another process'}"
            )
        if not _agree(not differences):
            raise CheckpointError(
                f"checkpoint {step} in {step_dir} does not fit this run's state (saved with another model or "
                f"optimizer config?): {listing(differences, 10) if differences else 'differs on another process'}. "
                "Run with the config it was saved with, or start afresh in another directory."
            )
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
                    ),
                    data=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:  # orbax raises bare Exceptions for tensorstore read errors
            error = _first_line(e)
        if not _agree(error is None):
            raise DamagedCheckpointError(
                f"checkpoint {step} in {step_dir} cannot be read: {error or 'failed on another process (see its log)'}"
            )
        bad = nonfinite_arrays(restored["state"])
        if bad:
            raise DamagedCheckpointError(
                f"checkpoint {step} in {step_dir} holds NaN/Inf values in {', '.join(bad[:10])}"
            )
        return TrainState(**restored["state"]), restored["data"]

    def restore_latest(self, abstract_state: TrainState, *, fallback: bool = False):
        """Restore the newest checkpoint: ``(state, data_state, step)``, or None when there is none.

        With ``fallback``, a damaged checkpoint (:class:`DamagedCheckpointError`) is skipped with a warning and the
        next older one tried; once one restores, the damaged newer ones are moved into ``<directory>.rejected/``
        (kept for inspection, out of the way of new saves). Nothing is moved when none restores, nor for a
        checkpoint that does not fit the run's state (a config change: that error is raised at once).

        Raises:
          DamagedCheckpointError: the newest checkpoint is damaged (without ``fallback``).
          CheckpointError: a checkpoint does not fit this run's state, or (with ``fallback``) none restores.
        """
        damaged = []
        for step in reversed(self.all_steps()):
            try:
                state, data_state = self.restore(abstract_state, step)
            except DamagedCheckpointError as e:
                if not fallback:
                    raise DamagedCheckpointError(
                        f"{e}\nResume from the previous checkpoint with --resume fallback (train(resume='fallback'))"
                    ) from None
                log.warning("%s; trying the previous checkpoint", e)
                damaged.append((step, str(e)))
                continue
            # Moved only now that a good one restored: had none, a new run would have silently started over.
            for bad_step, _ in damaged:
                log.warning("moved damaged checkpoint %d to %s", bad_step, self.reject(bad_step))
            return state, data_state, step
        if damaged:
            raise CheckpointError(
                "no checkpoint could be restored (none was moved):\n" + "\n".join(e for _, e in damaged)
            )
        return None

    def reject(self, step: int) -> str:
        """Move checkpoint ``step`` out of the managed directory (into ``<directory>.rejected/``)."""
        dest = os.path.join(f"{self.directory}.rejected", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"dsjax_reject_checkpoint_{step}")
        self._manager.reload()
        return dest

    def close(self) -> None:
        """Wait for a pending save (raising its error) and release orbax's resources."""
        try:
            self.wait()
        finally:
            self._manager.close()
