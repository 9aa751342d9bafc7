"""Fork-server worker of :mod:`dsjax.coder.sandbox`: runs untrusted Python programs one at a time.

The pool starts this file as a script (``python -I -B _sandbox_worker.py CONFIG_JSON``), so it imports only the
standard library (never jax, never dsjax). Where the kernel allows, the worker first moves into new PID, network
and (as root) mount namespaces: the process that serves requests is then the namespace's init, which can kill
every process a program left behind with one ``kill(-1)``, and whose death takes the whole namespace with it.
Per program it forks a child that applies the limits, drops to an unprivileged uid and ``exec``s the source in
the already-warm interpreter (no interpreter start per program).

Protocol, on the worker's stdin/stdout: the worker sends a hello message first; then each request is a program
(its UTF-8 bytes) and each answer one message. A message is a 4-byte little-endian length and that much JSON.
"""

import contextlib
import ctypes
import errno
import fcntl
import json
import math
import os
import re
import resource
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
import traceback
import types

# Modules HumanEval-style programs import, loaded once here so a forked program finds them warm (and, in the
# no-namespace mode, whether or not the sandbox uid may read the interpreter's files).
PRELOAD = ("bisect", "collections", "copy", "dataclasses", "decimal", "fractions", "functools", "hashlib", "heapq",
           "itertools", "linecache", "operator", "random", "statistics", "string", "typing")  # fmt: skip

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
MS_PRIVATE = 1 << 18
MS_KEEP = {"nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
SANDBOX_ID = 65534  # nobody / nogroup: programs run under it when the worker is root
TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")  # world-writable places: private tmpfs mounts in the namespace
RESULT_FD = 3
REPORT_CAP = 4096

_libc = ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _call(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else os.fsencode(s)
    _call(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _prctl(option: int, arg: int) -> None:
    _call(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), "prctl")


# ---- framing ---------------------------------------------------------------------------------------------------
def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _send(fd: int, message: dict) -> None:
    data = json.dumps(message).encode()
    data = struct.pack("<I", len(data)) + data
    while data:
        data = data[os.write(fd, data) :]


# ---- worker start: namespaces and the file system view -------------------------------------------------------
def _enter_namespaces(cfg: dict, iso: dict, keep_fds: tuple[int, ...]) -> None:
    """Unshare PID + network (+ mount as root, + user otherwise) namespaces and fork the namespace's init, which
    returns from here and serves; this process stays outside as its parent and exits with it."""
    root = os.geteuid() == 0
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWPID | (0 if cfg["network"] else CLONE_NEWNET) | (CLONE_NEWNS if root else CLONE_NEWUSER)
    try:
        _call(_libc.unshare(ctypes.c_int(flags)), "unshare")
        if not root:  # the same uid inside, so files keep their owners; no setgroups in the namespace
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
    except OSError as e:
        iso["fallbacks"].append(f"no namespaces ({e}): process cleanup by session and /proc scan")
        return
    pid = os.fork()
    if pid:
        for fd in keep_fds:
            os.close(fd)
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0x7F)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the pool kills the outer process: take the namespace down too
    iso.update(pid_namespace=True, network="namespace" if not cfg["network"] else "allowed")
    if root:
        try:
            _private_file_system(cfg, iso)
        except OSError as e:  # never serve with a half-made file system view
            print(f"dsjax sandbox worker: mount namespace setup failed ({e}); SandboxConfig(namespaces=False) "
                  "runs without namespaces", file=sys.stderr)  # fmt: skip
            os._exit(1)


def _hidden_ancestor(path: str) -> str | None:
    """The top-most directory on ``path`` that other users cannot search (e.g. /root holding a pyenv)."""
    current = "/"
    for part in path.strip("/").split("/"):
        current = os.path.join(current, part)
        if not os.stat(current).st_mode & 0o001:
            return current
    return None


def _private_file_system(cfg: dict, iso: dict) -> None:
    """In the worker's mount namespace: mounts stop propagating to the host, the interpreter's directories are
    reachable by the sandbox uid, everything is read-only, and /proc shows only the namespace's processes."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    wanted = [sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(sys.executable), *sys.path]
    hidden: dict[str, list[str]] = {}
    for path in sorted({os.path.realpath(p) for p in wanted if p and os.path.isdir(p)}):
        top = _hidden_ancestor(path)
        if top and not any(path.startswith(q + "/") for q in hidden.get(top, [])):
            hidden.setdefault(top, []).append(path)
    for top, paths in hidden.items():
        fds = [os.open(p, os.O_PATH | os.O_DIRECTORY) for p in paths]  # handles survive covering ``top``
        _mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
        for path, fd in zip(paths, fds):
            os.makedirs(path, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            os.close(fd)
    failed = []
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
        flags |= sum(bit for name, bit in MS_KEEP.items() if name in fields[5].split(","))
        try:
            _mount(None, target, None, flags)
        except OSError:
            failed.append(target)
    if failed:
        iso["fallbacks"].append(f"{len(failed)} mounts could not be made read-only: {failed[:5]}")
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    # The only writable places: this worker's own tmpfs mounts, emptied after every program (cheaper than new
    # mounts per program, and as fresh: every process of the last program is dead by then).
    options = f"size={cfg['max_file_mb']}m,nr_inodes=4096,mode=0700,uid={SANDBOX_ID},gid={SANDBOX_ID}"
    for d in TMP_DIRS:
        if os.path.isdir(d):
            _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, options)
    iso.update(mount_namespace=True, filesystem="read-only except /tmp /var/tmp /dev/shm: tmpfs, emptied per program")


def _empty_tmp_dirs() -> None:
    for d in TMP_DIRS:
        if os.path.isdir(d):
            for entry in os.scandir(d):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            os.chown(d, SANDBOX_ID, SANDBOX_ID)  # undo whatever the program did to the directory itself
            os.chmod(d, 0o700)


# ---- the program's process -------------------------------------------------------------------------------------
def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _block_network() -> None:
    """In-process fallback when there is no network namespace: sockets cannot be created (ctypes can bypass)."""
    import _socket

    class NoNetwork(_socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError(errno.EACCES, "network access is disabled in this sandbox")

    _socket.socket = socket.socket = socket.SocketType = NoNetwork


def _child(source: bytes, fds: tuple[int, int, int, int], setup_fd: int, workdir: str, cfg: dict, iso: dict) -> None:
    """Set up the program's process (never returns): session, descriptors, limits, uid, then run. Setup errors
    go to ``setup_fd``, closed before the program starts (so a program cannot fake one)."""
    os.setsid()
    os.chdir(workdir)
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in fds]  # out of the way of the targets 0-3
    for target, fd in enumerate(high):
        os.dup2(fd, target)
    os.closerange(RESULT_FD + 1, setup_fd)  # the pool's pipes above all
    os.closerange(setup_fd + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    setlimit = lambda which, n: resource.setrlimit(which, (n, n))
    setlimit(resource.RLIMIT_CORE, 0)
    resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(cfg["cpu_s"]), math.ceil(cfg["cpu_s"]) + 1))
    setlimit(resource.RLIMIT_FSIZE, cfg["max_file_mb"] << 20)
    setlimit(resource.RLIMIT_NOFILE, cfg["max_open_files"])
    setlimit(resource.RLIMIT_NPROC, cfg["nproc"])
    if os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(SANDBOX_ID, SANDBOX_ID, SANDBOX_ID)
        os.setresuid(SANDBOX_ID, SANDBOX_ID, SANDBOX_ID)
    elif iso["pid_namespace"]:  # in our user namespace this process holds every capability: give them up
        _call(_libc.capset(ctypes.byref(_CapHeader(0x20080522, 0)), ctypes.byref((_CapData * 2)())), "capset")
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # relative to what this interpreter already maps: an absolute limit below it would fail every program
    setlimit(resource.RLIMIT_AS, _vm_size() + (cfg["memory_mb"] << 20))
    os.environ.clear()
    os.environ.update(cfg["env"], HOME=workdir, TMPDIR=workdir)
    tempfile.tempdir = None
    if iso["network"] == "blocked in-process":
        _block_network()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.close(setup_fd)
    _execute(source)


def _execute(source: bytes) -> None:
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    sys.argv = ["<program>"]
    me = os.getpid()
    status, exception = "passed", None
    try:
        import linecache

        linecache.cache["<program>"] = (len(source), None, source.decode(errors="replace").splitlines(True), "")
        exec(compile(source, "<program>", "exec", dont_inherit=True), main.__dict__)
    except MemoryError:
        status, exception = "memory", "MemoryError"
    except SystemExit:  # an early exit skips the tests: it must never count as a pass
        status, exception = "error", "SystemExit"
    except BaseException as e:
        status, exception = "failed" if isinstance(e, AssertionError) else "error", type(e).__name__[:200]
        with contextlib.suppress(BaseException):
            traceback.print_exception(e)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):  # closed or replaced by the program: its output, its business
            stream.flush()
    if os.getpid() == me:  # a forked child of the program ending here must not report for it
        with contextlib.suppress(OSError):
            os.write(RESULT_FD, (json.dumps({"status": status, "exception": exception}) + "\n").encode())
    os._exit(0)


# ---- serving -----------------------------------------------------------------------------------------------------
def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _reap_all(block: bool) -> bool:
    """Reap exited children; False when there are no children left at all."""
    while True:
        try:
            pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def _kill_leftovers(pid_namespace: bool) -> None:
    """Kill every process the program left (setsid'd, double-forked or not). Orphans come back to this process:
    it is the namespace's init, or else a child subreaper."""
    for _ in range(1000):
        if not _reap_all(block=False):
            return
        if pid_namespace:
            with contextlib.suppress(ProcessLookupError):
                os.kill(-1, signal.SIGKILL)  # from a namespace's init: everything in it but itself
            _reap_all(block=True)
        else:
            for pid in _descendants(os.getpid()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.001)
    print("dsjax sandbox worker: processes left after 1000 kill rounds", file=sys.stderr)


def _run_one(source: bytes, cfg: dict, iso: dict, base: str | None, request_fd: int) -> dict:
    if iso["mount_namespace"]:
        workdir = "/tmp"  # the worker's tmpfs, empty
    else:
        workdir = tempfile.mkdtemp(prefix="run-", dir=base)
        if os.geteuid() == 0:
            os.chown(workdir, SANDBOX_ID, SANDBOX_ID)
    pipes = [os.pipe() for _ in range(4)]  # stdout, stderr, result, setup errors
    null = os.open(os.devnull, os.O_RDWR)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            _child(source, (null, pipes[0][1], pipes[1][1], pipes[2][1]), pipes[3][1], workdir, cfg, iso)
        except BaseException as e:  # a setup failure is the sandbox's, not the program's
            os.write(pipes[3][1], f"{type(e).__name__}: {e}".encode())
        os._exit(125)
    os.close(null)
    readers = {}
    for (r, w), cap in zip(pipes, (cfg["max_output_bytes"], cfg["max_output_bytes"], REPORT_CAP, REPORT_CAP)):
        os.close(w)
        os.set_blocking(r, False)
        readers[r] = [bytearray(), cap]

    def drain(fd: int) -> None:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        if not chunk:
            os.close(fd)
            readers.pop(fd)
        buf, cap = readers.get(fd, (None, 0))
        if buf is not None and len(buf) < cap:
            buf += chunk[: cap - len(buf)]  # beyond the cap output is read and dropped: the writer never blocks

    outputs = {r: readers[r][0] for r, _ in pipes}
    pidfd = os.pidfd_open(pid)
    deadline, timed_out, caller_gone = start + cfg["timeout_s"], False, False
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        ready = select.select([*readers, pidfd, request_fd], [], [], remaining)[0]
        if request_fd in ready:  # the pool sends nothing mid-run: this is EOF, the caller is gone
            caller_gone = True
            break
        for fd in ready:
            if fd in readers:
                drain(fd)
        if pidfd in ready:
            break
    if timed_out or caller_gone:
        os.kill(pid, signal.SIGKILL)
    _, wait_status, usage = os.wait4(pid, 0)
    duration = time.monotonic() - start
    os.close(pidfd)
    _kill_leftovers(iso["pid_namespace"])
    if caller_gone:
        sys.exit(0)
    end = time.monotonic() + 1.0  # every writer is dead now; bounded anyway
    while readers and time.monotonic() < end:
        for fd in select.select(list(readers), [], [], 0.05)[0]:
            drain(fd)
    for fd in list(readers):
        os.close(fd)
    if iso["mount_namespace"]:
        _empty_tmp_dirs()
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    stdout, stderr, report, setup_error = (outputs[r].decode(errors="replace") for r, _ in pipes)
    result = dict(stdout=stdout, stderr=stderr, duration_s=duration)
    if setup_error:
        return dict(result, setup_error=setup_error)
    lines = report.strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else None
    except ValueError:
        report = None
    cpu = usage.ru_utime + usage.ru_stime
    if timed_out:
        return dict(result, status="timeout", exception=None)
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= math.ceil(cfg["cpu_s"]) - 0.05):
            return dict(result, status="timeout", exception=name)
        if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
            return dict(result, status="memory", exception=name)
        return dict(result, status="killed", exception=name)
    code = os.WEXITSTATUS(wait_status)
    if code == 0 and isinstance(report, dict) and report.get("status") in ("passed", "failed", "error", "memory"):
        exception = report.get("exception")
        return dict(result, status=report["status"], exception=None if exception is None else str(exception))
    return dict(result, status="killed", exception=f"exit status {code}")  # e.g. os._exit(): tests not reached


def main() -> None:
    cfg = json.loads(sys.argv[1])
    # The protocol moves off fds 0/1, which become /dev/null: sys.stdin/stdout, inherited by every program, must
    # never reach the pool.
    request_fd, reply_fd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    root = os.geteuid() == 0
    iso = dict(pid_namespace=False, mount_namespace=False, network="allowed" if cfg["network"] else None,
               filesystem="temporary directory", uid=SANDBOX_ID if root else os.getuid(), fallbacks=[])  # fmt: skip
    if cfg["namespaces"]:
        _enter_namespaces(cfg, iso, (request_fd, reply_fd))
    else:
        iso["fallbacks"].append("namespaces disabled by the config: process cleanup by session and /proc scan")
    if not iso["pid_namespace"]:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of a program come back here, to be killed
    if iso["network"] is None:
        iso["network"] = "blocked in-process"
        iso["fallbacks"].append("no network namespace: socket creation blocked in-process only")
    if not root:
        iso["fallbacks"].append("not root: programs run as the calling user; the process limit counts its processes")
        # RLIMIT_NPROC counts all of the uid's processes: leave room for the ones it already has
        cfg["nproc"] = cfg["max_processes"] + len(_own_pids())
    else:
        cfg["nproc"] = cfg["max_processes"]
    for name in PRELOAD:
        __import__(name)
    base = None
    if not iso["mount_namespace"]:  # programs' directories go in here; the sandbox uid may enter, not list
        base = tempfile.mkdtemp(prefix="dsjax-sandbox-")
        os.chmod(base, 0o711)
    try:
        _send(reply_fd, {"hello": True, "isolation": iso, "base_dir": base})
        while True:
            header = _read_exact(request_fd, 4)
            source = header and _read_exact(request_fd, struct.unpack("<I", header)[0])
            if source is None:  # the pool closed the pipe, or its process is gone
                return
            _send(reply_fd, _run_one(source, cfg, iso, base, request_fd))
    finally:
        if base:
            shutil.rmtree(base, ignore_errors=True)


def _own_pids() -> list[str]:
    pids = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and os.stat(f"/proc/{name}").st_uid == os.getuid():
                pids.append(name)
        except OSError:
            pass
    return pids


if __name__ == "__main__":
    main()
