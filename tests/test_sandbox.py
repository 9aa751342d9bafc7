"""The code sandbox: outcomes, output capture, the pool, and hostile programs (each contained, nothing left).

Hostile programs run in two sandboxes: the full isolation this machine allows (namespaces where the kernel
lets us) and the forced no-namespace fallback. After each: the caller had its answer within the timeout plus a
little, no process of the program survives (no descendant of any worker but a namespace's init; no process
whose command line carries the test's marker), and no file the test watches outside the sandbox changed.
"""

import json
import os
import signal
import socket
import threading
import time
import uuid

import pytest

from dsjax.coder.sandbox import STATUSES, RunResult, Sandbox, SandboxConfig, SandboxError, run_programs

TIMEOUT = 2.0
SLACK = 3.0  # cleanup and scheduling on a loaded 2-core machine
MARKER = f"dsjax-sandbox-test-{uuid.uuid4().hex[:12]}"
PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**kw) -> SandboxConfig:
    return SandboxConfig(**{**dict(timeout_s=TIMEOUT, workers=2, memory_mb=256, max_file_mb=16), **kw})


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(_config()) as sb:
        yield sb


@pytest.fixture(scope="module", params=["full", "fallback"])
def any_sandbox(request):
    with Sandbox(_config(namespaces=request.param == "full")) as sb:
        yield sb


# ---- helpers -------------------------------------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            out.setdefault(ppid, []).append(int(name))
    return out


def _strays(sb: Sandbox) -> list[int]:
    """Processes under the sandbox's workers other than each worker's namespace init (programs are over)."""
    children, found = _children(), []
    for worker in list(sb._pool.live):
        top = children.get(worker.proc.pid, [])
        if worker.isolation["pid_namespace"]:  # worker -> init (the server) -> nothing
            assert len(top) == 1, top
            top = children.get(top[0], [])
        todo = list(top)
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
    return found


def _marked() -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if MARKER.encode() in f.read():
                    out.append(int(name))
        except (OSError, ValueError):
            pass
    return [p for p in out if p != os.getpid()]


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _run_contained(sb: Sandbox, program: str) -> RunResult:
    start = time.monotonic()
    result = sb.run(program)
    assert time.monotonic() - start < TIMEOUT + SLACK
    assert result.status in STATUSES
    deadline = time.monotonic() + 1.0  # SIGKILLed processes may take a moment to vanish from /proc
    while (_strays(sb) or _marked()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _strays(sb) == [] and _marked() == []
    return result


# ---- outcomes --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "program, status, exception",
    [
        ("assert sum([1, 2]) == 3", "passed", None),
        ("import math\nassert math.gcd(4, 6) == 2\nimport sys\nsys.stdout.flush()", "passed", None),
        ("assert 1 == 2, 'nope'", "failed", "AssertionError"),
        ("1 / 0", "error", "ZeroDivisionError"),
        ("def f(:\n  pass", "error", "SyntaxError"),
        ("def f(n):\n    return f(n + 1)\nf(0)", "error", "RecursionError"),
        ("import sys\nsys.exit(0)\nassert False", "error", "SystemExit"),  # an early exit is never a pass
        ("raise KeyboardInterrupt", "error", "KeyboardInterrupt"),
        ("x = bytearray(8 << 30)", "memory", "MemoryError"),
        ("chunks = []\nwhile True:\n    chunks.append(bytes(10**8))", "memory", "MemoryError"),
        ("while True:\n    pass", "timeout", None),
        ("import time\ntime.sleep(60)", "timeout", None),
        ("import os\nos._exit(3)", "killed", "exit status 3"),
        ("import os\nos._exit(0)\nassert False", "killed", "exit status 0"),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "killed", "SIGKILL"),
        ("import ctypes\nctypes.string_at(0)", "killed", "SIGSEGV"),
    ],
)
def test_outcomes(sandbox, program, status, exception):
    result = _run_contained(sandbox, program)
    assert (result.status, result.exception) == (status, exception), result
    assert result.passed == (status == "passed")
    assert 0 < result.duration_s < TIMEOUT + 1


def test_programs_cannot_fake_a_setup_error(sandbox):
    program = "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'fake\\n')\n    except OSError:\n"
    result = sandbox.run(program + "        pass\nraise ValueError")
    assert (result.status, result.exception) == ("error", "ValueError")


def test_a_setup_failure_raises():
    too_many = 1 << 21  # above the kernel's default nr_open (2**20): setting the limit fails in the child
    with Sandbox(_config(workers=1, max_open_files=too_many)) as sb, pytest.raises(SandboxError, match="set a program"):
        sb.run("pass")


def test_cpu_limit_is_a_timeout():
    with Sandbox(_config(timeout_s=20.0, cpu_s=1.0, workers=1)) as sb:
        start = time.monotonic()
        result = sb.run("while True:\n    pass")
        assert result.status == "timeout" and result.exception in ("SIGXCPU", "SIGKILL")
        assert time.monotonic() - start < 5.0  # the CPU limit, not the 20 s wall clock


def test_output_capture_and_cap(sandbox):
    program = "import sys\nprint('out ✓')\nprint('err', file=sys.stderr)\nsys.stdout.flush()\n"
    result = sandbox.run(program + "sys.stdout.buffer.write(b'\\xff')")
    assert result.status == "passed" and result.stdout == "out ✓\n\ufffd" and result.stderr == "err\n"
    failed = sandbox.run("print('before')\nassert 2 + 2 == 5")
    assert failed.stdout == "before\n" and "AssertionError" in failed.stderr and "assert 2 + 2 == 5" in failed.stderr
    with Sandbox(_config(max_output_bytes=10, workers=1)) as small:
        capped = small.run("import sys\nprint('0123456789abcdef')\nsys.stderr.write('x' * 100)")
    assert capped.stdout == "0123456789" and capped.stderr == "x" * 10


def test_environment_is_scrubbed(sandbox, monkeypatch):
    monkeypatch.setenv("DSJAX_TEST_SECRET", "hunter2")
    result = sandbox.run("import json, os, sys\nprint(json.dumps([dict(os.environ), os.getcwd(), sys.stdin.read()]))")
    assert result.status == "passed", result
    assert "hunter2" not in result.stdout and "DSJAX_TEST_SECRET" not in result.stdout
    env, cwd, stdin = json.loads(result.stdout)
    assert env["HOME"] == env["TMPDIR"] == cwd and env["PATH"] == "/usr/local/bin:/usr/bin:/bin" and stdin == ""
    assert env["OPENBLAS_NUM_THREADS"] == env["OMP_NUM_THREADS"] == "1" and env["PYTHONDONTWRITEBYTECODE"] == "1"


@pytest.mark.parametrize("namespaces", [True, False])
def test_each_program_gets_a_fresh_directory(namespaces):
    with Sandbox(_config(workers=1, namespaces=namespaces)) as sb:  # one worker: the programs follow each other
        first = sb.run("import os\nos.makedirs('d/e')\nopen('d/left.txt', 'w').write('x')\nprint(os.getcwd())")
        sb.run("import os\nos.chmod('.', 0)")  # a program that locks its own directory does not lock the next
        second = sb.run(
            "import os\nassert os.listdir('.') == [], os.listdir('.')\nopen('new', 'w')\nprint(os.getcwd())"
        )
    assert first.status == second.status == "passed", (first, second)
    if not sb.isolation["mount_namespace"]:  # on-disk directories: distinct, and removed
        assert first.stdout != second.stdout and not os.path.exists(first.stdout.strip())


def test_isolation_is_reported(any_sandbox):
    iso = any_sandbox.isolation
    assert set(iso) >= {"pid_namespace", "mount_namespace", "network", "filesystem", "uid", "fallbacks"}
    assert iso["network"] in ("namespace", "blocked in-process")
    full = iso["pid_namespace"] and iso["mount_namespace"] and iso["network"] == "namespace"
    assert full or iso["fallbacks"], iso  # anything weaker than the full set says why
    if os.geteuid() == 0:
        assert iso["uid"] == 65534 and any_sandbox.run("import os\nassert os.getuid() == 65534").passed


# ---- the pool ----------------------------------------------------------------------------------------------------
def test_run_many_keeps_order(sandbox):
    programs = [f"import time\ntime.sleep({(7 * i) % 5 / 100})\nprint({i})" for i in range(12)]
    results = sandbox.run_many(programs)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(12)]
    assert sandbox.run_many([]) == []


def test_run_programs():
    results = run_programs(["assert True", "assert False"], timeout_s=5.0, workers=1)
    assert [r.status for r in results] == ["passed", "failed"]


def test_worker_crash_is_detected_and_replaced():
    with Sandbox(_config(workers=1)) as sb:
        assert sb.run("pass").passed
        (worker,) = sb._pool.live
        killer = threading.Timer(0.5, os.killpg, (worker.proc.pid, signal.SIGKILL))
        killer.start()
        start = time.monotonic()
        result = sb.run("import time\ntime.sleep(30)")
        killer.join()
        assert (result.status, result.exception) == ("killed", "SandboxWorkerLost")
        assert time.monotonic() - start < TIMEOUT + SLACK
        assert sb.run("print('again')").stdout == "again\n"  # a fresh worker
        (replacement,) = sb._pool.live
        assert replacement is not worker and worker.proc.poll() is not None


def test_close_kills_running_programs_and_workers():
    sb = Sandbox(_config(timeout_s=30.0, workers=2))
    results = []
    runner = threading.Thread(target=lambda: results.append(sb.run("import time\ntime.sleep(60)")))
    runner.start()
    time.sleep(1.0)
    workers = list(sb._pool.live)
    assert workers
    start = time.monotonic()
    sb.close()
    runner.join(timeout=10)
    assert not runner.is_alive() and time.monotonic() - start < 10
    assert results[0].status in ("killed", "timeout")
    assert all(w.proc.poll() is not None for w in workers)
    assert not any(os.path.exists(f"/proc/{w.proc.pid}") for w in workers)
    with pytest.raises(SandboxError, match="closed"):
        sb.run("pass")
    sb.close()  # idempotent


def test_run_rejects_non_text(sandbox):
    with pytest.raises(TypeError, match="str"):
        sandbox.run(b"print(1)")
    assert sandbox.run("x = '\udcff'").status == "error"  # a lone surrogate: not valid UTF-8 source


@pytest.mark.parametrize(
    "field, value",
    [("timeout_s", 0), ("timeout_s", -1.0), ("timeout_s", "10"), ("cpu_s", 0.0), ("memory_mb", 8),
     ("memory_mb", 1.5), ("max_file_mb", 0), ("max_open_files", 4), ("max_processes", 0),
     ("max_output_bytes", -1), ("workers", 0), ("workers", True), ("network", 1), ("namespaces", "yes")],
)  # fmt: skip
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=f"SandboxConfig.{field}"):
        SandboxConfig(**{field: value})


def test_config_is_frozen_and_keyword_only():
    with pytest.raises(TypeError):
        SandboxConfig(5.0)
    cfg = SandboxConfig()
    assert cfg.timeout_s == 10.0 and cfg.effective_cpu_s == 11.0 and 1 <= cfg.workers <= 4 and not cfg.network
    with pytest.raises(AttributeError):
        cfg.timeout_s = 1.0


# ---- hostile programs ------------------------------------------------------------------------------------------
_SLEEPER = f"""
try:  # a marked process where the sandbox uid may run the interpreter, else a plain forked sleeper
    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(1000)", "{MARKER}"])
except OSError:
    time.sleep(1000)
"""


def _indent(code: str, by: str) -> str:
    return "".join(by + line + "\n" for line in code.strip().splitlines())


def _hostile(name: str, tmp: str, port: int) -> tuple[str, set[str]]:
    """The program and its acceptable statuses."""
    outside = [f"/tmp/{MARKER}", f"/var/tmp/{MARKER}", f"/dev/shm/{MARKER}", f"../{MARKER}", f"{tmp}/{MARKER}",
               f"{PROJECT}/{MARKER}", f"/{MARKER}"]  # fmt: skip
    write_outside = f"""
for path in {outside!r}:
    try:
        open(path, "w").write("x")
    except OSError:
        pass
"""
    write_1gb = """
with open("big", "wb") as f:
    for _ in range(1024):
        f.write(bytes(1 << 20))
"""
    print_100mb = """
import sys
chunk = "x" * (1 << 20)
for _ in range(100):
    sys.stdout.write(chunk)
"""
    grandchild = f"""
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
{_indent(_SLEEPER, "        ")}
    os._exit(0)
os.wait()
"""
    grandchild_parent_sleeps = f"""
import os, sys, time
if os.fork() == 0:
    os.setsid()
{_indent(_SLEEPER, "    ")}
time.sleep(1000)
"""
    programs = {
        "infinite loop": ("while True:\n    pass", {"timeout"}),
        "fork bomb": ("import os\nwhile True:\n    os.fork()", {"error", "timeout", "killed"}),
        "memory bomb": ("x = 'x' * (64 << 30)", {"memory"}),
        "1 GB write": (write_1gb, {"error"}),  # RLIMIT_FSIZE (and the tmpfs size): OSError
        "write outside": (write_outside, {"passed"}),
        "socket to 127.0.0.1": (
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
            {"error"},
        ),
        "kill parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", {"error"}),
        "kill caller": (f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)", {"error"}),
        "kill everything": ("import os, signal\nos.kill(-1, signal.SIGKILL)", {"error"}),  # nothing it may kill
        "delete by absolute path": (f"import os\nos.remove({tmp + '/sentinel'!r})", {"error"}),
        "delete sticky /var/tmp": (f"import os\nos.remove('/var/tmp/{MARKER}-sentinel')", {"error"}),
        "print 100 MB": (print_100mb, {"passed"}),
        "close stdout": ("import os, sys\nsys.stdout.close()\nos.close(1)\nos.close(2)\nassert 1 + 1 == 3", {"failed"}),
        "close stdout, then pass": ("import os\nos.close(1)\nprint('lost')", {"passed"}),
        "recursion overflow": ("def f(n):\n    return f(n + 1) + 1\nf(0)", {"error"}),
        "setsid grandchild": (grandchild, {"passed"}),
        "setsid grandchild, parent sleeps": (grandchild_parent_sleeps, {"timeout"}),
    }
    return programs[name]


HOSTILE = ["infinite loop", "fork bomb", "memory bomb", "1 GB write", "write outside", "socket to 127.0.0.1",
           "kill parent", "kill caller", "kill everything", "delete by absolute path", "delete sticky /var/tmp",
           "print 100 MB", "close stdout", "close stdout, then pass", "recursion overflow", "setsid grandchild",
           "setsid grandchild, parent sleeps"]  # fmt: skip


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_program_is_contained(any_sandbox, name, tmp_path):
    if name == "kill everything" and not any_sandbox.isolation["pid_namespace"]:
        pytest.skip("kill(-1) as the sandbox uid reaches all of its processes on the host without a PID namespace")
    tmp = str(tmp_path)
    with open(f"{tmp}/sentinel", "w") as f:
        f.write("keep")
    sticky = f"/var/tmp/{MARKER}-sentinel"  # root's file in a sticky world-writable directory
    with open(sticky, "w") as f:
        f.write("keep")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    program, statuses = _hostile(name, tmp, listener.getsockname()[1])
    # where the program tries to write; without a mount namespace the world-writable directories are open to it
    bases = [f"{w.base_dir}/{MARKER}" for w in list(any_sandbox._pool.live) if w.base_dir]
    must_not_exist = [f"/{MARKER}", f"{PROJECT}/{MARKER}", f"{tmp}/{MARKER}", *bases]
    world_writable = [f"/tmp/{MARKER}", f"/var/tmp/{MARKER}", f"/dev/shm/{MARKER}"]
    if any_sandbox.isolation["mount_namespace"]:
        must_not_exist += world_writable
    try:
        result = _run_contained(any_sandbox, program)
        assert result.status in statuses, result
        with pytest.raises(BlockingIOError):
            listener.accept()  # no connection ever arrived
        assert [p for p in must_not_exist if os.path.lexists(p)] == []
        assert os.listdir(tmp) == ["sentinel"] and _read(f"{tmp}/sentinel") == _read(sticky) == "keep"
        if name == "print 100 MB":
            assert result.stdout == "x" * any_sandbox.config.max_output_bytes
        assert any_sandbox.run("assert 6 * 7 == 42").passed  # the pool still works
    finally:
        listener.close()
        for path in [sticky, *world_writable]:
            if os.path.lexists(path):
                os.remove(path)


_CALLER = """
import importlib.util, json, os, signal, sys, threading, time
spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])  # standalone: no jax in this process
sandbox = sys.modules["sandbox"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sandbox)
sb = sandbox.Sandbox(sandbox.SandboxConfig(timeout_s=60.0, workers=2, namespaces=sys.argv[4] == "namespaces"))
assert sb.run("pass").passed
workers = [w.proc.pid for w in sb._pool.live]
programs = []
if sys.argv[2] == "kill":  # the caller dies mid-run, with no chance to clean up
    threading.Thread(target=sb.run, args=(sys.argv[3],), daemon=True).start()
    time.sleep(1.0)
    children = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(p))
        except OSError:
            pass
    todo = list(workers)
    while todo:
        below = children.get(todo.pop(), [])
        programs += below
        todo += below
print(json.dumps(dict(workers=workers, programs=programs,
                      bases=[w.base_dir for w in sb._pool.live if w.base_dir])), flush=True)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""  # and with "exit": the interpreter ends without close(); atexit does it


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


@pytest.mark.parametrize("namespaces", ["namespaces", "fallback"])
@pytest.mark.parametrize("how", ["exit", "kill"])
def test_no_process_outlives_the_caller(how, namespaces):
    import subprocess
    import sys

    sandbox_py = os.path.join(PROJECT, "dsjax", "coder", "sandbox.py")
    sleeper = _hostile("setsid grandchild, parent sleeps", "", 0)[0]
    caller = subprocess.run([sys.executable, "-c", _CALLER, sandbox_py, how, sleeper, namespaces],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert caller.stdout, caller.stderr
    seen = json.loads(caller.stdout)
    if how == "kill":  # the program, its setsid'd child (and in a namespace, its init) were running
        assert len(seen["programs"]) >= 2, seen
    pids = seen["workers"] + seen["programs"]
    started = {p: _start_time(p) for p in pids}  # (a pid reused meanwhile has another start time)
    alive = lambda: [p for p in pids if started[p] is not None and _start_time(p) == started[p]]
    deadline = time.monotonic() + 5.0
    while (alive() or _marked()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alive() == [] and _marked() == []
    assert not any(os.path.exists(b) for b in seen["bases"])


def test_network_can_be_allowed():
    with socket.socket() as listener, Sandbox(_config(workers=1, network=True)) as sb:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = sb.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5).close()")
        assert sb.isolation["network"] == "allowed" and result.passed, result
        listener.settimeout(5)
        listener.accept()[0].close()
