"""DAG validation (graphlib): cycles, unknown upstream stages, missing required inputs, order; and the
schema checker's handling of required fields and nested types.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.dag import DagError, build_dag
from pipeline.schema import build, check_dataclass


def test_order_is_topological_and_stable() -> None:
    dag = build_dag({"a": [], "b": ["a"], "c": ["a"], "d": ["c", "b"]})
    assert dag.order == ("a", "b", "c", "d")
    assert dag.descendants({"b"}) == {"b", "d"} and dag.ancestors("d") == {"a", "b", "c"}


def test_all_problems_reported_together() -> None:
    with pytest.raises(DagError) as info:
        build_dag({"a": ["zz"], "b": ["b"], "c": []}, requires={"c": ("a",)})
    keys = [k for k, _ in info.value.problems]
    assert keys == ["graph.a.needs[0]", "graph.b.needs[0]", "graph.c.needs"]


def test_cycle_is_named() -> None:
    with pytest.raises(DagError, match=r"cycle in the stage graph: "):
        build_dag({"a": ["c"], "b": ["a"], "c": ["b"]})


def test_cycle_in_config_is_a_config_error(engine_defaults: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "cycle.yaml"
    recipe.write_text("graph: {source: {needs: [combine]}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(recipe, defaults=engine_defaults)
    (problem,) = info.value.problems
    assert "cycle" in problem.message and problem.source == str(recipe)


@dataclass
class Inner:
    """Nested section."""

    width: int = 4
    """A width."""


@dataclass
class Outer:
    """A schema with a required field."""

    name: str
    """Required."""
    inner: Inner = field(default_factory=Inner)
    """Nested dataclass."""
    sizes: tuple[int, ...] = (1, 2)
    """A tuple."""
    kind: Literal["a", "b"] = "a"
    """A choice."""
    ratio: float | None = None
    """Optional float (ints accepted)."""


def test_schema_required_nested_and_coercion() -> None:
    problems = check_dataclass({"inner": {"widht": 3}, "sizes": [1, "x"], "kind": "c"}, Outer, "s")
    assert {k for k, _ in problems} == {"s.name", "s.inner.widht", "s.sizes[1]", "s.kind"}
    obj = build(Outer, {"name": "n", "inner": {"width": 2}, "sizes": [3], "ratio": 1})
    assert obj.inner.width == 2 and obj.sizes == (3,) and obj.ratio == 1.0 and isinstance(obj.ratio, float)
    assert check_dataclass({"name": "n", "ratio": True}, Outer, "s")  # a bool is not a float
