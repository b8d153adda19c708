"""Disk full, over quota, read-only, or over a file-size limit: one clear error, and room checks.

A full disk surfaces as many things: `OSError(ENOSPC)` from a write, `EDQUOT` on a quota'd share,
`EROFS` on a read-only mount, `EFBIG` under `ulimit -f`, or a `RuntimeError("... file write
failed")` from torch's checkpoint writer that hides the errno. `disk_error(err, paths)` turns any of
them into a `DiskFullError` naming the path, the bytes the stage had written and the bytes free;
the worker then removes the temporary artifact directory, so no completion marker and no
half-written artifact remain. `check_root` is `validate`'s check that `run.root` is writable and
has room for the plan's estimate.
"""
from __future__ import annotations

import errno
import shutil
import uuid
from pathlib import Path

DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


class DiskFullError(OSError):
    """No room (or no write access) where a stage writes; names the path and the bytes."""


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def is_disk_error(err: BaseException) -> bool:
    """Whether `err` (or what caused it) is a no-space / read-only / file-too-large failure."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return True
        if isinstance(e, RuntimeError) and "file write failed" in str(e):  # torch.save's writer
            return True
    return False


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def disk_error(err: BaseException, out_dir: Path, work_dir: Path) -> DiskFullError:
    """The `DiskFullError` for a disk failure while a stage wrote to `out_dir` / `work_dir`."""
    failing = next((e.filename for e in _chain(err) if isinstance(e, OSError) and e.filename), None)
    code = next((e.errno for e in _chain(err) if isinstance(e, OSError) and e.errno in DISK_ERRNOS), None)
    reason = {errno.EROFS: "read-only filesystem", errno.EFBIG: "file size limit (ulimit -f) reached",
              errno.EDQUOT: "disk quota exceeded"}.get(code, "no space left on device")
    where = failing or _newest_file(out_dir, work_dir) or out_dir
    written = tree_bytes(out_dir) + tree_bytes(work_dir)
    error = DiskFullError(f"{reason} while writing {where} (artifact dir {out_dir}, work dir {work_dir}): "
                         f"the stage had written {written} bytes and needs more than that; "
                         f"{free_bytes(out_dir)} bytes are free there. Free space or move run.root, then "
                         f"rerun (`python -m pipeline run --resume`); nothing of this stage was kept "
                         f"as complete ({type(err).__name__}: {err})")
    error.errno = code or errno.ENOSPC
    return error


def _newest_file(*dirs: Path) -> Path | None:
    """The file written last under `dirs`: the one a write without a file name failed on."""
    files = [p for d in dirs if Path(d).is_dir() for p in Path(d).rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_mtime_ns, default=None)


def check_root(root: Path, needed_bytes: int | None) -> tuple[str | None, str | None]:
    """(error, warning) about `run.root`, creating nothing: an error when it (or, before the first
    run, the directory it would be created in) is not a writable directory; a warning when the
    estimate of what the run writes there exceeds the free space."""
    root = Path(root).absolute()
    probe_dir = root
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        return f"run.root: {root} cannot be created ({probe_dir} is not a directory)", None
    probe = probe_dir / f".write-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as err:
        return f"run.root: {root} is not writable ({probe_dir}: {err.strerror or err})", None
    free = free_bytes(probe_dir)
    if needed_bytes is not None and needed_bytes > free:
        return None, (f"run.root: {root} has {free / 2**30:.1f} GiB free, the plan estimates up to "
                      f"{needed_bytes / 2**30:.1f} GiB of artifacts and checkpoints")
    return None, None


def plan_bytes(estimate: dict | None) -> int | None:
    """A rough upper bound of what a run writes under `run.root`, from `plan`'s estimate: the
    denoiser's fp32 weights (artifact), two checkpoints of weights + AdamW moments (last and one
    periodic), and an fp32 export of both towers. None when the plan sizes no backbone."""
    params = (estimate or {}).get("params") or {}
    den, both = params.get("denoiser", {}).get("total"), params.get("both_towers_total")
    if not den or not both:
        return None
    return int(4 * den + 2 * 12 * den + 4 * both)

