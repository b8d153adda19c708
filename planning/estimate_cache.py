"""What a run will write under `run.root`, for `validate`: the plan's estimate, cached per backbone.

`validate` checks that `run.root` has room for what the plan estimates the run writes there
(`pipeline.diskspace.plan_bytes`: artifact, checkpoints, export). Computing the estimate builds the
backbone and both towers on the meta device; the imports that needs (torch, transformers, the model
code: ~8 s on 2 cores) dwarf the sizing itself (~0.3 s) and the rest of `validate` (~2 s). The two
numbers the disk check reads depend only on the backbone's config file, the `twotower` section, the
code and the library versions, so they are kept in a small JSON file per key under the user's cache
(`$XDG_CACHE_HOME` or `~/.cache`, then `twotower-pipeline/estimates/`), written atomically (a
temporary file renamed into place: concurrent validates never read half a file). The first
`validate` or `plan` of a backbone pays the imports; later ones read one file.

The key hashes the backbone config file's bytes, the resolved `twotower` section, every source
file of the project packages (~80 files, a few ms: a hand-kept list of the files the sizing uses
would drift) and the torch and transformers versions. A recipe whose backbone has no config file
offline (the tiny recipe pretrains its own; a GGUF file; an unshipped hub id) has nothing to size
and costs nothing. An unwritable cache only costs the next call the imports again.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.codeversion import PROJECT_PACKAGES, REPO_ROOT


def cache_dir() -> Path:
    """Where the cached estimates live (created on the first write)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "twotower-pipeline" / "estimates"


def _code_hash() -> str:
    digest = hashlib.sha256()
    for package in PROJECT_PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def estimate_key(cfg: Any) -> str | None:
    """The cache key of `cfg`'s estimate, or None when the plan sizes no backbone for it."""
    from planning.estimate import Sections, _plain
    from stages.backbones.backbone_configs import backbone_config_file

    sections = Sections.of(cfg)
    name = sections.backbone.name_or_path
    config_file = backbone_config_file(str(name)) if name else None
    if config_file is None:
        return None
    payload = {"backbone_config": hashlib.sha256(config_file.read_bytes()).hexdigest(),
               "twotower": _plain(cfg).get("twotower") or {}, "code": _code_hash(),
               "torch": _version("torch"), "transformers": _version("transformers")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _counts(estimate: Any) -> dict | None:
    """The part of the estimate `plan_bytes` reads, or None when it sized nothing."""
    params = (estimate or {}).get("params") if isinstance(estimate, dict) else None
    if not params or not params.get("both_towers_total"):
        return None
    return {"params": {"denoiser": {"total": params["denoiser"]["total"]},
                       "both_towers_total": params["both_towers_total"]}}


def remember(cfg: Any, estimate: Any, key: str | None = None) -> None:
    """Keep `estimate`'s parameter counts for `cfg` (`plan` calls this with the estimate it made)."""
    counts = _counts(estimate)
    key = key or (estimate_key(cfg) if counts else None)
    if counts is None or key is None:
        return
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}-", suffix=".tmp")
    except OSError:
        return  # a read-only home: the next call sizes the backbone again
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(counts, fh)
        os.replace(tmp, folder / f"{key}.json")
    except OSError:
        Path(tmp).unlink(missing_ok=True)


def cached_estimate(cfg: Any) -> dict | None:
    """The parameter counts of `cfg`'s estimate: from the cache, else computed (and kept). None
    when nothing is sized, or the estimate fails (`plan` shows why)."""
    key = estimate_key(cfg)
    if key is None:
        return None
    try:
        return json.loads((cache_dir() / f"{key}.json").read_text())
    except (OSError, ValueError):
        pass
    try:
        from planning.estimate import estimate

        counts = _counts(estimate(cfg))
    except Exception:  # noqa: BLE001 - validate checks the config; `plan` reports estimate errors
        return None
    remember(cfg, counts, key)
    return counts
