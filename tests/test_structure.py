"""The house rules, read from the source with `ast`: import cycles between the project's modules and
module length.

Every import counts, wherever it sits (module level, inside a function, under `TYPE_CHECKING`): a
local import hides a cycle from the interpreter, not from a reader. The cycles and long modules
that remain are listed here by name, so the check fails both when a new one appears and when a
listed one is gone (then shorten the list): the lists only shrink.

    python -m pytest -q tests/test_structure.py
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "planning", "stages", "twotower", "adapters", "bench", "serving")
MAX_LINES = 400

KNOWN_CYCLES: set[frozenset[str]] = set()
"""Import cycles not yet broken (each one a strongly connected component of the import graph)."""
KNOWN_LONG: dict[str, int] = {}
"""Modules over MAX_LINES not yet split, with the length they may not exceed."""


def modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).rglob("*.py")):
            parts = f.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports (an `from a.b import c` counts `a.b.c` when that is a module)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            out.add(base)
            out |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in out if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.add(frozenset(component))
    return found


def test_cycle_finder_finds_a_cycle_and_nothing_else():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == {frozenset("abc")}


def test_no_new_import_cycles_and_none_listed_that_are_gone():
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    found = cycles(graph)
    assert not found - KNOWN_CYCLES, f"new import cycles: {[sorted(c) for c in found - KNOWN_CYCLES]}"
    assert not KNOWN_CYCLES - found, (f"broken cycles still listed in KNOWN_CYCLES: "
                                      f"{[sorted(c) for c in KNOWN_CYCLES - found]}")


def test_no_module_grows_past_its_limit():
    lengths = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    over = {name: n for name, n in lengths.items() if n > KNOWN_LONG.get(name, MAX_LINES)}
    assert not over, f"modules over {MAX_LINES} lines (or past their listed length): {over}"
    split = {name for name in KNOWN_LONG if lengths.get(name, 0) <= MAX_LINES}
    assert not split, f"modules now at most {MAX_LINES} lines, drop them from KNOWN_LONG: {sorted(split)}"


RAY_MODULES = {"stages.training.train_distributed", "stages.training.distributed_worker"}
"""The only code below the engine that imports Ray: distributed training hands a fit to Ray Train.
Every other stage, helper, planner and the runtime runs the same under Ray, in-process, or alone."""


def _imported_names(path: Path) -> set[str]:
    """Every absolute module name `path` imports (third-party ones included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module)
    return out


def test_ray_is_imported_only_by_the_engine_and_distributed_training():
    below_engine = {name: path for name, path in modules().items()
                    if name.split(".")[0] in ("stages", "planning", "twotower", "adapters")}
    importing = {name for name, path in below_engine.items()
                 if any(m == "ray" or m.startswith("ray.") for m in _imported_names(path))}
    assert importing == RAY_MODULES, (
        f"Ray imported outside the engine by {sorted(importing - RAY_MODULES)}" if importing - RAY_MODULES
        else f"no longer importing Ray, drop from RAY_MODULES: {sorted(RAY_MODULES - importing)}")


def test_stages_folder_holds_the_stages_and_subpackages_the_helpers():
    """A module directly in `stages/` is a stage (registered, with a SECTION); one in a subpackage
    (`stages/data/`, `stages/backbones/`, ...) is a helper and never declares one."""
    from stages import REGISTRY

    def declares_section(path: Path) -> bool:
        return any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SECTION" for t in node.targets)
                   for node in ast.parse(path.read_text()).body)

    top = {name for name, path in modules().items()
           if name.count(".") == 1 and name.startswith("stages.") and path.name != "__init__.py"} - {"stages.api"}
    assert top == set(REGISTRY.values()), (f"top-level modules of stages/ that are not stages: "
                                           f"{sorted(top - set(REGISTRY.values()))}")
    assert all(declares_section(modules()[name]) for name in top)
    helpers_with_section = [name for name, path in modules().items()
                            if name.startswith("stages.") and name.count(".") > 1 and declares_section(path)]
    assert not helpers_with_section, f"stage helpers declaring a SECTION (move them to stages/): {helpers_with_section}"


def test_the_engine_reaches_stages_only_through_the_registry_and_the_api():
    """`pipeline/` imports `stages` (the REGISTRY) and `stages.api` and nothing else of the stages:
    it runs a stage by name, never by reaching into its helpers."""
    reaching = {name: sorted(m for m in _imported_names(path)
                             if m.startswith("stages.") and m != "stages.api")
                for name, path in modules().items() if name.startswith("pipeline")}
    assert not {k: v for k, v in reaching.items() if v}, reaching
