"""Process setup for the scripts: run on a memory allocator that keeps freed pages mapped.

XLA:CPU allocates each execution's temporaries as one large block and frees it when the execution ends (125 MB
for the tiny train step of ``scripts/bench.py train``). glibc's malloc serves a block that large with ``mmap``
and gives it back with ``munmap``, so every step page-faults the whole block in again: about 32,000 minor
faults and 80 ms of kernel time per 160 ms step on a 2-core machine (measured). mimalloc with purging off
keeps the pages and reuses them (1 fault per step; the step took 0.75x the time). An allocator must be loaded
before the process starts, so :func:`preload_allocator` re-executes the script once with ``LD_PRELOAD`` set.

``DSJAX_ALLOCATOR=system`` keeps the C library's malloc; an allocator already in ``LD_PRELOAD`` (tcmalloc,
as TPU VM images preload, jemalloc or mimalloc) is left as it is.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

ENV_SWITCH = "DSJAX_ALLOCATOR"
_ALLOCATORS = ("mimalloc", "tcmalloc", "jemalloc")


def mimalloc_library() -> str | None:
    """Path of the mimalloc shared library installed by the ``cmeel-mimalloc`` wheel, or None."""
    try:
        files = importlib.metadata.files("cmeel-mimalloc") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    libs = sorted(str(f.locate()) for f in files if f.name.startswith("libmimalloc.so"))
    return libs[0] if libs else None


def active_allocator() -> str:
    """Which allocator this process runs on: ``mimalloc``, ``tcmalloc``, ``jemalloc`` or ``system``."""
    try:
        with open("/proc/self/maps") as maps:
            mapped = maps.read()
    except OSError:  # not Linux
        return "system"
    return next((name for name in _ALLOCATORS if f"lib{name}" in mapped), "system")


def preload_allocator() -> None:
    """Re-execute the current script with mimalloc preloaded, unless an allocator is already preloaded,
    ``DSJAX_ALLOCATOR=system`` is set, the platform is not Linux or the library is not installed.

    Call it first thing in a script's entry point: the process is replaced, so work done before is repeated.
    """
    if sys.platform != "linux" or os.environ.get(ENV_SWITCH, "").lower() == "system":
        return
    preload = os.environ.get("LD_PRELOAD", "")
    if any(f"lib{name}" in preload for name in _ALLOCATORS):
        return  # already preloaded (by us before the re-exec, or by the user): no loop
    library = mimalloc_library()
    if library is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
    # Never return freed pages to the OS: the next step asks for the same blocks again.
    env.setdefault("MIMALLOC_PURGE_DELAY", "-1")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
