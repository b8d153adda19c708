"""How `stages.evaluation.sandbox` builds its containment: the child's bootstrap, the namespace
setup script, the cgroups and the root-only directories on the interpreter's path.

Kept apart from the session logic so each reads alone: this module says *what* the program may
see and use, `sandbox.py` runs and talks to it.
"""
from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

NOBODY = 65534
"""The unprivileged uid and gid a `namespaces` program runs as."""

# Runs first in the child, before the untrusted program: limits, the program read from an inherited
# descriptor, then (guard isolation) the audit hook, then the program as __main__.
BOOTSTRAP = r"""
import os, resource, sys
mem, cpu, fsize, nproc, guard, program_fd, reply_fd = sys.argv[1:8]
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
def deny_keyrings():
    # A seccomp filter: add_key, request_key and keyctl fail with EPERM, so nothing the program does
    # lands in a kernel keyring that would outlive it (keyrings belong to the uid, not the namespaces).
    import ctypes, platform, struct
    arch = {"x86_64": (0xC000003E, (248, 249, 250)), "aarch64": (0xC00000B7, (217, 218, 219))}.get(platform.machine())
    if arch is None:
        return
    audit_arch, calls = arch
    allow, deny = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    prog = [(0x20, 0, 0, 4), (0x15, 1, 0, audit_arch), (0x06, 0, 0, allow), (0x20, 0, 0, 0)]
    prog += [(0x15, len(calls) - i, 0, nr) for i, nr in enumerate(calls)]
    prog += [(0x06, 0, 0, allow), (0x06, 0, 0, deny)]
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *ins) for ins in prog))
    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    fprog = Fprog(len(prog), ctypes.addressof(code))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS (setpriv already set it under namespaces)
    libc.prctl(22, 2, ctypes.byref(fprog), 0, 0)  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
deny_keyrings()
with os.fdopen(int(program_fd), "rb") as f:
    source = f.read()
if guard == "1":
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
del sys.argv[1:]
sys.argv[0] = "program.py"
code = compile(source, "program.py", "exec")
del source, cap, mem, cpu, fsize, nproc, guard, program_fd, reply_fd, f, deny_keyrings
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
"""

# Runs as root inside the new mount/PID/network/IPC/UTS namespaces. Arguments: the host scratch
# directory, the disk quota in MiB, then four lists each closed by "--" (cgroups to join,
# root-only directories to cover as "parent:kept child", paths to hide, paths under /tmp, /run or
# /var/tmp to keep visible: the interpreter's), then the command.
SETUP = r"""
set -e
scratch="$1"; disk_mb="$2"; shift 2
mount --make-rprivate /
while [ "$1" != "--" ]; do echo $$ > "$1/cgroup.procs"; shift; done; shift
i=0
while [ "$1" != "--" ]; do
  parent="${1%%:*}"; child="${1#*:}"; i=$((i+1))
  mkdir "$scratch/keep$i"; mount --rbind "$child" "$scratch/keep$i"
  mount -t tmpfs -o size=64k,mode=755 sandbox-cover "$parent"
  mkdir -p "$child"; mount --move "$scratch/keep$i" "$child"
  shift
done; shift
while [ "$1" != "--" ]; do
  if [ -d "$1" ]; then mount -t tmpfs -o size=4k,mode=755 sandbox-hidden "$1"
  elif [ -e "$1" ]; then mount --bind /dev/null "$1"; fi
  shift
done; shift
mkdir "$scratch/dev"
mount -t tmpfs -o size=64k,mode=755 sandbox-dev "$scratch/dev"
for n in null zero random urandom; do touch "$scratch/dev/$n"; mount --bind "/dev/$n" "$scratch/dev/$n"; done
ln -s /proc/self/fd "$scratch/dev/fd"
for i in 0:stdin 1:stdout 2:stderr; do ln -s "/proc/self/fd/${i%%:*}" "$scratch/dev/${i#*:}"; done
mount --move "$scratch/dev" /dev
keep=""; i=0
while [ "$1" != "--" ]; do
  i=$((i+1)); mkdir "/dev/.keep$i"; mount --rbind "$1" "/dev/.keep$i"; keep="$keep $i:$1"; shift
done; shift
for d in /run /var/tmp; do
  if [ -d "$d" ] && [ ! -L "$d" ]; then mount -t tmpfs -o size=64k,mode=755 sandbox-empty "$d"; fi
done
mount -t tmpfs -o "size=${disk_mb}m,mode=1777" sandbox-tmp /tmp
for k in $keep; do
  mkdir -p "${k#*:}"; mount --move "/dev/.keep${k%%:*}" "${k#*:}"; rmdir "/dev/.keep${k%%:*}"
done
for m in $(cut -d' ' -f2 /proc/self/mounts | sort -u); do
  case "$m" in /tmp|/dev|/dev/*) continue;; esac
  mount -o remount,bind,ro "$m" 2>/dev/null || true
done
cd /tmp
exec setpriv --reuid=65534 --regid=65534 --clear-groups --bounding-set=-all --inh-caps=-all --no-new-privs "$@"
"""


def root_only_covers(python: str) -> list[str]:
    """`parent:child` for each directory on the interpreter's paths that `nobody` cannot enter
    (e.g. `/root`, mode 700, holding a pyenv): the setup covers `parent` with an empty tmpfs and
    keeps only `child`, so the interpreter runs and the rest of `parent` stays out of sight."""
    found: dict[str, str] = {}
    for target in {Path(python).absolute(), Path(python).resolve(), Path(sys.base_prefix).resolve(),
                   Path(sys.prefix).absolute()}:
        parts = target.parts
        for depth in range(1, len(parts) - 1):
            parent = Path(*parts[: depth + 1])
            try:
                if os.stat(parent).st_mode & 0o001:
                    continue
            except OSError:
                break
            found.setdefault(str(parent), str(Path(*parts[: depth + 2])))
            break
    return [f"{parent}:{child}" for parent, child in sorted(found.items())]


COVERED = ("/tmp", "/run", "/var/tmp")
"""Directories the setup covers with an empty tmpfs (the program's scratch space, host sockets)."""


def interpreter_keeps(python: str) -> list[str]:
    """The interpreter's directories that lie under a `COVERED` one (a virtualenv or a clone in
    /tmp, as on a CI machine): the setup keeps them visible, read-only, at the same path."""
    roots = {Path(python).absolute().parent.parent, Path(python).resolve().parent.parent,
             Path(sys.prefix).absolute(), Path(sys.base_prefix).resolve()}
    keep = sorted(str(r) for r in roots
                  if any(str(r) == c or str(r).startswith(c + "/") for c in COVERED) and str(r) not in COVERED)
    return [k for k in keep if not any(k != o and k.startswith(o + "/") for o in keep)]  # outermost only


def namespace_command(scratch: Path, limits, hide: tuple[str, ...], cgroups: list[Path],
                      python_cmd: list[str]) -> list[str]:
    """The `unshare` command that sets the namespaces up and runs `python_cmd` as `nobody`."""
    return ["unshare", "--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc",
            "sh", "-c", SETUP, "sh", str(scratch), str(int(limits.disk_mb)),
            *sorted({str(g) for g in cgroups}), "--", *root_only_covers(python_cmd[0]), "--",
            *[str(Path(h).resolve()) for h in hide], "--", *interpreter_keeps(python_cmd[0]), "--", *python_cmd]


_CGROUP_V1 = {"pids": Path("/sys/fs/cgroup/pids"), "memory": Path("/sys/fs/cgroup/memory")}
_CGROUP_V2 = Path("/sys/fs/cgroup")


def make_cgroups(limits) -> dict[str, Path]:
    """Fresh `pids` and `memory` cgroups capped at the limits, where the cgroup fs is writable (v1
    hierarchies or the v2 unified one): `{controller: group}`, empty where none could be made."""
    limits_by = {"pids": {"pids.max": str(limits.max_processes)},
                 "memory": {"memory.limit_in_bytes": str(limits.memory_mb * 2**20),
                            "memory.memsw.limit_in_bytes": str(limits.memory_mb * 2**20),
                            "memory.max": str(limits.memory_mb * 2**20), "memory.swap.max": "0"}}
    made: dict[str, Path] = {}
    v2 = _CGROUP_V2 / "cgroup.subtree_control"
    v2_controllers = v2.read_text().split() if v2.exists() else []
    for controller, files in limits_by.items():
        root = _CGROUP_V1[controller] if (_CGROUP_V1[controller] / "cgroup.procs").exists() else (
            _CGROUP_V2 if controller in v2_controllers else None)
        if root is None:
            continue
        group = next((g for g in made.values() if g.parent == root), None) or \
            root / f"twotower-sandbox-{uuid.uuid4().hex[:12]}"
        try:
            group.mkdir(exist_ok=True)
            wrote = False
            for name, value in files.items():
                if not (group / name).exists():
                    continue
                try:
                    (group / name).write_text(value)
                    wrote = True
                except OSError:  # swap accounting off: the memory limit alone still holds
                    if "swap" not in name and "memsw" not in name:
                        raise
            if wrote:
                made[controller] = group
        except OSError:
            pass
        if controller not in made:
            _rmdir(group)
    return made


def remove_cgroups(groups: dict[str, Path], wait_s: float = 5.0) -> None:
    """Wait until the groups' processes are gone (a killed PID namespace empties in moments), then
    remove the groups."""
    deadline = time.monotonic() + wait_s
    for group in set(groups.values()):
        while time.monotonic() < deadline:
            try:
                if not (group / "cgroup.procs").read_text().strip():
                    break
            except OSError:
                break
            time.sleep(0.02)
        _rmdir(group, retries=50)


def _rmdir(group: Path, retries: int = 1) -> None:
    for _ in range(retries):  # the group's processes may take a moment to be reaped after a kill
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)
