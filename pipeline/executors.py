"""Where stages execute: in this process (tests, debugging) or as Ray tasks (the default).

Both expose the same three calls the runner uses — `check(stages)` before anything is submitted,
`submit(name, job, stage)`, and `wait(timeout)` returning finished `(name, outcome)` pairs — plus
`close()`. Ray is imported only by `RayExecutor`.
"""
from __future__ import annotations

import logging
import os
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from pipeline.config import REPO_ROOT, Stage
from pipeline.contracts import Executor
from pipeline.schema import RayConfig
from pipeline.state import PipelineError
from pipeline.worker import execute

SHIP_EXCLUDES = ["runs/", ".venv/", ".git/", "**/__pycache__/", "*.egg-info/", "mlruns/", ".pytest_cache/"]
"""What `ray.ship_code` leaves out of the uploaded repository."""


class ResourceError(PipelineError):
    """A stage asks for resources no node of the cluster has (it would stay pending forever)."""


class NoExecutor:
    """The executor of a run served entirely from the cache: it is never asked to run a stage."""

    def submit(self, name: str, job: dict[str, Any], stage: Stage) -> None:
        """Unreachable: every stage of the plan was a cache hit before the run started."""
        raise PipelineError(f"stage '{name}' was to come from the cache, but no executor was started")

    def wait(self, timeout: float) -> list[tuple[str, dict[str, Any]]]:
        """Nothing ever runs."""
        return []

    def check(self, stages: list[Stage]) -> None:
        """Nothing to check: nothing runs."""

    def close(self) -> None:
        """Nothing to release."""


class LocalExecutor:
    """Runs each stage synchronously in this process, at submit time."""

    synchronous = True
    """The runner collects each outcome before submitting the next stage."""

    def __init__(self) -> None:
        self.finished: list[tuple[str, dict[str, Any]]] = []

    def check(self, stages: list[Stage]) -> None:
        """Nothing to check: the stage runs here, whatever it asks for."""

    def submit(self, name: str, job: dict[str, Any], stage: Stage) -> None:
        """Run the stage now; its outcome is returned by the next `wait`."""
        self.finished.append((name, execute(job)))

    def wait(self, timeout: float) -> list[tuple[str, dict[str, Any]]]:
        """The outcomes of the stages run since the last call."""
        done, self.finished = self.finished, []
        return done

    def close(self) -> None:
        """Nothing to release."""


def _import_root(module: str) -> str | None:
    """The sys.path entry a worker needs to import `module` (e.g. the repo root for `stages.x`)."""
    module = module.partition(":")[0]
    spec = find_spec(module)
    if spec is None or spec.origin is None:
        return None
    depth = module.count(".") + (1 if spec.origin.endswith("__init__.py") else 0)
    return str(Path(spec.origin).resolve().parents[depth])


def _worker_pythonpath(stages: list[Stage]) -> str:
    roots = [str(REPO_ROOT)] + [r for s in stages if (r := _import_root(s.module))]
    roots += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(roots))


class RayExecutor:
    """Each stage is a Ray task with its resources; a local Ray is started unless one is reachable."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None, object_store_mb: int = 256,
                 ship_code: bool = False):
        import ray
        self.ray = ray
        self.owns = False
        self.ship_code = ship_code
        if not ray.is_initialized():
            kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.WARNING,
                                          configure_logging=False)
            if address is None and not os.environ.get("RAY_ADDRESS"):
                kwargs.update(num_cpus=num_cpus, object_store_memory=object_store_mb * 2**20)
            if ship_code:  # Ray uploads a directory only for a whole job (ray.init), not per task
                kwargs["runtime_env"] = {"working_dir": str(REPO_ROOT), "excludes": SHIP_EXCLUDES}
            try:
                ray.init(address=address, **kwargs)
            except Exception as err:  # no cluster at that address, a version mismatch, ...
                where = address or os.environ.get("RAY_ADDRESS") or "a new local Ray"
                raise PipelineError(f"cannot start or join Ray ({where}): {type(err).__name__}: {err}; "
                                    "check ray.address / RAY_ADDRESS, or use --runner local") from None
            self.owns = True
        elif ship_code:
            raise PipelineError("ray.ship_code=true needs the engine to start or join Ray itself, but Ray "
                                "is already initialized in this process")
        self.remote = ray.remote(execute)
        self.running: dict[Any, str] = {}
        self.pythonpath = str(REPO_ROOT)

    def check(self, stages: list[Stage]) -> None:
        """Fail at once, naming the stage, if no alive node can ever hold a stage's resources."""
        nodes = [n["Resources"] for n in self.ray.nodes() if n.get("Alive")]
        totals = self.ray.cluster_resources()
        problems = []
        for stage in stages:
            need = self._request(stage)
            if not any(all(node.get(k, 0) >= v for k, v in need.items()) for node in nodes):
                have = {k: totals.get(k, 0) for k in need}
                problems.append(f"stage '{stage.name}' needs {_fmt(need)} but no Ray node has it "
                                f"(cluster total: {_fmt(have)}); lower graph.{stage.name}.resources "
                                "or join a bigger cluster with ray.address=... / RAY_ADDRESS")
        from pipeline.cluster import cluster_problems

        problems += cluster_problems(stages, totals)  # the stages' own worlds (train_denoiser's workers)
        if problems:
            raise ResourceError("\n".join(problems))
        self.pythonpath = _worker_pythonpath(stages)

    @staticmethod
    def _request(stage: Stage) -> dict[str, float]:
        res = stage.spec.resources
        need = {"CPU": res.num_cpus}
        if res.num_gpus:
            need["GPU"] = res.num_gpus
        if res.memory_gb:
            need["memory"] = res.memory_gb * 2**30
        return need

    def submit(self, name: str, job: dict[str, Any], stage: Stage) -> None:
        """Submit the stage as a Ray task (application errors come back as data, never retried by Ray)."""
        res = stage.spec.resources
        path = self.pythonpath if not self.ship_code else os.pathsep.join([".", self.pythonpath])
        # env_vars merge with the job's runtime_env (so a shipped working_dir stays the worker's cwd)
        runtime_env: dict[str, Any] = {"env_vars": {"PYTHONPATH": path, **fault_env()}}
        job = {**job, "num_threads": stage_threads(res.num_cpus)}
        options: dict[str, Any] = dict(num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_retries=0,
                                       name=f"stage:{name}", runtime_env=runtime_env)
        if res.memory_gb:
            options["memory"] = int(res.memory_gb * 2**30)
        self.running[self.remote.options(**options).remote(job)] = name

    def wait(self, timeout: float) -> list[tuple[str, dict[str, Any]]]:
        """Outcomes of the tasks finished within `timeout` seconds; a dead worker is a transient failure."""
        if not self.running:
            return []
        refs = list(self.running)
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=timeout)
        out = []
        for ref in ready:
            name = self.running.pop(ref)
            try:
                out.append((name, self.ray.get(ref)))
            except self.ray.exceptions.RayError as err:  # the worker died (OOM, kill): no stage traceback
                out.append((name, {"ok": False, "error_type": type(err).__name__,
                                   "error_bases": ["WorkerCrashedError", type(err).__name__],
                                   "message": str(err).strip().splitlines()[0] if str(err).strip() else "",
                                   "traceback": str(err), "duration_s": 0.0}))
        return out

    def close(self) -> None:
        """Cancel what still runs; shut Ray down if this executor started it."""
        for ref in list(self.running):
            self.ray.cancel(ref, force=True)
        self.running.clear()
        if self.owns:
            self.ray.shutdown()


FAULT_ENV_PREFIX = "PIPELINE_FAULT_"
"""Fault-injection variables (tests only, e.g. `stages.training.finite_guard`'s) the driver forwards to its
stage tasks: a worker of a Ray joined over `ray.address` does not inherit the driver's environment.
Only set ones are forwarded, so an ordinary run keeps one worker pool (a distinct `runtime_env`
starts new worker processes)."""


def fault_env() -> dict[str, str]:
    """The driver's `PIPELINE_FAULT_*` variables."""
    return {k: v for k, v in os.environ.items() if k.startswith(FAULT_ENV_PREFIX)}


def stage_threads(num_cpus: float) -> int | None:
    """The intra-op threads a stage's Ray task runs with: its CPU request, rounded down, at least 1;
    None when the driver's environment sets OMP_NUM_THREADS (the user asked for that count).

    Why it is set per task: Ray reuses a worker process for later tasks, and torch keeps the thread
    count it had: `pretrain_backbone` (2 CPUs) ran in the worker where `prepare_data` (1 CPU) had
    imported torch with one thread — one busy core, 0.47 s per step instead of 0.35 (measured, 2-core
    box). `pipeline.worker.execute` applies it at the start of each task (an env var per task
    instead would split the worker pool, and each new worker pays ~7 s of imports).
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, int(num_cpus))


def _fmt(resources: dict[str, float]) -> str:
    parts = []
    for key, value in resources.items():
        parts.append(f"{value / 2**30:g} GiB memory" if key == "memory" else f"{value:g} {key}")
    return ", ".join(parts)


def make_executor(kind: str, ray_cfg: RayConfig) -> Executor:
    """`local` or `ray` (with the `ray` config section)."""
    if kind == "local":
        return LocalExecutor()
    if kind == "ray":
        return RayExecutor(ray_cfg.address, ray_cfg.num_cpus, ray_cfg.object_store_mb, ray_cfg.ship_code)
    raise ValueError(f"run.runner: unknown runner '{kind}' (valid: ray, local)")

