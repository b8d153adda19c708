"""Load, merge, resolve and validate a pipeline config: `pipeline.yaml` <- recipe <- CLI overrides.

    cfg = load_config("recipes/tiny.yaml", overrides=["train.max_steps=10", "~graph.export"])

Layers merge with OmegaConf (later wins; `graph.<stage>: null` in a recipe removes a stage), then
`${oc.env:NAME,default}` interpolations are resolved. Validation reports *every* problem at once —
unknown keys (with a typo suggestion), wrong types, missing values, bad overrides, unknown stages,
cycles — each naming its key and the file (or the command line) it came from, as one `ConfigError`.
The CLI prints it and exits with status 2. Stage modules are imported here (they are light by
contract) to read their `SECTION` and `Config`; nothing heavy is imported.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from pipeline.codeversion import ImportGraph, code_version
from pipeline.dag import Dag, build_dag, dag_problems
from pipeline.layers import CLI, Problem, delete_key, load_yaml, origin, parse_overrides, resolve
from pipeline.schema import (
    ENGINE_SECTIONS,
    RayConfig,
    RunConfig,
    StageSpec,
    TrackingConfig,
    build,
    check_dataclass,
    suggest,
    to_plain,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULTS_FILE = REPO_ROOT / "pipeline.yaml"
DEFAULT_RECIPE = REPO_ROOT / "recipes" / "tiny.yaml"


class ConfigError(ValueError):
    """The config is invalid; `problems` holds every error found (not only the first)."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = [f"{len(problems)} config error(s):"] + [f"  {p}" for p in problems]
        super().__init__("\n".join(lines))


@dataclass
class Stage:
    """A stage of the validated graph, with everything needed to run and cache it."""

    name: str
    """The stage's name in the graph."""
    spec: StageSpec
    """Its graph entry: needs, resources, retry policy."""
    module: str
    """Dotted path of the stage module (`SECTION`, `Config`, `run`); `module:attr` names an object."""
    section: str
    """The config section it reads."""
    config: dict[str, Any]
    """Its resolved section as plain data, defaults filled in, restricted to its `Config`'s fields."""
    code_version: str
    """The module's `VERSION` if it declares one, else a hash of every project file it imports
    (pipeline/codeversion.py)."""


@dataclass
class PipelineConfig:
    """A loaded, resolved and validated pipeline config."""

    run: RunConfig
    """The `run` section."""
    ray: RayConfig
    """The `ray` section."""
    tracking: TrackingConfig
    """The `tracking` section."""
    stages: dict[str, Stage]
    """The graph's stages, in topological order."""
    dag: Dag
    """The validated DAG."""
    resolved: dict[str, Any]
    """The whole resolved config as plain data (saved as `config.yaml` in the run directory)."""
    name: str
    """The run name (`run.name`, or the recipe's file stem)."""
    sources: list[str] = field(default_factory=list)
    """The files merged, lowest priority first, then the overrides."""


def _semantic_checks(order: list[str], modules: dict[str, ModuleType], sections: dict[str, dict[str, Any]],
                     problems: list[tuple[str, str]]) -> dict[str, Any]:
    """Value checks the types cannot express, before any stage runs (a bad calibration target must
    not surface after pretraining). Three hooks a stage module may offer: its `Config`'s own
    `__post_init__`, `validate(cfg)` for its section alone, and `check(sections)` across sections
    (e.g. the block size against `data.seq_len`). Each raises ValueError naming the key. A fourth,
    `check_resources(cfg, sections, resources, stage)`, checks a stage against its graph entry's
    resources (`_validate` calls it once the sections pass)."""
    built: dict[str, Any] = {}
    checked: set[Any] = set()  # by id: test stages may be unhashable namespaces
    for name in order:
        module = modules[name]
        section = module.SECTION
        try:
            built[name] = build(module.Config, sections[section])
            if hasattr(module, "validate") and (id(module), section) not in checked:
                module.validate(built[name])
            if hasattr(module, "check") and id(module) not in checked:
                module.check(sections)
        except ValueError as err:
            problems.append((section, str(err)))
        checked.update({(id(module), section), id(module)})
    return built


def registry(extra: dict[str, str] | None = None) -> dict[str, str]:
    """`stages.REGISTRY` plus `extra` (name -> module path), e.g. stages defined by tests."""
    try:
        from stages import REGISTRY
    except ImportError:
        REGISTRY = {}
    return {**REGISTRY, **(extra or {})}


def import_stage(path: str) -> Any:
    """The stage object at `path`: a module (`stages.export`) or a module attribute (`tests_mod:stage`)."""
    module_path, _, attr = path.partition(":")
    module = importlib.import_module(module_path)
    return getattr(module, attr) if attr else module


def _import_stage(name: str, path: str) -> tuple[Any, str | None]:
    try:
        module = import_stage(path)
    except Exception as err:  # missing module, or an error inside it: report, do not crash
        return None, f"stage module '{path}' cannot be imported: {type(err).__name__}: {err}"
    try:
        missing = [a for a in ("SECTION", "Config", "run") if not hasattr(module, a)]
        if missing:
            return None, f"stage module '{path}' lacks {', '.join(missing)} (see stages/api.py)"
        if not dataclasses.is_dataclass(module.Config):
            return None, f"stage module '{path}': Config must be a dataclass"
    except Exception as err:  # a lazy `Config` (PEP 562 __getattr__) that fails to import
        return None, f"stage module '{path}': Config cannot be loaded: {type(err).__name__}: {err}"
    return module, None


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None, *,
                defaults: str | Path | None = None, stages_registry: dict[str, str] | None = None,
                overlays: list[str | Path] | None = None) -> PipelineConfig:
    """Merge `defaults` (pipeline.yaml) <- `recipe` <- `overlays` (files, in order) <- `overrides`,
    resolve and validate.

    Raises `ConfigError` with every problem found. `stages_registry` adds stage modules to
    `stages.REGISTRY` (a graph entry may also name its module with `graph.<name>.module`).
    """
    from omegaconf import OmegaConf
    defaults_path = Path(defaults) if defaults is not None else DEFAULTS_FILE
    problems: list[Problem] = []
    layers: list[tuple[str, Any]] = []
    sources = [str(defaults_path)]
    configs = []
    base = load_yaml(defaults_path, problems)
    if base is not None:
        configs.append(base)
        layers.append((str(defaults_path), OmegaConf.to_container(base, resolve=False)))
    if recipe is not None:
        sources.append(str(recipe))
        rec = load_yaml(Path(recipe), problems)
        if rec is not None:
            configs.append(rec)
            layers.append((str(recipe), OmegaConf.to_container(rec, resolve=False)))
    for overlay in overlays or []:  # a documented variant of the recipe, e.g. a CPU rehearsal
        sources.append(str(overlay))
        layer = load_yaml(Path(overlay), problems)
        if layer is not None:
            configs.append(layer)
            layers.append((str(overlay), OmegaConf.to_container(layer, resolve=False)))
    over, deletes = parse_overrides(list(overrides or []), problems)
    layers.append((CLI, OmegaConf.to_container(over, resolve=False)))
    if problems:
        raise ConfigError(problems)
    merged = OmegaConf.merge(*configs, over)
    for key in deletes:
        if not delete_key(merged, key):
            problems.append(Problem(f"~{key}", f"cannot delete '{key}': no such key in the config", CLI))
    raw_problems: list[tuple[str, str]] = []
    interpolated: dict[str, str] = {}
    plain = resolve(merged, "", raw_problems, interpolated)
    unresolved = {key for key, _ in raw_problems}
    cfg = _validate(plain, raw_problems, registry(stages_registry))
    seen: set[str] = set()
    for key, message in raw_problems:
        if key in unresolved and key in seen:
            continue  # its value is unknown: the resolution error says it all
        seen.add(key)
        if key in interpolated and interpolated[key] not in message:
            message += f" (the value comes from {interpolated[key]!r}: is the variable set?)"
        problems.append(Problem(key, message, origin(key, layers)))
    if problems or cfg is None:
        raise ConfigError(problems)
    cfg.sources = sources + ([f"{CLI}: {' '.join(overrides)}"] if overrides else [])
    cfg.name = cfg.run.name or (Path(recipe).stem if recipe is not None else "default")
    return cfg


def _validate(plain: dict[str, Any], problems: list[tuple[str, str]], reg: dict[str, str]
              ) -> PipelineConfig | None:
    """Type-check every section of the resolved config; append problems; the config if none."""
    graph_raw = plain.get("graph") or {}
    if not isinstance(graph_raw, dict):
        problems.append(("graph", f"expected a mapping of stage name -> spec, got {graph_raw!r}"))
        graph_raw = {}
    graph_raw = {k: v for k, v in graph_raw.items() if v is not None}  # `stage: null` removes it
    if not graph_raw:
        problems.append(("graph", "the stage graph is empty"))
    specs: dict[str, StageSpec] = {}
    invalid: set[str] = set()  # stages with a bad spec: still stages, so others may need them
    for name, raw in graph_raw.items():
        found = check_dataclass(raw, StageSpec, f"graph.{name}")
        problems += found
        if not found:
            specs[name] = build(StageSpec, raw)
        else:
            invalid.add(name)
    modules: dict[str, ModuleType] = {}
    for name, spec in specs.items():
        path = spec.module or reg.get(name)
        if path is None:
            problems.append((f"graph.{name}", f"unknown stage '{name}'{suggest(name, reg)}; registered "
                             f"stages: {', '.join(sorted(reg))} (or set graph.{name}.module)"))
            continue
        module, error = _import_stage(name, path)
        if error:
            problems.append((f"graph.{name}", error))
        else:
            modules[name] = module
    requires = {n: tuple(getattr(m, "REQUIRES", ())) for n, m in modules.items()}
    needs = {n: list(s.needs) for n, s in specs.items()}
    needs.update({n: [] for n in invalid})  # their own needs are already reported as wrong
    problems += dag_problems(needs if specs else {}, requires)

    readers: dict[str, list[ModuleType]] = {}
    for module in modules.values():
        if module not in readers.get(module.SECTION, []):
            readers.setdefault(module.SECTION, []).append(module)
    # A section only a registered stage outside the graph reads (e.g. `pretrain` without the tiny
    # recipe) stays a valid key. Only leftover keys cost imports: a lazy `Config` may be slow.
    leftover = set(plain) - set(ENGINE_SECTIONS) - {"graph"} - set(readers)
    others: dict[str, list[ModuleType]] = {}
    for name, path in reg.items():
        if name in specs or not leftover:
            continue
        try:
            section = getattr(import_stage(path), "SECTION", None)
        except Exception:
            continue
        if section in leftover:
            module, _ = _import_stage(name, path)
            if module is not None:
                others.setdefault(section, []).append(module)
    allowed = set(ENGINE_SECTIONS) | {"graph"} | set(readers) | set(others)
    for key in plain:
        if key not in allowed:
            problems.append((key, f"unknown top-level section{suggest(key, allowed)} "
                             f"(valid: {', '.join(sorted(allowed))})"))
    engine = {}
    for key, schema in ENGINE_SECTIONS.items():
        value = plain.get(key) or {}
        found = check_dataclass(value, schema, key)
        problems += found
        engine[key] = build(schema, value) if not found else schema()
    sections: dict[str, dict[str, Any]] = {}
    for section, mods in [*readers.items(), *others.items()]:
        in_graph = section in readers
        if not in_graph and section not in plain:
            continue
        value = plain.get(section)
        value = {} if value is None else value
        known = {f.name for m in mods for f in dataclasses.fields(m.Config)}
        for module in mods:
            problems += [p for p in check_dataclass(value, module.Config, section, known, require=in_graph)
                         if p not in problems]
        sections[section] = value
    if problems:
        return None
    dag = build_dag({n: list(s.needs) for n, s in specs.items()}, requires)
    built = _semantic_checks(dag.order, modules, sections, problems)
    for name in dag.order:  # a stage's settings against its own reservation (GPUs, devices)
        hook = getattr(modules[name], "check_resources", None)
        if hook is not None and name in built:
            try:
                hook(built[name], sections, specs[name].resources, name)
            except ValueError as err:
                problems.append((f"graph.{name}.resources", str(err)))
    if problems:
        return None
    stages = {}
    imports = ImportGraph()  # files parsed once for all stages
    for name in dag.order:
        module = modules[name]
        config = to_plain(built[name])
        path = specs[name].module or reg[name]
        stages[name] = Stage(name=name, spec=specs[name], module=path, section=module.SECTION,
                             config=config, code_version=code_version(module, imports))
    resolved = {key: to_plain(engine[key]) for key in ENGINE_SECTIONS}
    resolved["graph"] = {n: to_plain(specs[n]) for n in specs}
    for section in others:
        if section in sections:
            resolved[section] = sections[section]
    for section, mods in readers.items():
        merged: dict[str, Any] = {}
        for module in mods:
            merged.update(to_plain(build(module.Config, sections[section])))
        resolved[section] = merged
    return PipelineConfig(run=engine["run"], ray=engine["ray"], tracking=engine["tracking"],
                          stages=stages, dag=dag, resolved=resolved, name="")
