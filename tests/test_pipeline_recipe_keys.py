"""Every key of every shipped recipe is read by the code that owns its section.

A key nobody reads is a lie in the config: the user sets it and nothing changes. For each key of
`pipeline.yaml` and `recipes/*.yaml`, the test finds the modules that own its section — the stage
modules whose `SECTION` it is (and, for the sections `plan` sizes, planning/estimate.py), or the
engine (`pipeline/`) for `run`, `ray`, `tracking`, `plan` and `graph` — and requires an attribute
read `.<key>` somewhere in the code those modules import (pipeline/codeversion.py's closure).
"""
from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from pipeline.codeversion import ImportGraph
from stages import REGISTRY

RECIPES = [REPO / "pipeline.yaml", *sorted((REPO / "recipes").glob("*.yaml"))]
ENGINE = ("run", "ray", "tracking", "plan", "graph")
ALSO_READ_BY = {"backbone": ["planning.estimate"], "data": ["planning.estimate"], "train": ["planning.estimate"],
                "twotower": ["planning.estimate"], "plan": ["planning.estimate"]}


@cache
def attributes_read(modules: tuple[str, ...], root: Path = REPO) -> frozenset[str]:
    graph = ImportGraph(root)
    files = {f for m in modules for f in graph.closure(graph.file_of(m))}
    return frozenset(node.attr for f in files for node in ast.walk(ast.parse(f.read_text()))
                     if isinstance(node, ast.Attribute))


@cache
def readers(section: str) -> tuple[str, ...]:
    import importlib

    if section in ENGINE:
        return ("pipeline.cli",) + tuple(ALSO_READ_BY.get(section, []))
    owners = [m for m in REGISTRY.values() if importlib.import_module(m).SECTION == section]
    return tuple(owners + ALSO_READ_BY.get(section, []))


def recipe_keys(path: Path) -> list[tuple[str, str, str]]:
    """(section, dotted key, leaf name) for every key set in the recipe."""
    data = yaml.safe_load(path.read_text()) or {}
    out = []
    for section, body in data.items():
        if not isinstance(body, dict):
            continue
        for key, value in body.items():
            if section == "graph" and isinstance(value, dict):
                for sub, subvalue in value.items():
                    out.append((section, f"graph.{key}.{sub}", sub))
                    if isinstance(subvalue, dict):
                        out += [(section, f"graph.{key}.{sub}.{leaf}", leaf) for leaf in subvalue]
            elif section != "graph":
                out.append((section, f"{section}.{key}", key))
    return out


CASES = [(path.name, *key) for path in RECIPES for key in recipe_keys(path)]


def test_the_recipes_have_keys_to_check() -> None:
    assert len(CASES) > 60 and {c[1] for c in CASES} >= {"data", "train", "calibrate", "evaluate", "graph", "run"}


@pytest.mark.parametrize("recipe, section, dotted, leaf", CASES, ids=[f"{c[0]}:{c[2]}" for c in CASES])
def test_every_recipe_key_is_read_by_its_sections_code(recipe: str, section: str, dotted: str, leaf: str) -> None:
    owners = readers(section)
    assert owners, f"{recipe}: section '{section}' has no owning module"
    assert leaf in attributes_read(owners), f"{recipe}: {dotted} is set but {owners} never read `.{leaf}`"


def test_a_key_nobody_reads_is_caught(tmp_path: Path) -> None:
    """The check itself, on a stage with one field it reads (through a helper module it imports)
    and one it only declares."""
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "__init__.py").write_text("")
    (tmp_path / "stages" / "helper.py").write_text("def steps(cfg):\n    return cfg.used_by_helper\n")
    (tmp_path / "stages" / "fake.py").write_text(
        "from dataclasses import dataclass\n\n@dataclass\nclass Config:\n    used_by_helper: int = 1\n"
        "    declared_only: int = 2\n\ndef run(cfg, inputs, ctx):\n    from stages.helper import steps\n"
        "    return {'steps': steps(cfg)}\n")
    read = attributes_read(("stages.fake",), tmp_path)
    assert "used_by_helper" in read and "declared_only" not in read
