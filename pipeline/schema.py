"""Typed schemas of the engine's own config sections, and a checker for any dataclass schema.

The engine's sections (`run`, `ray`, `tracking`, `graph`) are dataclasses here; every stage section
is typed by its stage module's `Config`. `check(value, schema, path)` walks a plain (resolved) dict
against a dataclass and returns *every* problem at once, each naming its dotted key, where
OmegaConf's structured merge stops at the first one and cannot express `Literal` or `tuple`.
`build(schema, value)` then turns a checked dict into the dataclass instance.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from stages.api import Range

MISSING = "???"
"""OmegaConf's marker for a mandatory value; a field still holding it is reported as missing."""


@dataclass
class Resources:
    """What one stage asks of the Ray cluster (also checked against it before anything runs)."""

    num_cpus: Annotated[float, Range(0)] = 1.0
    """CPU cores reserved for the stage's Ray task."""
    num_gpus: Annotated[float, Range(0)] = 0.0
    """GPUs reserved for the stage's Ray task; the run fails at once if no node has them."""
    memory_gb: Annotated[float, Range(0, low_open=True)] | None = None
    """Memory reserved for the task, in GiB (None: no reservation)."""


@dataclass
class StageSpec:
    """One node of the stage graph (`graph.<name>` in pipeline.yaml)."""

    needs: list[str] = field(default_factory=list)
    """Upstream stages whose manifests this stage receives as `inputs`."""
    resources: Resources = field(default_factory=Resources)
    """Ray resources of the stage's task."""
    module: str | None = None
    """Dotted module path of the stage; None: looked up in `stages.REGISTRY` by the stage name."""
    retries: Annotated[int, Range(0)] = 0
    """How many times a transient failure (see `retry_on`) or a dead worker is retried."""
    retry_on: list[str] = field(default_factory=lambda: ["ConnectionError", "TimeoutError"])
    """Exception class names (or base class names) treated as transient."""


@dataclass
class RunConfig:
    """Where runs and artifacts live, and how the stages are executed."""

    root: str = "runs"
    """Artifact store and run directories (a shared filesystem on a cluster)."""
    name: str | None = None
    """Run name used in `runs/<timestamp>-<name>`; None: the recipe's file name."""
    seed: Annotated[int, Range(0)] = 0
    """The run's seed, handed to every stage as `ctx.seed` (part of every cache key)."""
    runner: Literal["ray", "local"] = "ray"
    """`ray`: each stage is a Ray task; `local`: stages run in this process (tests, debugging)."""
    verify_checksums: bool = False
    """Re-hash every file of a cached artifact before reusing it (sizes are always checked)."""
    lock_stale_s: Annotated[float, Range(0, low_open=True)] = 60.0
    """A stage key's lock (`pipeline/locks.py`) whose heartbeat is older than this is broken and the
    stage resumes from its checkpoints in another run (a dead pid on the same host is noticed at once)."""


@dataclass
class RayConfig:
    """How to reach Ray."""

    address: str | None = None
    """Cluster address (`auto`, `ray://host:10001`, ...); None: start an embedded local Ray."""
    num_cpus: Annotated[int, Range(1)] | None = None
    """CPUs of the embedded local Ray; None: all cores."""
    object_store_mb: Annotated[int, Range(64)] = 256
    """Object store of the embedded local Ray, in MiB (manifests are small; tensors stay on disk)."""
    ship_code: bool = False
    """Upload the repository to the cluster (Ray `runtime_env.working_dir`, without runs/, .venv/,
    .git/) instead of relying on it being at the same path on every node. `run.root` must still be
    a filesystem every node mounts."""


@dataclass
class TrackingConfig:
    """MLflow tracking."""

    enabled: bool = True
    """Log the run to MLflow (a parent run per pipeline run, a nested run per stage)."""
    uri: str | None = None
    """Tracking URI; None: `sqlite:///<run.root>/mlflow.db` (MLflow 3 refuses the plain file store)."""
    experiment: str = "twotower"
    """MLflow experiment name."""
    probe_timeout_s: Annotated[float, Range(0, low_open=True)] = 3.0
    """`validate` and the start of `run` check that `tracking.uri` answers within this many seconds."""
    required: bool = True
    """A tracking URI that does not answer is an error (exit 2); false: warn and run untracked."""


@dataclass
class PlanConfig:
    """Assumptions of `python -m pipeline plan`'s memory estimate (planning/estimate.py)."""

    context_len: Annotated[int, Range(1)] = 4096
    """Context length (prompt + generated tokens) the decoding memory estimate is sized for."""
    num_gpus: Annotated[int, Range(1)] | None = None
    """GPUs the training estimate is sized for; None: from `train` (workers x devices)."""
    gpu_memory_gib: Annotated[float, Range(0, low_open=True)] | None = None
    """Memory of one accelerator in GiB; None: `backbone.device_memory_gb`, else 80."""


ENGINE_SECTIONS: dict[str, type] = {"run": RunConfig, "ray": RayConfig, "tracking": TrackingConfig,
                                    "plan": PlanConfig}
"""Top-level sections the engine owns besides `graph` (whose values are `StageSpec`s)."""


def suggest(word: str, choices: typing.Iterable[str]) -> str:
    """`; did you mean 'x'?` for a likely typo, else an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _hints(schema: type) -> dict[str, Any]:
    try:  # each field's hint in the module of the class that declares it (inherited fields too)
        return typing.get_type_hints(schema, include_extras=True)
    except NameError:
        module = __import__(schema.__module__, fromlist=["_"])
        return typing.get_type_hints(schema, globalns=vars(module), include_extras=True)


def _check_scalar(value: Any, tp: type) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is Path:
        return isinstance(value, (str, Path))
    return isinstance(value, tp)


def check(value: Any, tp: Any, path: str) -> list[tuple[str, str]]:
    """Every `(dotted key, problem)` of `value` against type `tp` (a dataclass or a type hint)."""
    if isinstance(value, str) and value == MISSING:
        return [(path, "missing value (set it in the recipe or with key=value)")]
    if tp is Any or tp is object:
        return []
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:  # a type with constraints, e.g. Annotated[int, Range(1)]
        base, *constraints = typing.get_args(tp)
        problems = check(value, base, path)
        if problems:
            return problems
        for constraint in constraints:
            message = constraint.violation(value) if hasattr(constraint, "violation") else None
            if message:
                return [(path, message)]
        return []
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return []
        problems = [check(value, opt, path) for opt in options if opt is not type(None)]
        if any(not p for p in problems):
            return []
        if len(problems) == 1:
            return problems[0]
        return [(path, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")]
    if value is None:
        return [(path, f"expected {_type_name(tp)}, got null")]
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return []
        hint = suggest(str(value), [str(a) for a in allowed])
        return [(path, f"must be one of {list(allowed)}, got {value!r}{hint}")]
    if dataclasses.is_dataclass(tp):
        return check_dataclass(value, tp, path)
    if origin in (list, tuple, typing.Sequence, set, frozenset) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return [(path, f"expected a list ({_type_name(tp)}), got {type(value).__name__} {value!r}")]
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                return [(path, f"expected {len(args)} items ({_type_name(tp)}), got {len(value)}")]
            return [p for i, (v, a) in enumerate(zip(value, args)) for p in check(v, a, f"{path}[{i}]")]
        item = args[0] if args else Any
        return [p for i, v in enumerate(value) for p in check(v, item, f"{path}[{i}]")]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            return [(path, f"expected a mapping, got {type(value).__name__} {value!r}")]
        args = typing.get_args(tp)
        item = args[1] if args else Any
        return [p for k, v in value.items() for p in check(v, item, f"{path}.{k}")]
    if isinstance(tp, type):
        if _check_scalar(value, tp):
            return []
        return [(path, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")]
    return []  # a hint we do not understand (a Protocol, a TypeVar): accept rather than guess


def check_dataclass(value: Any, schema: type, path: str, known: set[str] | None = None,
                    require: bool = True) -> list[tuple[str, str]]:
    """Problems of a mapping against a dataclass: unknown keys, missing required fields, types.

    `known` widens the accepted keys (a section read by several stages with different `Config`s);
    `require=False` skips the missing-value check (a section no stage of the graph reads).
    """
    if not isinstance(value, dict):
        return [(path, f"expected a mapping ({schema.__name__}), got {type(value).__name__} {value!r}")]
    hints = _hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    accepted = set(fields) | (known or set())
    prefix = f"{path}." if path else ""
    problems: list[tuple[str, str]] = []
    removed = getattr(schema, "REMOVED_KEYS", {})  # key -> what replaced it (a class attribute)
    for key in value:
        if key in removed and key not in accepted:
            problems.append((prefix + str(key), removed[key]))
        elif key not in accepted:
            problems.append((prefix + str(key), f"unknown key{suggest(str(key), accepted)} "
                             f"(valid keys: {', '.join(sorted(accepted))})"))
    for name, f in fields.items():
        if name in value:
            problems += check(value[name], hints[name], prefix + name)
        elif require and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append((prefix + name, f"missing value: {schema.__name__}.{name} has no default "
                             "(set it in the recipe or with key=value)"))
    return problems


def build(schema: type, value: dict[str, Any]) -> Any:
    """The dataclass instance for a mapping already accepted by `check_dataclass` (extra keys ignored)."""
    hints = _hints(schema)
    kwargs = {}
    for f in dataclasses.fields(schema):
        if f.name in value:
            kwargs[f.name] = _build_value(hints[f.name], value[f.name])
    return schema(**kwargs)


def _build_value(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _build_value(typing.get_args(tp)[0], value)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        for opt in typing.get_args(tp):
            if opt is not type(None) and not check(value, opt, ""):
                return _build_value(opt, value)
        return value
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return build(tp, value)
    if origin is tuple or tp is tuple:
        args = typing.get_args(tp)
        if args and args[-1] is not Ellipsis:
            return tuple(_build_value(a, v) for a, v in zip(args, value))
        return tuple(_build_value(args[0] if args else Any, v) for v in value)
    if origin is list or tp is list:
        args = typing.get_args(tp)
        return [_build_value(args[0] if args else Any, v) for v in value]
    if origin is dict or tp is dict:
        args = typing.get_args(tp)
        return {k: _build_value(args[1] if args else Any, v) for k, v in value.items()}
    if tp is float and isinstance(value, int):
        return float(value)
    if tp is Path:
        return Path(value)
    return value


def to_plain(obj: Any) -> Any:
    """A dataclass instance (or nested containers) as JSON-able plain data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
