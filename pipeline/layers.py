"""The layers of a config and where each key came from: `pipeline.yaml` <- recipe <- command line.

`pipeline/config.py` merges and validates; this module reads the layers (a YAML file, `key=value` /
`~key` overrides), resolves interpolations into plain data (recording which values were
interpolated, so a type error can quote the `${...}` it came from) and finds the layer a dotted key
most likely came from, so that every config error names its file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.schema import MISSING

CLI = "command line"


@dataclass(frozen=True)
class Problem:
    """One config error: the dotted key, what is wrong and how to fix it, and where it was set."""

    key: str
    message: str
    source: str

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.message}"


def load_yaml(path: Path, problems: list[Problem]) -> Any:
    from omegaconf import OmegaConf
    try:
        cfg = OmegaConf.load(path)
    except FileNotFoundError:
        problems.append(Problem("<file>", "no such file", str(path)))
        return None
    except Exception as err:  # a YAML syntax error: name the file and the line
        problems.append(Problem("<file>", f"cannot parse YAML: {err}", str(path)))
        return None
    if not isinstance(OmegaConf.to_container(cfg, resolve=False), dict):
        problems.append(Problem("<file>", "must hold a mapping at the top level", str(path)))
        return None
    return cfg


def parse_overrides(overrides: list[str], problems: list[Problem]) -> tuple[Any, list[str]]:
    """(a DictConfig of `key=value` items, the keys of `~key` deletions)."""
    from omegaconf import OmegaConf
    sets, deletes = [], []
    for item in overrides:
        if item.startswith("~") and "=" not in item and len(item) > 1:
            deletes.append(item[1:])
        elif "=" in item and item.split("=", 1)[0].strip().lstrip("+"):
            sets.append(item.lstrip("+"))
        else:
            problems.append(Problem(item, "bad override: expected key=value (set) or ~key (delete), "
                                    "e.g. train.max_steps=10", CLI))
    try:
        parsed = OmegaConf.from_dotlist(sets)
    except Exception as err:
        problems.append(Problem(" ".join(sets), f"bad override: {err}", CLI))
        parsed = OmegaConf.create({})
    return parsed, deletes


def delete_key(cfg: Any, dotted: str) -> bool:
    parts = dotted.split(".")
    node = cfg
    for part in parts[:-1]:
        if part not in node or not hasattr(node[part], "keys"):
            return False
        node = node[part]
    if parts[-1] not in node:
        return False
    del node[parts[-1]]
    return True


def decode(text: str) -> Any:
    """An interpolated string (env variables are strings) read as a YAML scalar: '3' -> 3, 'null' -> None."""
    import yaml
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float, bool)) or value is None else text


def resolve(node: Any, path: str, problems: list[tuple[str, str]], interpolated: dict[str, str]) -> Any:
    """Plain data with every interpolation resolved; an unresolvable one becomes a problem.

    `interpolated` collects `key -> '${...}'` so type errors can quote where a value came from.
    """
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    if isinstance(node, DictConfig):
        keys: list[Any] = list(node.keys())
    elif isinstance(node, ListConfig):
        keys = list(range(len(node)))
    else:
        return node
    out: dict[str, Any] | list[Any] = {} if isinstance(node, DictConfig) else []
    for key in keys:
        sub = f"{path}.{key}" if isinstance(node, DictConfig) else f"{path}[{key}]"
        sub = sub.lstrip(".")
        if OmegaConf.is_missing(node, key):
            value: Any = MISSING
        else:
            try:
                value = resolve(node[key], sub, problems, interpolated)
                if node._get_node(key)._is_interpolation():
                    interpolated[sub] = str(node._get_node(key)._value())
                    value = decode(value) if isinstance(value, str) else value
            except OmegaConfBaseException as err:
                raw = node._get_node(key)._value()
                problems.append((sub, f"cannot resolve {raw!r}: {getattr(err, 'msg', err)}"))
                value = None
        if isinstance(out, dict):
            out[str(key)] = value
        else:
            out.append(value)
    return out


def depth_in(layer: Any, parts: list[str]) -> int:
    """How many leading `parts` of a dotted key exist in a raw layer."""
    node, depth = layer, 0
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            break
        node, depth = node[part], depth + 1
    return depth


def origin(key: str, layers: list[tuple[str, Any]]) -> str:
    """The file (or `command line`) a key most likely came from: the latest layer reaching deepest."""
    parts = [p.split("[")[0] for p in key.split(".")]
    files = [source for source, _ in layers if source != CLI]
    best, best_depth = (files[-1] if files else CLI), 0  # unset anywhere: the recipe should set it
    for source, raw in layers:
        depth = depth_in(raw, parts)
        if depth > 0 and depth >= best_depth:
            best, best_depth = source, depth
    return best
