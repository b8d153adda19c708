"""Small real stages for the engine's tests: `source -> scale -> combine` (combine also needs source).

Each is a stage object (`SECTION`, `Config`, `run`) addressed as `engine_stages:<name>` in a graph's
`module:` key. They write real files through `ctx.out_dir`, report progress and metrics, and append
one line per call to `<run root>/calls.log`, so tests can tell work done from work served from the
cache. `combine` can fail, fail transiently, or sleep (to be killed mid-stage).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

from stages.api import StageContext


def _log_call(ctx: StageContext) -> None:
    with open(ctx.run_dir.parent / "calls.log", "a") as fh:
        fh.write(f"{ctx.name} {os.getpid()}\n")


@dataclass
class SourceConfig:
    """Config of the `source` stage."""

    n: int = 4
    """How many numbers to emit."""
    start: float = 1.0
    """The first number."""
    mode: Literal["linear", "square"] = "linear"
    """How numbers grow."""


def run_source(cfg: SourceConfig, inputs: dict[str, dict], ctx: StageContext) -> dict[str, Any]:
    _log_call(ctx)
    import torch  # fixes this worker's thread pool, as a real stage does

    torch.zeros(2).sum()
    numbers = [cfg.start + (i if cfg.mode == "linear" else i * i) for i in range(cfg.n)]
    (ctx.out_dir / "numbers.json").write_text(json.dumps(numbers))
    return {"metrics": {"count": cfg.n}, "artifacts": {"numbers": ctx.artifact_path("numbers.json")},
            "numbers_path": Path(ctx.artifact_path("numbers.json"))}  # a Path: stored as a string


@dataclass
class ScaleConfig:
    """Config of the `scale` stage."""

    factor: float = 2.0
    """Multiplier applied to every number."""
    tags: list[str] | None = None
    """Free labels (exercises list typing)."""


def run_scale(cfg: ScaleConfig, inputs: dict[str, dict], ctx: StageContext) -> dict[str, Any]:
    _log_call(ctx)
    numbers = json.loads(Path(inputs["source"]["artifacts"]["numbers"]).read_text())
    scaled = [x * cfg.factor for x in numbers]
    (ctx.out_dir / "scaled.json").write_text(json.dumps(scaled))
    return {"metrics": {"total": sum(scaled)}, "artifacts": {"scaled": ctx.artifact_path("scaled.json")}}


@dataclass
class CombineConfig:
    """Config of the `combine` stage."""

    fail: bool = False
    """Raise a ValueError (a stage bug: never retried)."""
    transient_failures: int = 0
    """Raise ConnectionError on the first N attempts (counted in ctx.work_dir)."""
    sleep_s: float = 0.0
    """Sleep this long after writing a partial file, on the first attempt only (to be killed mid-stage;
    the attempt count lives in ctx.work_dir, which survives the kill)."""
    steps: int = 3
    """Progress steps reported."""
    bad_manifest: bool = False
    """Return a manifest holding a non-JSON object (the engine must refuse it, naming the stage)."""
    write_bytes: int = 0
    """Also write a file of this many bytes (a disk-full test runs it under a file-size limit)."""


def run_combine(cfg: CombineConfig, inputs: dict[str, dict], ctx: StageContext) -> dict[str, Any]:
    _log_call(ctx)
    attempts = ctx.work_dir / "attempts"
    n = int(attempts.read_text()) + 1 if attempts.exists() else 1
    attempts.write_text(str(n))
    if n <= cfg.transient_failures:
        raise ConnectionError(f"transient failure {n}")
    if cfg.fail:
        raise ValueError("combine exploded: the answer is 42")
    (ctx.out_dir / "partial.bin").write_bytes(b"x" * 1000)
    (ctx.run_dir / "combine.started").write_text(str(os.getpid()))
    if n == 1:
        time.sleep(cfg.sleep_s)
    numbers = json.loads(Path(inputs["source"]["artifacts"]["numbers"]).read_text())
    scaled = json.loads(Path(inputs["scale"]["artifacts"]["scaled"]).read_text())
    for step in range(cfg.steps):
        ctx.progress(step + 1, cfg.steps, "combining")
        ctx.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    result = [a + b for a, b in zip(numbers, scaled)]
    (ctx.out_dir / "result.json").write_text(json.dumps(result))
    (ctx.out_dir / "plot.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    ctx.log_artifact(ctx.out_dir / "plot.svg")  # logged once the artifact is in place
    (ctx.out_dir / "table.csv").write_text("a,b\n1,2\n")
    if cfg.write_bytes:
        with open(ctx.out_dir / "big.bin", "wb") as fh:
            for _ in range(0, cfg.write_bytes, 1 << 16):
                fh.write(b"\0" * (1 << 16))
    if cfg.bad_manifest:
        return {"metrics": {}, "weights": object()}
    return {"metrics": {"sum": sum(result), "nested": {"first": result[0]}},
            "artifacts": {"result": ctx.artifact_path("result.json"), "table": ctx.artifact_path("table.csv")},
            "pid": os.getpid(), "cwd": os.getcwd(), "torch_threads": _torch_threads()}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


@dataclass
class ShiftConfig:
    """Config of the `shift` stage, which shares the `scale` section with a different schema."""

    factor: float = 2.0
    """Read from the shared section too."""
    offset: float = 0.0
    """Only `shift` reads it."""


def run_shift(cfg: ShiftConfig, inputs: dict[str, dict], ctx: StageContext) -> dict[str, Any]:
    return {"metrics": {"offset": cfg.offset, "factor": cfg.factor}}


@dataclass
class MambaConfig:
    """Config of the `mamba` stage."""

    tokens: int = 8
    """Tokens in the forward."""


def run_mamba(cfg: MambaConfig, inputs: dict[str, dict], ctx: StageContext) -> dict[str, Any]:
    """A tiny Nemotron-H forward on the CPU, as a fresh stage process runs it: transformers' once-per-
    process kernel-fallback warnings are forgotten first, so each call logs them again."""
    import logging

    import torch
    from twotower_fixtures import tiny_backbone

    logging.Logger.warning_once.cache_clear()  # a new stage process: transformers has warned nothing yet
    model = tiny_backbone("nemotron_h")
    with torch.no_grad():
        logits = model(torch.zeros(1, cfg.tokens, dtype=torch.long)).logits
    return {"metrics": {"vocab": float(logits.shape[-1])}}


source = SimpleNamespace(SECTION="source", Config=SourceConfig, run=run_source)
mamba = SimpleNamespace(SECTION="mamba", Config=MambaConfig, run=run_mamba)
shift = SimpleNamespace(SECTION="scale", Config=ShiftConfig, run=run_shift)
scale = SimpleNamespace(SECTION="scale", Config=ScaleConfig, run=run_scale)
combine = SimpleNamespace(SECTION="combine", Config=CombineConfig, run=run_combine)

GRAPH_YAML = """\
run:
  root: {root}
  runner: local
ray:
  address: null
  num_cpus: 2
tracking:
  enabled: false
graph:
  source:  {{needs: [], module: "engine_stages:source", resources: {{num_cpus: 0.5}}}}
  scale:   {{needs: [source], module: "engine_stages:scale", resources: {{num_cpus: 0.5}}}}
  combine: {{needs: [source, scale], module: "engine_stages:combine", resources: {{num_cpus: 0.5}},
            retries: 2}}
source:
  n: 4
"""
"""A defaults file (pipeline.yaml stand-in) wiring the three stages; format with `root=`."""
