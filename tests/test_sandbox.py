"""stages/evaluation/sandbox.py: model-written code is contained, under each isolation this machine permits.

Every hostile program here is real and runs for real: it removes a canary file outside its scratch
directory, spins forever, forks without end, connects a socket. The test checks the effect (the
canary still exists, the call returned, no process of it is left, no connection was made), not
only the exit status. `namespaces` runs where the tests run as root with unshare (CI does);
`guard` runs everywhere.
"""
from __future__ import annotations

import os
import socket
import tempfile
import threading
from pathlib import Path

import pytest

from stages.evaluation import sandbox
from stages.evaluation import sandbox_setup as setup

ISOLATIONS = ["guard"] + (["namespaces"] if sandbox.namespaces_available() else [])
NS = pytest.mark.skipif(not sandbox.namespaces_available(), reason="needs root with unshare (CI has it)")
pytestmark = pytest.mark.filterwarnings("ignore:sandbox isolation .guard. is not a security boundary")


def _leftovers(out: sandbox.Outcome) -> list[int]:
    """PIDs of the program still alive: under `namespaces` any process of `nobody` (the sandbox's
    user), under `guard` any process whose working directory is the scratch directory."""
    import time

    for _ in range(20):  # a killed process is reaped by the kernel in moments, not at once
        found = _alive(out)
        if not found:
            return found
        time.sleep(0.1)
    return found


def _alive(out: sandbox.Outcome) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if out.isolation.startswith("namespaces"):
                uids = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                            if line.startswith("Uid:"))
                if str(setup.NOBODY) in uids.split()[1:2]:
                    found.append(int(pid))
            elif os.readlink(f"/proc/{pid}/cwd") == out.workdir:
                found.append(int(pid))
        except (OSError, StopIteration):
            continue
    return found


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_runs_a_program_in_a_scratch_dir(isolation):
    out = sandbox.run_python("import os\nopen('made_here.txt', 'w').write('x')\nprint(os.getcwd())",
                             isolation=isolation)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == out.workdir
    assert out.isolation.startswith(isolation)
    assert not list(Path(tempfile.gettempdir()).glob("twotower-sandbox-*"))  # scratch removed afterwards


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_remove_outside_scratch_is_contained(isolation, tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("still here")
    out = sandbox.run_python(f"import os\nos.remove({str(canary)!r})\n", isolation=isolation)
    assert out.returncode != 0
    assert canary.read_text() == "still here"
    if isolation == "namespaces":  # /tmp is the program's own tmpfs: the host's file is not even visible
        assert any(e in out.stderr for e in ("FileNotFoundError", "Read-only file system", "PermissionError"))
    else:
        assert "os.remove" in out.stderr


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_infinite_loop_is_killed_with_its_children(isolation):
    src = "import os, time\nif os.fork() == 0:\n    while True: time.sleep(0.1)\nwhile True: pass\n"
    if isolation == "guard":  # the guard refuses fork: the loop alone
        src = "while True: pass\n"
    out = sandbox.run_python(src, sandbox.Limits(timeout_s=2.0), isolation=isolation)
    assert out.timed_out and out.returncode is None
    assert _leftovers(out) == []


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_fork_bomb_is_contained(isolation):
    out = sandbox.run_python("import os\nwhile True:\n    os.fork()\n",
                             sandbox.Limits(timeout_s=20.0, max_processes=16), isolation=isolation)
    assert out.returncode != 0
    if "pids_cgroup" in out.isolation:  # the cgroup refuses the 17th process: fork fails, the bomb ends
        assert not out.timed_out and "Resource temporarily unavailable" in out.stderr
    elif isolation == "guard":
        assert "os.fork" in out.stderr
    else:  # namespaces without a writable cgroup fs: the timeout kills the PID namespace
        assert out.timed_out
    assert _leftovers(out) == []


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_socket_connect_is_refused(isolation):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(5.0)
    accepted: list = []

    def accept():
        try:
            accepted.append(server.accept())
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    port = server.getsockname()[1]
    out = sandbox.run_python(f"import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n"
                             "print('connected')", isolation=isolation)
    t.join()
    server.close()
    assert out.returncode != 0 and "connected" not in out.stdout
    assert accepted == []  # nothing reached the listener on this machine


def test_memory_limit_is_enforced():
    out = sandbox.run_python("x = bytearray(512 * 2**20)\nprint('allocated')", sandbox.Limits(memory_mb=256),
                             isolation="guard")
    assert out.returncode != 0 and "MemoryError" in out.stderr


def test_bad_isolation_is_named():
    with pytest.raises(ValueError, match="isolation"):
        sandbox.run_python("pass", isolation="docker")


# --- as root: what `namespaces` takes away (each an attack that worked before) ---------------------------


@NS
def test_the_program_runs_as_nobody_and_cannot_read_root_only_files():
    out = sandbox.run_python(
        "import os\nprint(os.getuid(), os.getgid())\n"
        "for path in ('/etc/shadow', '/root'):\n"
        "    try:\n        print(path, sorted(os.listdir(path)) if os.path.isdir(path) else open(path).read()[:10])\n"
        "    except OSError as e:\n        print(path, type(e).__name__)\n")
    lines = out.stdout.splitlines()
    assert lines[0] == f"{setup.NOBODY} {setup.NOBODY}", out
    assert lines[1] == "/etc/shadow PermissionError" or not Path("/etc/shadow").exists()
    assert "/root" not in lines[2] or "PermissionError" in lines[2] or lines[2].startswith("/root ["), lines[2]
    if lines[2].startswith("/root ["):  # a root-only home on the interpreter's path: only that part is kept
        assert len(eval(lines[2][len("/root "):])) <= 1


@NS
def test_dev_holds_only_the_harmless_nodes_and_ipc_and_hostname_are_private():
    out = sandbox.run_python(
        "import os, socket\nprint(sorted(os.listdir('/dev')))\nprint(socket.gethostname())\n"
        "print(open('/proc/sysvipc/shm').read().count('\\n'))\n")
    devs, host, shm_lines = out.stdout.splitlines()
    assert eval(devs) == ["fd", "null", "random", "stderr", "stdin", "stdout", "urandom", "zero"]
    assert int(shm_lines) == 1  # the header only: none of the host's shared memory is visible


@NS
def test_shared_memory_the_program_makes_does_not_outlive_it():
    key = 0x7474
    out = sandbox.run_python(f"import ctypes\nlibc = ctypes.CDLL(None)\n"
                             f"print(libc.shmget({key}, 1 << 20, 0o1666))\n")
    assert int(out.stdout.strip()) >= 0, out  # it did make a segment, in its own IPC namespace
    keys = [line.split()[0] for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]]
    assert str(key) not in keys


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_no_kernel_keyring_key_outlives_the_program(isolation):
    """Keyrings belong to the uid, not to any namespace: a seccomp filter refuses add_key."""
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("the probe below uses x86_64 syscall numbers")
    name = f"twotower-probe-{os.getpid()}"
    out = sandbox.run_python("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                             f"r = libc.syscall(248, b'user', b'{name}', b'x', 1, ctypes.c_int(-4))\n"
                             "print(r, os.strerror(ctypes.get_errno()))\n", isolation=isolation)
    refused = out.stdout.strip() == "-1 Operation not permitted"  # the seccomp filter
    assert refused or (isolation == "guard" and "ctypes.dlopen is not allowed" in out.stderr), out
    assert name not in Path("/proc/keys").read_text()


@NS
def test_a_host_unix_socket_is_out_of_reach(tmp_path):
    listener = socket.socket(socket.AF_UNIX)
    path = tmp_path / "host.sock"
    listener.bind(str(path))
    os.chmod(path, 0o777)
    listener.listen(1)
    listener.settimeout(3.0)
    out = sandbox.run_python(f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({str(path)!r})\n"
                             "s.sendall(b'hello')\nprint('connected')")
    try:
        conn, _ = listener.accept()
        got = conn.recv(16)
    except OSError:
        got = b""
    listener.close()
    assert "connected" not in out.stdout and got == b"", out.stderr


@NS
def test_memory_is_limited_for_the_whole_process_tree():
    src = ("import os, time\nkids = []\nfor _ in range(3):\n    pid = os.fork()\n    if pid == 0:\n"
           "        x = b'\\1' * (150 << 20)\n        time.sleep(5)\n        os._exit(0)\n    kids.append(pid)\n"
           "codes = [os.waitstatus_to_exitcode(os.waitpid(k, 0)[1]) for k in kids]\nprint(codes)\n")
    out = sandbox.run_python(src, sandbox.Limits(memory_mb=256, timeout_s=20.0))
    assert "memory_cgroup" in out.isolation, "no writable memory cgroup here: the limit is per process only"
    codes = eval(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else None
    assert codes is None or any(c != 0 for c in codes), out  # 450 MB in 3 children cannot all live in 256


@NS
def test_the_disk_quota_holds_across_files():
    src = ("import os\nfor i in range(20):\n    with open(f'f{i}', 'wb') as f:\n"
           "        f.write(b'x' * (8 << 20))\nprint('wrote 160 MB')\n")
    out = sandbox.run_python(src, sandbox.Limits(disk_mb=32, memory_mb=512))
    assert out.returncode != 0 and "No space left" in out.stderr, out


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_an_output_flood_keeps_only_the_tail_and_this_process_small(isolation):
    """300 MB printed: the caller keeps 64 kB; its peak memory stays far below the flood (a fresh
    process measures itself, as this one's peak is set by earlier tests)."""
    import json
    import subprocess
    import sys

    probe = ("import json, resource, warnings\nwarnings.simplefilter('ignore')\n"
             "from stages.evaluation import sandbox\n"
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
             "out = sandbox.run_python(\"import sys\\nfor _ in range(300):\\n    sys.stdout.write('y' * (1 << 20))\\n"
             "print('END')\", sandbox.Limits(timeout_s=60.0, cpu_seconds=60), isolation=%r)\n"
             "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
             "print(json.dumps([len(out.stdout), out.stdout[-4:], (after - before) // 1024]))\n") % isolation
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert ran.returncode == 0, ran.stderr[-2000:]
    kept, end, grew_mb = json.loads(ran.stdout.strip().splitlines()[-1])
    assert kept <= 64 * 1024 and end == "END\n"
    assert grew_mb < 50, f"the caller grew by {grew_mb} MB"


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_a_tree_too_deep_for_rmtree_is_cleaned_without_raising(isolation):
    src = "import os\nfor _ in range(1500):\n    os.mkdir('d')\n    os.chdir('d')\nprint('deep')\n"
    out = sandbox.run_python(src, isolation=isolation)
    assert out.stdout.strip() == "deep", out.stderr
    assert not list(Path(tempfile.gettempdir()).glob("twotower-sandbox-*"))


def test_guard_runs_only_by_name_and_warns(monkeypatch):
    monkeypatch.setattr(sandbox, "namespaces_available", lambda: False)
    with pytest.raises(RuntimeError, match="evaluate.sandbox=guard"):
        sandbox.run_python("pass", isolation="auto")
    with pytest.warns(UserWarning, match="not a security boundary"):
        out = sandbox.run_python("print('ran')", isolation="guard")
    assert out.isolation == "guard" and out.stdout.strip() == "ran"


@NS
def test_an_interpreter_under_tmp_still_runs(tmp_path):
    """A clone or virtualenv in /tmp (as on a CI machine) lies under the tmpfs the sandbox puts over
    /tmp: its directory is kept visible, read-only, at the same path."""
    import subprocess
    import sys

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    out = sandbox.run_python("import sys\nprint(sys.prefix)\nopen(sys.prefix + '/x', 'w')\n",
                             python=str(venv / "bin" / "python"))
    assert out.stdout.strip() == str(venv), out
    assert "Read-only file system" in out.stderr or "Permission denied" in out.stderr, out.stderr
