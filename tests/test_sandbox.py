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
import threading
from pathlib import Path

import pytest

from stages.evaluation import sandbox

ISOLATIONS = ["guard"] + (["namespaces"] if sandbox.namespaces_available() else [])


def _live_processes_running(workdir: str) -> list[int]:
    """PIDs whose command line names the sandbox's scratch directory (its program's children)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if workdir.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_runs_a_program_in_a_scratch_dir(isolation):
    out = sandbox.run_python("import os\nopen('made_here.txt', 'w').write('x')\nprint(os.getcwd())",
                             isolation=isolation)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == out.workdir
    assert out.isolation.startswith(isolation)
    assert not Path(out.workdir).exists()  # scratch removed afterwards


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_remove_outside_scratch_is_contained(isolation, tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("still here")
    out = sandbox.run_python(f"import os\nos.remove({str(canary)!r})\n", isolation=isolation)
    assert out.returncode != 0
    assert canary.read_text() == "still here"
    assert ("Read-only file system" in out.stderr) if isolation == "namespaces" else ("os.remove" in out.stderr)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_infinite_loop_is_killed_with_its_children(isolation):
    src = "import os, time\nif os.fork() == 0:\n    while True: time.sleep(0.1)\nwhile True: pass\n"
    if isolation == "guard":  # the guard refuses fork: the loop alone
        src = "while True: pass\n"
    out = sandbox.run_python(src, sandbox.Limits(timeout_s=2.0), isolation=isolation)
    assert out.timed_out and out.returncode is None
    assert _live_processes_running(out.workdir) == []


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
    assert _live_processes_running(out.workdir) == []


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
