"""Cache keys follow the code a stage actually imports (pipeline/codeversion.py).

The tests copy the project's packages into a temporary root, edit one file of the copy at a time and
recompute every stage key of the default recipe the way the runner does: the stages whose keys change
must be exactly those that import the edited file (directly or transitively) and their downstream
stages. Known edges are checked by name, so a walk that misses an import fails here.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from conftest import REPO

from pipeline.codeversion import PROJECT_PACKAGES, ImportGraph, source_version
from pipeline.config import load_config
from pipeline.runner import stage_keys

ALL_AFTER_PRETRAIN = {"duplicate_backbone", "freeze_context", "attach_conditioning", "train_denoiser",
                      "calibrate_gamma", "evaluate", "export"}
TRAIN_AND_AFTER = {"train_denoiser", "calibrate_gamma", "evaluate", "export"}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("project")
    for package in PROJECT_PACKAGES:
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.fixture(scope="module")
def tiny():
    return load_config(REPO / "recipes" / "tiny.yaml")


def keys_at(root: Path, cfg, graph: ImportGraph | None = None) -> dict[str, str]:
    """Every stage key of `cfg` with code versions read from the copy at `root` (through `graph`,
    whose parsed imports may be reused: the files' bytes are always read afresh)."""
    graph = graph or ImportGraph(root)
    stages = {name: dataclasses.replace(stage, code_version=source_version(graph.file_of(stage.module), graph))
              for name, stage in cfg.stages.items()}
    return stage_keys(dataclasses.replace(cfg, stages=stages))


def changed_by_edit(root: Path, cfg, relative: str, graph: ImportGraph | None = None,
                    before: dict[str, str] | None = None) -> set[str]:
    """The stages whose keys an appended comment in `relative` changes. `graph` and `before` may be
    shared across calls: a comment changes no file's imports, only its bytes."""
    before = before or keys_at(root, cfg, graph)
    path = root / relative
    original = path.read_bytes() if path.exists() else None
    path.write_bytes((original or b"") + b"\n# an edit\n")
    try:
        after = keys_at(root, cfg, graph)
    finally:
        if original is None:
            path.unlink()
        else:
            path.write_bytes(original)
    return {name for name in before if before[name] != after[name]}


@pytest.mark.parametrize("relative, expected", [
    ("stages/training/train_distributed.py", TRAIN_AND_AFTER),  # once missing from train_denoiser's list
    ("stages/evaluation/decoding_eval.py", {"calibrate_gamma", "evaluate", "export"}),  # export imports it in run()
    ("stages/evaluation/confidence.py", {"calibrate_gamma", "evaluate", "export"}),  # via decoding_eval, in a function
    ("stages/train_denoiser.py", TRAIN_AND_AFTER),  # freeze/attach do not import it
    ("stages/pretrain_backbone.py", {"pretrain_backbone"} | ALL_AFTER_PRETRAIN),
    ("twotower/data.py", TRAIN_AND_AFTER),  # row layout: training only
    ("twotower/model.py", ALL_AFTER_PRETRAIN),  # via the lazy table (stages.backbones.loading builds the model)
    ("adapters/llama.py", ALL_AFTER_PRETRAIN),  # `import adapters` runs every family module
    ("stages/data/tasks.py", {"prepare_data", "pretrain_backbone"} | ALL_AFTER_PRETRAIN),
    ("pipeline/display.py", set()),  # the engine's display is no stage's code
    ("twotower/not_imported.py", set()),  # a new module nobody imports
])
def test_an_edit_changes_exactly_the_importers_and_their_downstream(project: Path, tiny, relative: str,
                                                                    expected: set[str]) -> None:
    assert changed_by_edit(project, tiny, relative) == expected


def test_every_project_file_invalidates_its_importers_and_no_other_stage(project: Path, tiny) -> None:
    """All files at once: changed keys == descendants of the stages whose import closure holds it."""
    graph = ImportGraph(project)
    closures = {name: set(graph.closure(graph.file_of(stage.module))) for name, stage in tiny.stages.items()}
    files = sorted(p for package in PROJECT_PACKAGES for p in (project / package).rglob("*.py"))
    assert len(files) > 30
    before = keys_at(project, tiny, graph)
    assert keys_at(project, tiny) == before  # the shared graph reads what a fresh one reads
    for path in files:
        importers = {name for name, files_of in closures.items() if path in files_of}
        expected = tiny.dag.descendants(importers) if importers else set()
        assert changed_by_edit(project, tiny, str(path.relative_to(project)), graph, before) == expected, path


def test_the_walk_follows_function_local_relative_and_lazy_factory_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "stages"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("REGISTRY = {'a': 'stages.a'}\n")
    (pkg / "a.py").write_text("def run():\n    from . import b\n    return 'stages.c:Thing'\n")
    (pkg / "b.py").write_text("")
    (pkg / "c.py").write_text("from stages import d\n")
    (pkg / "d.py").write_text("import json\n")
    (pkg / "e.py").write_text("")  # named by nothing (REGISTRY strings are not imports)
    graph = ImportGraph(tmp_path, ("stages",))
    names = [graph.name_of(p) for p in graph.closure(pkg / "a.py")]
    assert names == ["stages", "stages.a", "stages.b", "stages.c", "stages.d"]


def test_the_engine_keys_use_the_derived_version() -> None:
    cfg = load_config(REPO / "recipes" / "tiny.yaml")
    graph = ImportGraph()
    for stage in cfg.stages.values():
        assert stage.code_version == source_version(graph.file_of(stage.module), graph)
    import stages

    assert not [m for m in stages.REGISTRY.values() if hasattr(__import__(m, fromlist=["_"]), "DEPENDS")]
