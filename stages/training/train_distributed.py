"""Distributed training through Ray Train's Lightning integration: FSDP (or DDP) on a Ray cluster.

`train_denoiser` calls `fit_distributed` when `train.num_workers > 1`; anything else can too. It takes
*factories*, not objects, because every worker builds its own LightningModule and data:

    from stages.training.train_distributed import DistributedConfig, fit_distributed
    result = fit_distributed(make_module, make_data, DistributedConfig(
        num_workers=16, use_gpu=True, strategy="fsdp", storage_path="/shared/runs/train", name="nano"))
    result.checkpoint_path, result.history          # last checkpoint dir, step-based reports

What it sets up, and why:
- **FSDP2** (`torch.distributed.fsdp.fully_shard`, through Lightning's `ModelParallelStrategy`)
  sharding the units whose forward the model calls (`layer_classes`: the MoE / MLP mixers of both
  towers for `TwoTowerForDiffusionLM`, decoder layers for a plain HF model), then the rest as root
  units; activation checkpointing on the same units, bf16-mixed on GPU; the frozen context tower
  is sharded too (per parameter, beside trainable ones) and run without grad by the model. FSDP2
  runs over gloo as over NCCL, so CPU workers (the rehearsal, CI) run the same sharded path.
  `strategy="ddp"` replicates instead (small models).
- **Checkpoints on shared storage**: every `checkpoint_every` steps Lightning writes a checkpoint
  (under FSDP2 one shard per rank, each rank reporting its own and Ray Train merging them into one
  directory; under DDP a whole one from rank 0) that is handed to `ray.train.report`, which copies it under
  `storage_path/name/` (a path every node sees: NFS, Lustre, or an fsspec URI such as `s3://`).
- **Resume across restarts**: a new call with the same `storage_path` and `name` restores Ray Train's
  checkpoint manager, `ray.train.get_checkpoint()` returns the latest one and Lightning resumes from
  it (optimizer, step counter, LR schedule). Worker failures restart from it up to `max_failures`.
- **NaN/Inf stop every worker** (`stages.training.finite_guard`, each rank's verdict all-reduced): the
  failing step is never reported as a checkpoint, and the driver re-raises the workers'
  `NonFiniteError` naming the last checkpoint on storage and its step. The fault-injection
  variable of the driver is forwarded to the workers, which need not inherit its environment.
- **Step-based reporting**: metrics every `report_every` optimizer steps, not only at epoch end
  (Ray's stock `RayTrainReportCallback` reports per epoch); rank 0 also appends them to
  `storage_path/name/reports.jsonl` so the engine and the user can follow a run that is not theirs.

No Ray or Lightning import at module load (both are slow): they happen inside the functions.

This module is the driver side. The worker side (the Lightning trainer, the FSDP/DDP strategy,
the step reports) is `stages.training.distributed_worker`; both read the run's file layout and
config from `stages.training.distributed_run`. These three are the only stage code that touches
Ray (`tests/test_structure.py` checks it).
"""
from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from stages.training.distributed_run import (
    CHECKPOINT_FILE,
    LATEST_CHECKPOINT,
    REPORT_EVERY_AT_MOST,
    REPORTS_FILE,
    STEP_FILE,
    STRATEGIES,
    DistributedConfig,
    latest_checkpoint,
    read_reports,
    read_starts,
    run_dir_of,
)
from stages.training.distributed_worker import layer_classes, train_loop_per_worker
from stages.training.finite_guard import fault_env
from stages.training.optimisation import Optimisation

__all__ = ["CHECKPOINT_FILE", "LATEST_CHECKPOINT", "REPORTS_FILE", "STEP_FILE", "STRATEGIES",
           "DistributedConfig", "DistributedResult", "LazyFactory", "config_from_train", "fit_distributed",
           "latest_checkpoint", "layer_classes", "read_reports"]

@dataclass
class DistributedResult:
    """What a distributed fit leaves behind."""

    metrics: dict[str, float]
    """The last reported metrics (rank 0)."""
    checkpoint_path: str | None
    """Directory of the latest checkpoint on storage (holds `checkpoint.ckpt`)."""
    history: list[dict[str, float]]
    """Every step-based report of this run name, resumed sessions included, oldest first."""
    run_dir: str
    """`storage_path/name`: everything this run wrote."""
    starts: list[dict[str, Any]] = field(default_factory=list)
    """The worker group's starts in this call, oldest first: `{"time", "resumed_from_step"}` (0: from
    scratch; the step of the checkpoint a restart resumed from). More than one: workers died and
    Ray Train restarted the group."""

    @property
    def restarts(self) -> int:
        """Times the worker group was restarted within this call."""
        return max(0, len(self.starts) - 1)

    def load_state_dict(self) -> dict[str, Any]:
        """The LightningModule state dict of the latest checkpoint (full, unsharded, on CPU)."""
        import torch

        if self.checkpoint_path is None:
            raise ValueError(f"{self.run_dir}: no checkpoint was reported")
        path = Path(self.checkpoint_path) / CHECKPOINT_FILE
        if path.is_dir():  # FSDP2's sharded checkpoint: gathered into one state dict here
            import tempfile

            from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

            with tempfile.TemporaryDirectory() as tmp:
                dcp_to_torch_save(path, Path(tmp) / "full.pt")
                ckpt = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=False)
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        return ckpt["state_dict"]


@dataclass
class LazyFactory:
    """A picklable factory: imports `target` ("package.module:attribute") on the worker and calls it.

    Lets a caller hand over classes that only exist after a lazy import, e.g.
    `LazyFactory("stages.training.denoiser_module:DenoiserModule", (model_factory, train_cfg, block_size))`.
    """

    target: str
    """`module:attribute` to import and call."""
    args: tuple = ()
    """Positional arguments (picklable)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments (picklable)."""

    def __call__(self) -> Any:
        module, _, attr = self.target.partition(":")
        if not attr:
            raise ValueError(f"LazyFactory target {self.target!r}: expected 'package.module:attribute'")
        return getattr(importlib.import_module(module), attr)(*self.args, **self.kwargs)


def config_from_train(train_cfg: Any, *, storage_path: str, name: str, num_workers: int | None = None,
                      seed: int = 0) -> DistributedConfig:
    """A `DistributedConfig` from `train_denoiser`'s `train` section (fields read when present):
    `num_workers`, `gpus_per_worker` / `accelerator` (one rule: `stages.training.world_size`), `strategy`,
    `precision`, `max_steps`, `grad_accum`, `grad_clip`, `checkpoint_every`, `max_failures`. `auto`
    strategy means FSDP on GPU, DDP on CPU."""
    from stages.training.world_size import world_of

    get = lambda key, default: getattr(train_cfg, key, default)  # noqa: E731
    world = world_of(train_cfg, 1)
    workers = num_workers or world.num_workers
    use_gpu = world.gpus_per_worker > 0
    strategy = str(get("strategy", "auto"))
    if strategy == "auto":
        strategy = "fsdp" if use_gpu else "ddp"
    return DistributedConfig(
        storage_path=storage_path, name=name, num_workers=workers, use_gpu=use_gpu, strategy=strategy,
        precision=str(get("precision", "auto")), max_steps=int(get("max_steps", Optimisation.max_steps)),
        grad_accum=int(get("grad_accum", 1)), grad_clip=float(get("grad_clip", 0.0) or 0.0),
        checkpoint_every=int(get("checkpoint_every", Optimisation.checkpoint_every)), seed=seed,
        max_failures=int(get("max_failures", 0)),
        report_every=max(1, min(REPORT_EVERY_AT_MOST, int(get("checkpoint_every", Optimisation.checkpoint_every)))),
    )


def fit_distributed(
    make_module: Callable[[], Any],
    make_data: Callable[[], Any],
    cfg: DistributedConfig,
    *,
    ray_address: str | None = None,
    on_report: Callable[[dict[str, float]], None] | None = None,
) -> DistributedResult:
    """Fit `make_module()` on `make_data()` with `cfg.num_workers` Ray Train workers.

    `make_data()` returns a LightningDataModule, a training DataLoader, or `(train, val)` loaders;
    Lightning shards map-style loaders across workers with a DistributedSampler. Both factories are
    pickled to the workers (top-level callables, `functools.partial`, or dataclass instances).
    Joins the running Ray (or `ray_address`), else starts a local one. `on_report` is called in
    this process with each step-based report as rank 0 writes it (e.g. `ctx.progress` and
    `ctx.log_metrics` of the calling stage), for storage paths this process can read.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=True)
    _check_cluster(cfg)
    run_dir = run_dir_of(cfg)
    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.use_gpu else {})
    worker_cfg = {**asdict(cfg), "env": {**fault_env(), **cfg.env}}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"make_module": make_module, "make_data": make_data, "cfg": worker_cfg},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name, storage_path=cfg.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    earlier = len(read_starts(run_dir)) if "://" not in run_dir else 0
    with _ReportTail(run_dir, on_report):
        try:
            result = trainer.fit()
        except Exception as err:
            nonfinite = _nonfinite_on_driver(err, run_dir)
            if nonfinite is None:
                raise
            raise nonfinite from err
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    return DistributedResult(metrics=dict(result.metrics or {}), checkpoint_path=checkpoint,
                             history=read_reports(run_dir), run_dir=run_dir,
                             starts=read_starts(run_dir)[earlier:] if "://" not in run_dir else [])


class _ReportTail:
    """Follows `run_dir/reports.jsonl` from a thread while the fit runs; calls `callback` per new
    line (only lines appended after it started: a resumed run does not replay old reports)."""

    def __init__(self, run_dir: str, callback: Callable[[dict[str, float]], None] | None,
                 interval_s: float = 1.0) -> None:
        import threading

        self.path = Path(run_dir) / REPORTS_FILE
        self.callback = callback if "://" not in run_dir else None
        self.interval_s = interval_s
        self.offset = self.path.stat().st_size if self.callback and self.path.exists() else 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "_ReportTail":
        if self.callback:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.callback:
            self.stop.set()
            self.thread.join()
            self._poll()  # whatever landed after the last poll

    def _loop(self) -> None:
        while not self.stop.wait(self.interval_s):
            self._poll()

    def _poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path) as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind("\n") + 1]  # never a half-written line
        self.offset += len(complete.encode())
        for line in complete.splitlines():
            if line.strip():
                self.callback(json.loads(line))


def _nonfinite_on_driver(err: BaseException, run_dir: str):
    """The workers' `NonFiniteError` (wrapped by Ray Train), naming the checkpoint a resume starts
    from; None when `err` is another failure."""
    from stages.training.finite_guard import NonFiniteError, find_nonfinite

    found = find_nonfinite(err)
    if found is None:
        return None
    latest = None if "://" in run_dir else latest_checkpoint(run_dir)
    if latest is None:
        where = f"none (no checkpoint under {run_dir} yet: a resume starts at step 0)"
    else:
        where = f"{latest[0]}" + (f" (optimizer step {latest[1]})" if latest[1] is not None else "")
    return NonFiniteError(str(found).replace(LATEST_CHECKPOINT.format(run_dir=run_dir), where))


def _check_cluster(cfg: DistributedConfig) -> None:
    """Fail now, with numbers, instead of waiting forever for resources the cluster lacks."""
    import ray

    have = ray.cluster_resources()
    need_gpu = cfg.num_workers if cfg.use_gpu else 0
    if need_gpu > have.get("GPU", 0):
        raise ValueError(f"train.num_workers={cfg.num_workers} with GPUs needs {need_gpu} GPUs; "
                         f"the Ray cluster has {have.get('GPU', 0):g}")
    need_cpu = cfg.num_workers * cfg.cpus_per_worker
    if need_cpu > have.get("CPU", 0):
        raise ValueError(f"train.num_workers={cfg.num_workers} x {cfg.cpus_per_worker} CPUs needs {need_cpu} "
                         f"CPUs; the Ray cluster has {have.get('CPU', 0):g}")
