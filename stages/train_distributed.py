"""Distributed training through Ray Train's Lightning integration: FSDP (or DDP) on a Ray cluster.

`train_denoiser` calls `fit_distributed` when `train.num_workers > 1`; anything else can too. It takes
*factories*, not objects, because every worker builds its own LightningModule and data:

    from stages.train_distributed import DistributedConfig, fit_distributed
    result = fit_distributed(make_module, make_data, DistributedConfig(
        num_workers=16, use_gpu=True, strategy="fsdp", storage_path="/shared/runs/train", name="nano"))
    result.checkpoint_path, result.history          # last checkpoint dir, step-based reports

What it sets up, and why:
- **FSDP FULL_SHARD** wrapping the units whose forward the model calls (`layer_classes`: the MoE
  / MLP mixers of both towers for `TwoTowerForDiffusionLM`, decoder layers for a plain HF model),
  activation checkpointing on the same units, bf16-mixed on GPU; the frozen context tower is
  sharded too and run without grad by the model; `use_orig_params=True` because frozen and
  trainable parameters share the root unit.
  `strategy="ddp"` replicates instead (small models; CPU CI over gloo).
- **Checkpoints on shared storage**: every `checkpoint_every` steps Lightning writes a full
  checkpoint that is handed to `ray.train.report`, which copies it under
  `storage_path/name/` (a path every node sees: NFS, Lustre, or an fsspec URI such as `s3://`).
- **Resume across restarts**: a new call with the same `storage_path` and `name` restores Ray Train's
  checkpoint manager, `ray.train.get_checkpoint()` returns the latest one and Lightning resumes from
  it (optimizer, step counter, LR schedule). Worker failures restart from it up to `max_failures`.
- **NaN/Inf stop every worker** (`stages.finite_guard`, each rank's verdict all-reduced): the
  failing step is never reported as a checkpoint, and the driver re-raises the workers'
  `NonFiniteError` naming the last checkpoint on storage and its step. The fault-injection
  variable of the driver is forwarded to the workers, which need not inherit its environment.
- **Step-based reporting**: metrics every `report_every` optimizer steps, not only at epoch end
  (Ray's stock `RayTrainReportCallback` reports per epoch); rank 0 also appends them to
  `storage_path/name/reports.jsonl` so the engine and the user can follow a run that is not theirs.

No Ray or Lightning import at module load (both are slow): they happen inside the functions.

Why this module is longer than ~350 lines: the driver side (`fit_distributed`, the report tail)
and the worker side (`_train_loop_per_worker`, the FSDP/DDP strategy, the step reports) must agree
on the checkpoint file, the report format and the run directory; one module keeps that agreement
in one place, and splitting it would make either half unreadable alone.
"""
from __future__ import annotations

import importlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from stages.finite_guard import fault_env
from stages.training import Optimisation

CHECKPOINT_FILE = "checkpoint.ckpt"
STEP_FILE = "step.json"
"""Beside `CHECKPOINT_FILE` in each reported checkpoint: its optimizer step, readable without
loading the checkpoint (a NaN error names the last good one from the driver)."""
LATEST_CHECKPOINT = "the latest Ray Train checkpoint under {run_dir}"
"""How a worker's `NonFiniteError` names the last good checkpoint: Ray picks the directory, so the
driver replaces this phrase with the path it finds (`_nonfinite_on_driver`)."""
REPORTS_FILE = "reports.jsonl"
STRATEGIES = ("fsdp", "ddp")
REPORT_EVERY_AT_MOST = 10
"""Steps between two metric reports at most (and at every checkpoint when those are closer)."""


@dataclass
class DistributedConfig:
    """How to run one Lightning fit on a Ray cluster."""

    storage_path: str
    """Shared storage root for checkpoints and reports (`run.root` on a cluster: NFS, s3://, ...)."""
    name: str = "train_denoiser"
    """Run name under `storage_path`; the same name resumes from the latest checkpoint."""
    num_workers: int = 2
    """Training processes (one per GPU when `use_gpu`)."""
    use_gpu: bool = False
    """One GPU per worker; on CPU the process group is gloo."""
    cpus_per_worker: int = 1
    """CPUs reserved per worker."""
    strategy: str = "fsdp"
    """`fsdp` (FULL_SHARD per decoder layer) or `ddp`."""
    activation_checkpointing: bool = True
    """Recompute each decoder layer in backward (FSDP only)."""
    precision: str = "auto"
    """Lightning precision; `auto` is bf16-mixed on GPU and 32-true on CPU."""
    max_steps: int = Optimisation.max_steps
    """Optimizer steps in total (a resumed run continues to this count)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    grad_clip: float = 0.0
    """Gradient-norm clip; 0 disables (FSDP clips by norm across shards)."""
    report_every: int = 10
    """Report metrics every this many optimizer steps."""
    checkpoint_every: int = Optimisation.checkpoint_every
    """Checkpoint to shared storage every this many optimizer steps (and at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on storage (oldest deleted first)."""
    max_failures: int = 0
    """Worker-group restarts Ray Train attempts from the latest checkpoint."""
    seed: int = 0
    """Seed set on every worker before the module is built (identical initial weights)."""
    wrap_layer_classes: tuple[str, ...] = ()
    """Class names FSDP wraps and checkpoints; empty: the classes of the model's layer lists."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for the workers (e.g. NCCL settings)."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"train.strategy={self.strategy!r}: expected one of {STRATEGIES}")
        if self.num_workers < 1:
            raise ValueError(f"train.num_workers={self.num_workers}: must be >= 1")
        if self.report_every < 1 or self.checkpoint_every < 1:
            raise ValueError("train.report_every and train.checkpoint_every must be >= 1")


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

    def load_state_dict(self) -> dict[str, Any]:
        """The LightningModule state dict of the latest checkpoint (full, unsharded, on CPU)."""
        import torch

        if self.checkpoint_path is None:
            raise ValueError(f"{self.run_dir}: no checkpoint was reported")
        ckpt = torch.load(Path(self.checkpoint_path) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        return ckpt["state_dict"]


@dataclass
class LazyFactory:
    """A picklable factory: imports `target` ("package.module:attribute") on the worker and calls it.

    Lets a caller hand over classes that only exist after a lazy import, e.g.
    `LazyFactory("stages.denoiser_module:DenoiserModule", (model_factory, train_cfg, block_size))`.
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
    `num_workers`, `gpus_per_worker` / `accelerator` (one rule: `stages.world_size`), `strategy`,
    `precision`, `max_steps`, `grad_accum`, `grad_clip`, `checkpoint_every`, `max_failures`. `auto`
    strategy means FSDP on GPU, DDP on CPU."""
    from stages.world_size import world_of

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
    run_dir = _run_dir(cfg)
    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.use_gpu else {})
    worker_cfg = {**asdict(cfg), "env": {**fault_env(), **cfg.env}}
    trainer = TorchTrainer(
        _train_loop_per_worker,
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
                             history=read_reports(run_dir), run_dir=run_dir)


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


def latest_checkpoint(run_dir: str | Path) -> tuple[Path, int | None] | None:
    """(checkpoint file, its optimizer step) of the newest checkpoint Ray Train persisted under
    `run_dir` (directory names differ between Ray versions: the newest by mtime), or None."""
    found = [d for d in Path(run_dir).glob("checkpoint_*") if (d / CHECKPOINT_FILE).is_file()]
    if not found:
        return None
    newest = max(found, key=lambda d: d.stat().st_mtime_ns)
    step_file = newest / STEP_FILE
    step = int(json.loads(step_file.read_text())["step"]) if step_file.is_file() else None
    return newest / CHECKPOINT_FILE, step


def _nonfinite_on_driver(err: BaseException, run_dir: str):
    """The workers' `NonFiniteError` (wrapped by Ray Train), naming the checkpoint a resume starts
    from; None when `err` is another failure."""
    from stages.finite_guard import NonFiniteError, find_nonfinite

    found = find_nonfinite(err)
    if found is None:
        return None
    latest = None if "://" in run_dir else latest_checkpoint(run_dir)
    if latest is None:
        where = f"none (no checkpoint under {run_dir} yet: a resume starts at step 0)"
    else:
        where = f"{latest[0]}" + (f" (optimizer step {latest[1]})" if latest[1] is not None else "")
    return NonFiniteError(str(found).replace(LATEST_CHECKPOINT.format(run_dir=run_dir), where))


def read_reports(run_dir: str | Path) -> list[dict[str, float]]:
    """The step-based reports rank 0 appended under `run_dir`, oldest first (empty if none)."""
    path = Path(run_dir) / REPORTS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run_dir(cfg: DistributedConfig) -> str:
    if "://" in cfg.storage_path:
        return f"{cfg.storage_path.rstrip('/')}/{cfg.name}"
    path = Path(cfg.storage_path).expanduser().resolve() / cfg.name
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


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


# --- on each worker ---------------------------------------------------------------------------


def _train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import pytorch_lightning as pl
    import ray.train
    from ray.train.lightning import RayLightningEnvironment, prepare_trainer

    from stages.finite_guard import make_finite_guard
    from stages.row_sampler import RowSampler, sampler_checkpoint

    cfg = DistributedConfig(**loop_config["cfg"])
    os.environ.update(cfg.env)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = loop_config["make_module"]()
    data = loop_config["make_data"]()
    train_loader = data[0] if isinstance(data, tuple) else data
    sampler = getattr(train_loader, "batch_sampler", None)
    row_sampler = isinstance(sampler, RowSampler)  # shards itself per rank, resumes at the exact batch
    # the sampler's cursor first: it must move before the step report checkpoints the same batch
    # the NaN guard before the step report: a non-finite step is never reported as a checkpoint
    guard = make_finite_guard(None, LATEST_CHECKPOINT.format(run_dir=_run_dir(cfg)))
    callbacks = ([sampler_checkpoint(sampler)] if row_sampler else []) + [guard, _step_report_callback(cfg)]
    trainer = pl.Trainer(
        max_steps=cfg.max_steps,
        accelerator="gpu" if cfg.use_gpu else "cpu",
        devices="auto",
        strategy=_strategy(cfg, module),
        plugins=[RayLightningEnvironment()],
        precision=_precision(cfg),
        accumulate_grad_batches=cfg.grad_accum,
        gradient_clip_val=cfg.grad_clip or None,
        callbacks=callbacks,
        use_distributed_sampler=not row_sampler,
        enable_checkpointing=False,  # checkpoints go through ray.train.report
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer = prepare_trainer(trainer)
    ckpt_path = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a resumed run: continue from the latest checkpoint on storage
        ckpt_path = str(Path(checkpoint.to_directory()) / CHECKPOINT_FILE)
    trainer.fit(module, **_data_kwargs(data), ckpt_path=ckpt_path)


def _data_kwargs(data: Any) -> dict[str, Any]:
    import pytorch_lightning as pl

    if isinstance(data, pl.LightningDataModule):
        return {"datamodule": data}
    if isinstance(data, tuple):
        train, val = data
        return {"train_dataloaders": train, "val_dataloaders": val}
    return {"train_dataloaders": data}


def _precision(cfg: DistributedConfig) -> str:
    from stages.training import resolve_precision

    return resolve_precision(cfg.precision, cfg.use_gpu)


def layer_classes(module: Any, names: tuple[str, ...] = ()) -> set[type]:
    """The module classes FSDP wraps (and checkpoints): named ones, else found by structure.

    FSDP gathers a wrapped unit's parameters in that unit's `forward`, so only modules whose
    forward is *called* may be wrapped. `TwoTowerForDiffusionLM` walks each backbone layer through
    its adapter — norm, then the mixer's projections for attention and Mamba-2, but the MoE / MLP
    module as a whole — so there the units are the MoE/MLP mixers (93% of Nemotron-3-Nano's
    parameters); the rest stays in the root unit (sharded at rest, gathered for the forward). For
    a plain HF model the units are the decoder layers filling its longest ModuleList.
    """
    from torch import nn

    all_classes = {type(m) for m in module.modules()}
    if names:
        picked = {c for c in all_classes if c.__name__ in names}
        missing = set(names) - {c.__name__ for c in picked}
        if missing:
            raise ValueError(f"DistributedConfig.wrap_layer_classes: {sorted(missing)} not in the model")
        return picked
    walk = next((getattr(m, "context_walk") for m in module.modules() if hasattr(m, "context_walk")), None)
    if walk is not None:
        called = {type(sub.mixer) for sub in walk.subs if sub.kind in ("moe", "mlp")}
        if called:
            return called
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not lists:
        raise ValueError(f"{type(module).__name__}: no layer list to wrap; pass the class names to wrap as "
                         "DistributedConfig.wrap_layer_classes (fit_distributed's config)")
    longest = max(len(m) for m in lists)
    return {type(x) for m in lists if len(m) == longest for x in m}


def _strategy(cfg: DistributedConfig, module: Any):
    from ray.train.lightning import RayDDPStrategy, RayFSDPStrategy

    if cfg.strategy == "ddp":
        # Frozen towers have no grads: tell DDP not to wait for them.
        return RayDDPStrategy(find_unused_parameters=False)
    classes = layer_classes(module, cfg.wrap_layer_classes)
    return RayFSDPStrategy(
        auto_wrap_policy=classes,
        activation_checkpointing_policy=classes if cfg.activation_checkpointing else None,
        sharding_strategy="FULL_SHARD",
        use_orig_params=True,  # frozen context tower and trainable denoiser share the root unit
        state_dict_type="full",
    )


def _step_report_callback(cfg: DistributedConfig):
    import pytorch_lightning as pl
    import ray.train
    from ray.train import Checkpoint

    class StepReport(pl.Callback):
        """`ray.train.report` every `report_every` steps, with a checkpoint every `checkpoint_every`."""

        def __init__(self) -> None:
            self.last_reported = -1

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step == self.last_reported or step == 0:
                return  # inside an accumulation window, or nothing done yet
            final = step >= (trainer.max_steps or 0)
            if step % cfg.report_every == 0 or step % cfg.checkpoint_every == 0 or final:
                self.last_reported = step
                self._report(trainer, step, with_checkpoint=final or step % cfg.checkpoint_every == 0)

        def _report(self, trainer, step: int, *, with_checkpoint: bool) -> None:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
            metrics["step"] = step
            metrics["epoch"] = trainer.current_epoch
            rank0 = trainer.global_rank == 0
            if rank0 and "://" not in cfg.storage_path:
                with open(Path(_run_dir(cfg)) / REPORTS_FILE, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            if not with_checkpoint:
                ray.train.report(metrics)
                return
            with tempfile.TemporaryDirectory() as tmp:
                trainer.save_checkpoint(Path(tmp) / CHECKPOINT_FILE)  # collective under FSDP
                (Path(tmp) / STEP_FILE).write_text(json.dumps({"step": step}))
                checkpoint = Checkpoint.from_directory(tmp) if rank0 else None
                ray.train.report(metrics, checkpoint=checkpoint)

    return StepReport()
