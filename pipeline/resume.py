"""`run --resume RUN_DIR key=value`: resume a failed run with a changed config, and record the change.

A plain resume reruns the saved config: every key is the same, the failed stage finds its checkpoints
in `work/<stage>/<key>/` and continues. An override (a lower `train.lr` after a NaN) changes that
stage's cache key, so its work directory would be a new, empty one and training would restart at
step 0. `carry_checkpoints` copies the old work directory to the new key's when only the stage's own
config changed (its upstream keys are the same: the checkpoint was trained on the same inputs) and
the new one is empty. `ResumeRecord` writes `resume.json` into the new run directory: the run it
resumed, the overrides, every resolved key that changed (old and new value) and what was carried.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.store import ArtifactStore, write_json_atomic


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every dotted key whose resolved value differs: {key: {"old": ..., "new": ...}}."""
    a, b = _flat(old), _flat(new)
    return {k: {"old": a.get(k), "new": b.get(k)} for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def carry_checkpoints(old_cfg: PipelineConfig, new_cfg: PipelineConfig, summary: dict[str, Any]
                      ) -> dict[str, dict[str, str]]:
    """Copy the unfinished stages' work directories to their new keys (see the module doc)."""
    from pipeline.runner import stage_keys

    old_keys, new_keys = stage_keys(old_cfg), stage_keys(new_cfg)
    old_store, new_store = ArtifactStore(old_cfg.run.root), ArtifactStore(new_cfg.run.root)
    carried: dict[str, dict[str, str]] = {}
    for name, stage in new_cfg.stages.items():
        if name not in old_keys or old_keys[name] == new_keys[name]:
            continue
        if (summary.get("stages", {}).get(name) or {}).get("status") in ("done", "cached"):
            continue
        if any(old_keys.get(n) != new_keys[n] for n in stage.spec.needs):
            continue  # other inputs: the old checkpoint does not apply
        src, dst = old_store.work_dir(name, old_keys[name]), new_store.work_dir(name, new_keys[name])
        if not src.is_dir() or not any(src.iterdir()) or (dst.is_dir() and any(dst.iterdir())):
            continue
        tmp = dst.with_name(f".{dst.name}.carry")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        if dst.exists():
            dst.rmdir()  # empty (checked above)
        tmp.rename(dst)
        carried[name] = {"from": str(src), "to": str(dst)}
    return carried


class ResumeRecord:
    """A run hook that writes `resume.json` into the new run directory when the run starts."""

    def __init__(self, resumed: Path, overrides: list[str], changes: dict[str, Any],
                 carried: dict[str, dict[str, str]]):
        self.record = {"resumed_run": str(resumed), "overrides": list(overrides), "changes": changes,
                       "carried_checkpoints": carried}

    def on_run_start(self, run: Any) -> None:
        write_json_atomic(Path(run.run_dir) / "resume.json", self.record)
