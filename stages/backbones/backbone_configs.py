"""Backbone configs without weights: a local checkpoint's `config.json`, or a config shipped under
`recipes/backbones/` (found by the hub id in its `_name_or_path`), so the published recipes work
offline. Read by `planning.estimate` (`plan`) and `stages.backbones.random_backbone` (a shrunk random init of
the same architecture); a stage module so that a stage importing it does not import the engine.
"""
from __future__ import annotations

import json
from pathlib import Path

SHIPPED_BACKBONES = Path(__file__).resolve().parents[2] / "recipes" / "backbones"
"""Backbone configs shipped with the repo, so `plan` works offline for the published recipes."""


def shipped_backbone_configs() -> dict[str, Path]:
    """Hub id (`_name_or_path`) -> shipped JSON file."""
    out: dict[str, Path] = {}
    for path in sorted(SHIPPED_BACKBONES.glob("*.json")):
        name = json.loads(path.read_text()).get("_name_or_path")
        if name:
            out[name] = path
    return out


def backbone_config_file(name_or_path: str) -> Path | None:
    """The file `load_backbone_config` reads for `name_or_path` (a checkpoint's `config.json`, a
    JSON file, or the shipped config of a hub id), found without importing transformers; None when
    there is none offline."""
    path = Path(name_or_path)
    if path.is_dir() and (path / "config.json").is_file():
        return path / "config.json"
    if path.suffix == ".json" and path.is_file():
        return path
    return shipped_backbone_configs().get(name_or_path)


def load_backbone_config(name_or_path: str):
    """The transformers config of a backbone, offline: a local directory/JSON or a shipped config."""
    from transformers import AutoConfig

    found = backbone_config_file(name_or_path)
    if found is None:
        raise ValueError(
            f"backbone.name_or_path={name_or_path!r}: not a local checkpoint and no shipped config in "
            f"{SHIPPED_BACKBONES} (shipped: {sorted(shipped_backbone_configs())})"
        )
    if Path(name_or_path).is_dir():
        return AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    return config_from_json(found)


def config_from_json(path: Path):
    """A transformers config from a config.json-style file, by its `model_type`."""
    from transformers import AutoConfig

    data = json.loads(Path(path).read_text())
    if "model_type" not in data:
        raise ValueError(f"{path}: no `model_type` key")
    kwargs = {k: v for k, v in data.items() if not k.startswith("_") and k != "model_type"}
    config = AutoConfig.for_model(data["model_type"], **kwargs)
    config._name_or_path = data.get("_name_or_path", str(path))
    return config
