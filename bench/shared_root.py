"""Runs sharing a root, and a dead tracking URI, timed side by side in one process.

    python bench/shared_root.py                    # the tiny recipe at the e2e test's budget, under Ray
    python bench/shared_root.py --runner local     # the same without Ray

1. One `python -m pipeline run recipes/tiny.yaml` alone on a fresh root, then two identical ones
   started together on another fresh root: the wall time of the pair against the single run. With
   the key locks (`pipeline/locks.py`) the second run waits for the first's stages and takes them
   from the cache, so the ratio should be about 1: the second run adds its start-up, not the work.
2. Time from `python -m pipeline run` to its exit with `tracking.uri` pointing at a port nothing
   listens on (connection refused) and at one that accepts and never answers (a hung server): exit
   2 naming `tracking.uri`, bounded by `tracking.probe_timeout_s` plus interpreter start-up.
Every run is `--no-track` except the tracking probes.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from test_e2e_tiny import TINY_BUDGET  # noqa: E402  (the CI budget: every stage, a few steps)


def _cmd(root: Path, runner: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", "recipes/tiny.yaml", f"run.root={root}", *TINY_BUDGET,
            *extra, "--runner", runner, "--quiet"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}


def timed_runs(roots: list[Path], runner: str) -> tuple[float, list[int]]:
    """Start one run per root entry at once (repeated roots share one); wall time until all exit."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(_cmd(r, runner, "--no-track"), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for r in roots]
    codes = [p.wait() for p in procs]
    return time.perf_counter() - t0, codes


def time_to_error(uri: str) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(_cmd(Path(tempfile.mkdtemp()) / "runs", "local", f"tracking.uri={uri}"), cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=600)
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    return time.perf_counter() - t0, proc.returncode, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runner", choices=["ray", "local"], default="ray")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        alone, codes1 = timed_runs([Path(tmp) / "alone"], args.runner)
        pair, codes2 = timed_runs([Path(tmp) / "shared"] * 2, args.runner)
        print(f"tiny recipe ({args.runner}): one run alone {alone:.1f} s (exit {codes1}); two identical runs "
              f"on one root {pair:.1f} s (exit {codes2}); ratio {pair / alone:.2f}x")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{free.getsockname()[1]}"
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    for what, uri in (("refused", refused), ("silent", f"http://127.0.0.1:{silent.getsockname()[1]}")):
        seconds, code, last = time_to_error(uri)
        print(f"dead tracking.uri ({what}): exit {code} after {seconds:.1f} s: {last}")
    silent.close()


if __name__ == "__main__":
    main()
