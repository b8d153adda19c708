"""What the cache's checksums cost on a cached re-run, measured side by side in one process.

    python bench/integrity_cost.py [--mb 256] [--files 8] [--rounds 5]

Builds one artifact of `--files` files totalling `--mb` MiB in a temporary store, then times
`ArtifactStore.lookup` three ways, interleaved `--rounds` times:

- `sizes only`: the marker's sizes (what a lookup checked before checksums were verified by
  default; emulated by a memo that always matches);
- `stat memo` (the default): sizes, plus a `stat` per file compared with `_VERIFIED.json`;
- `rehash` (`run.verify_checksums=true`): the sha256 of every file.

The page cache is warm (the files were just written), so `rehash` is a lower bound of its cost on
a cold cache. Prints min/median seconds and the ratios to `sizes only`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/integrity_cost.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import store as store_mod  # noqa: E402
from pipeline.store import ArtifactStore  # noqa: E402


def build(root: Path, mb: int, files: int) -> ArtifactStore:
    store = ArtifactStore(root)
    tmp = store.new_tmp_dir("bench", "k")
    tmp.mkdir(parents=True)
    per = mb * 2**20 // files
    for i in range(files):
        (tmp / f"shard-{i}.bin").write_bytes(os.urandom(per))
    store.commit(tmp, store.final_dir("bench", "k"), "bench", "k", {"metrics": {}})
    return store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        store = build(Path(tmp), args.mb, args.files)
        rehash = ArtifactStore(tmp, verify_checksums=True)
        real_memo = store_mod.verified_stats

        memo = real_memo(store.final_dir("bench", "k"))

        def sizes_only() -> None:  # the memo held in memory: no memo file read, no hash (as before)
            store_mod.verified_stats = lambda d: memo
            try:
                assert store.lookup("bench", "k") is not None
            finally:
                store_mod.verified_stats = real_memo

        ways = {"sizes only": sizes_only,
                "stat memo": lambda: store.lookup("bench", "k"),
                "rehash": lambda: rehash.lookup("bench", "k")}
        times: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(args.rounds):
            for name, fn in ways.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["sizes only"])
    print(f"artifact: {args.files} files, {args.mb} MiB; {args.rounds} interleaved rounds")
    for name, ts in times.items():
        print(f"{name:>11}: min {min(ts) * 1e3:9.3f} ms  median {statistics.median(ts) * 1e3:9.3f} ms  "
              f"x{statistics.median(ts) / base:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
