"""A stage's code version, derived from the project code it imports (part of every cache key).

A hand-kept list of "the shared code this stage runs" drifts: a stage imports a new helper and
nobody adds it, so editing the helper does not invalidate the cache and a stale artifact is reused.
So the engine reads the imports itself. Starting at the file that defines the stage, it parses every
`import` / `from ... import` statement (anywhere in the file: stages import heavy code inside
functions) with `ast`, keeps those that resolve to a file of the project's packages (`pipeline`,
`stages`, `twotower`, `adapters`), and follows them transitively. The code version is the sha256 of
every file in that closure (path and bytes), so editing any module a stage imports, directly or
not, changes its key (and, through the upstream keys, those of its downstream stages), while an
edit to a module it never imports changes nothing.

Python's import semantics that the walk follows, because they decide what actually runs:
- importing `a.b.c` executes `a/__init__.py` and `a/b/__init__.py` first: they are in the closure;
- `from pkg import name` imports the submodule `pkg/name.py` when there is one;
- a package `__init__` that resolves names lazily (PEP 562) from a module-level table of literal
  strings (`{"TwoTowerConfig": "twotower.config", ...}`, as `twotower/__init__.py` does) is read as
  importing `table[name]` for each `name` taken from it (every entry for a plain `import pkg`);
- a literal `"package.module:attribute"` string (a lazily imported target, e.g. a
  `LazyFactory("stages.training.denoiser_module:DenoiserModule")`) is an import of `package.module`.
Nothing is imported to compute this: `validate` stays fast and free of heavy imports.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("pipeline", "planning", "stages", "twotower", "adapters")
"""The packages whose modules are walked and hashed; third-party code is versioned by the lock file."""


class ImportGraph:
    """The project's modules (files under `root`) and their imports, parsed once per instance."""

    def __init__(self, root: Path = REPO_ROOT, packages: tuple[str, ...] = PROJECT_PACKAGES):
        self.root = Path(root)
        self.packages = packages
        self._parsed: dict[Path, ast.Module] = {}

    # module name <-> file ----------------------------------------------------------------------
    def file_of(self, dotted: str) -> Path | None:
        """`a/b.py` or `a/b/__init__.py` for a project module name, else None (not ours)."""
        if dotted.split(".")[0] not in self.packages:
            return None
        base = self.root.joinpath(*dotted.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    def name_of(self, path: Path) -> str | None:
        try:
            rel = path.resolve().relative_to(self.root.resolve())
        except ValueError:
            return None
        parts = list(rel.with_suffix("").parts)
        if parts and parts[-1] == "__init__":
            parts = parts[:-1]
        return ".".join(parts) if parts and parts[0] in self.packages else None

    def _tree(self, path: Path) -> ast.Module:
        if path not in self._parsed:
            self._parsed[path] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        return self._parsed[path]

    # imports of one file -----------------------------------------------------------------------
    def _lazy_table(self, package_init: Path) -> dict[str, str]:
        """`name -> module` of a package's lazy-export table (a module-level dict of literal strings)."""
        table: dict[str, str] = {}
        for node in self._tree(package_init).body:
            value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
            if isinstance(value, ast.Dict):
                for k, v in zip(value.keys, value.values):
                    if (isinstance(k, ast.Constant) and isinstance(k.value, str) and isinstance(v, ast.Constant)
                            and isinstance(v.value, str) and self.file_of(v.value) is not None):
                        table[k.value] = v.value
        return table

    def _with_parents(self, dotted: str) -> list[Path]:
        """The files executed by importing `dotted`: every enclosing package's `__init__` and itself."""
        parts = dotted.split(".")
        files = []
        for i in range(1, len(parts) + 1):
            found = self.file_of(".".join(parts[:i]))
            if found is not None:
                files.append(found)
        return files

    def imports(self, path: Path) -> set[Path]:
        """The project files that importing (and running) the file at `path` executes directly."""
        here = self.name_of(path)
        is_package = path.name == "__init__.py"
        out: set[Path] = set()
        for node in ast.walk(self._tree(path)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    out.update(self._with_parents(alias.name))
                    init = self.file_of(alias.name)
                    if init is not None and init.name == "__init__.py":
                        out.update(f for m in self._lazy_table(init).values() for f in self._with_parents(m))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    if here is None:
                        continue
                    package = here.split(".") if is_package else here.split(".")[:-1]
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join(package + ([node.module] if node.module else []))
                out.update(self._with_parents(base))
                init = self.file_of(base)
                table = self._lazy_table(init) if init is not None and init.name == "__init__.py" else {}
                for alias in node.names:
                    sub = self.file_of(f"{base}.{alias.name}")
                    if sub is not None:
                        out.add(sub)
                    elif alias.name in table:
                        out.update(self._with_parents(table[alias.name]))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and ":" in node.value:
                module, _, attr = node.value.partition(":")
                if attr.isidentifier() and all(p.isidentifier() for p in module.split(".")):
                    out.update(self._with_parents(module))
        out.discard(path)
        return out

    def closure(self, path: Path) -> list[Path]:
        """`path` and every project file it imports, directly or transitively, sorted."""
        seen: set[Path] = set()
        todo = [Path(path)]
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            todo.extend(self.imports(current) - seen)
        return sorted(seen)


def _defining_file(stage: Any) -> Path | None:
    target = stage if isinstance(stage, ModuleType) else getattr(stage, "run", None)
    try:
        found = inspect.getsourcefile(target)  # type: ignore[arg-type]
    except TypeError:
        return None
    return Path(found) if found else None


def code_version(stage: Any, graph: ImportGraph | None = None) -> str:
    """`v:<VERSION>` when the stage declares one; else `sha:` of its import closure.

    A stage module is hashed with every project file it imports (see the module docstring). A
    stage object (`module:attr`, e.g. a test stage) is hashed by its `run` function's source plus
    the project files its defining module imports.
    """
    declared = getattr(stage, "VERSION", None)
    if declared is not None:
        return f"v:{declared}"
    graph = graph or ImportGraph()
    origin = _defining_file(stage)
    if origin is None:
        return "unknown"
    if isinstance(stage, ModuleType):
        return source_version(origin, graph)
    # a stage object: its own function, not the other stages its test module defines
    files = [p for p in graph.closure(origin) if p != origin]
    return _digest(graph, files, prefix=inspect.getsource(stage.run).encode())


def source_version(path: Path, graph: ImportGraph) -> str:
    """`sha:` of the file at `path` and every project file it imports, transitively."""
    return _digest(graph, graph.closure(Path(path)))


def _digest(graph: ImportGraph, files: list[Path], prefix: bytes = b"") -> str:
    digest = hashlib.sha256(prefix)
    for path in files:
        name = graph.name_of(path) or path.name
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return "sha:" + digest.hexdigest()[:16]
