"""One computation per cache key across processes and machines that share `run.root`.

    lock = StageLock(root, "train_denoiser", key, run_id="20261201-...-tiny", stale_s=60)
    if lock.acquire():          # never blocks: False while another live run holds the key
        ...                     # compute; a heartbeat thread keeps the lock fresh
        lock.release()
    else:
        lock.holder             # {"run": ..., "host": ..., "pid": ...} of the run computing it

Why a lock file and not `flock`: `run.root` is meant to be a filesystem every node mounts, and
`flock` is not reliable on NFS-like mounts. Creating a lock is a hard link of a fully written
temporary file onto `locks/<stage>/<key>.lock`: `link(2)` fails when the target exists, atomically,
on local filesystems and NFS alike, and a reader never sees a half-written owner record.

A holder proves it is alive by a heartbeat: a thread touching the lock file's mtime every
`stale_s / 4` seconds. A lock is stale when its heartbeat is older than `stale_s`, or, when it was
taken on this host, when its pid no longer exists (a `kill -9` is noticed at once). Breaking a stale
lock hard-links it to a tombstone named after its token first: only one waiter can create that
tombstone, so two waiters never both break it and both compute.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_path(root: str | Path, stage: str, key: str) -> Path:
    """Where the lock of `stage` with `key` lives under `run.root`."""
    return Path(root) / "locks" / stage / f"{key}.lock"


def read_holder(path: Path) -> dict[str, Any] | None:
    """The owner record of a lock file, or None when there is none (or it just went away)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_stale(path: Path, holder: dict[str, Any], stale_s: float) -> bool:
    """No heartbeat for `stale_s` seconds, or a dead pid on this host."""
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return False  # gone: not stale, just free
    if age > stale_s:
        return True
    pid = int(holder.get("pid") or 0)
    return holder.get("host") == socket.gethostname() and pid > 0 and not pid_alive(pid)


class StageLock:
    """The lock of one stage key, taken by one run; `acquire` never blocks (the runner polls it)."""

    def __init__(self, root: str | Path, stage: str, key: str, run_id: str, stale_s: float = 60.0):
        self.path = lock_path(root, stage, key)
        self.stage, self.key, self.stale_s = stage, key, float(stale_s)
        self.token = uuid.uuid4().hex
        self.record = {"stage": stage, "key": key, "run": run_id, "host": socket.gethostname(),
                       "pid": os.getpid(), "token": self.token, "since": time.time()}
        self.holder: dict[str, Any] | None = None
        """The other run's owner record after a failed `acquire`."""
        self.broke: dict[str, Any] | None = None
        """The stale owner record this lock replaced, if any (its work dir holds its checkpoints)."""
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _try_link(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{self.token}.tmp")
        with open(tmp, "w") as fh:
            fh.write(json.dumps(self.record))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _break(self, holder: dict[str, Any]) -> None:
        """Remove a stale lock, at most once per stale owner (the tombstone link is the arbiter)."""
        tomb = self.path.with_name(f".{self.path.name}.broken-{holder.get('token', 'unknown')}")
        try:
            os.link(self.path, tomb)
        except (FileExistsError, FileNotFoundError):
            return  # another waiter breaks it, or it was released meanwhile
        try:
            if (read_holder(tomb) or {}).get("token") == holder.get("token"):
                self.path.unlink(missing_ok=True)
                self.broke = holder
        finally:
            tomb.unlink(missing_ok=True)

    def acquire(self) -> bool:
        """Take the lock if it is free or stale; else remember its `holder` and return False."""
        if self.held:
            return True
        for _ in range(3):
            if self._try_link():
                self.held, self.holder = True, None
                self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                                name=f"lock-heartbeat-{self.stage}")
                self._thread.start()
                return True
            holder = read_holder(self.path)
            if holder is None:
                continue  # released between our link and our read: try again
            if not is_stale(self.path, holder, self.stale_s):
                self.holder = holder
                return False
            self._break(holder)
        return False

    def _heartbeat(self) -> None:
        interval = max(0.05, self.stale_s / 4)
        while not self._stop.wait(interval):
            try:
                if (read_holder(self.path) or {}).get("token") != self.token:
                    return  # broken by a waiter who judged us dead: nothing of ours to touch
                os.utime(self.path)
            except OSError:
                pass  # a transient filesystem hiccup: the next beat tries again

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours."""
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if (read_holder(self.path) or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.held = False

    def describe_holder(self) -> str:
        """`run <id> on <host>` of the other holder, for the display."""
        h = self.holder or {}
        return f"run {h.get('run', '?')} on {h.get('host', '?')}"


class LockLostError(RuntimeError):
    """The run computing a stage lost the key's lock (another run judged it dead and took over)."""


def check_fence(lock_file: str | Path, token: str, stage: str) -> None:
    """Raise `LockLostError` unless the lock at `lock_file` still holds `token`.

    The fence for a worker that outlived its driver: a driver killed mid-stage stops its lock's
    heartbeat, a waiting run breaks the stale lock and computes the stage itself, but the killed
    run's worker (a Ray task, until Ray reaps it) may still be running. It checks here before it
    publishes, so only the lock's current holder renames an artifact into the cache. (A check, not
    an atomic compare-and-rename: the window between the two is one `rename`.)"""
    holder = read_holder(Path(lock_file))
    if (holder or {}).get("token") == token:
        return
    who = "nobody (released or broken)" if holder is None else \
        f"run {holder.get('run', '?')} on {holder.get('host', '?')}"
    raise LockLostError(f"{stage}: this run no longer holds the key's lock {lock_file} (it went stale and "
                        f"now belongs to {who}); not publishing the artifact: the lock's holder computes it")
