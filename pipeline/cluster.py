"""The stages' worlds against the Ray cluster they will run on, before any stage runs.

A stage module may offer `check_cluster(cfg, cluster)` (`stages/api.py`): given its typed config
and the cluster's resource totals (`{"CPU": ..., "GPU": ...}`), it raises ValueError naming the
keys when the cluster can never hold what it will ask for (`train_denoiser`: its Ray Train
world). The engine calls it twice: `validate` against a reachable cluster, or, when the run would
start its own embedded Ray, against this machine (`ray.num_cpus` or every core, and its GPUs);
and `run`, against the started cluster, before anything is submitted. So a training world of 3
workers on a 2-CPU machine is refused before the first stage, not after the fourth.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from pipeline.config import import_stage
from pipeline.schema import build


def cluster_problems(stages: list[Any], cluster: dict[str, float]) -> list[str]:
    """Each stage's `check_cluster` verdict on `cluster` (the config's `Stage`s), as lines."""
    problems = []
    for stage in stages:
        module = import_stage(stage.module)
        hook = getattr(module, "check_cluster", None)
        if hook is None:
            continue
        try:
            hook(build(module.Config, dict(stage.config)), cluster)
        except ValueError as err:
            problems.append(f"  stage '{stage.name}': {err}")
    return problems


def local_resources(cfg: Any) -> dict[str, float]:
    """What an embedded Ray on this machine would have: `ray.num_cpus` (else every core) and the
    GPUs it sees (`CUDA_VISIBLE_DEVICES` when set, else the NVIDIA driver's list), without importing
    torch."""
    cpus = cfg.ray.num_cpus or os.cpu_count() or 1
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    else:
        driver = Path("/proc/driver/nvidia/gpus")
        gpus = len(list(driver.iterdir())) if driver.is_dir() else 0
    return {"CPU": float(cpus), "GPU": float(gpus)}


def cluster_problem(cfg: Any) -> str | None:
    """For `validate`: the stages against the reachable Ray cluster (`ray.address`, `RAY_ADDRESS`,
    or a Ray already initialised in this process), else against this machine, where the run would
    start its own; None when every stage fits."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    stages = list(cfg.stages.values())
    running = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    if not address and not running:  # the run would start its own Ray here
        problems = cluster_problems(stages, local_resources(cfg))
        return "\n".join(problems) if problems else None
    import ray

    owns = not running
    if owns:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except Exception as err:  # not reachable: the config alone was checked
            print(f"note: Ray at {address} not reachable ({type(err).__name__}); cluster not checked",
                  file=sys.stderr)
            return None
    try:
        problems = cluster_problems(stages, ray.cluster_resources())
        return "\n".join(problems) if problems else None
    finally:
        if owns:
            ray.shutdown()
