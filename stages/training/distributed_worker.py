"""The worker side of a distributed fit: what each Ray Train worker runs (the Lightning trainer,
the FSDP or DDP strategy, the step reports and their checkpoints on shared storage).

With `stages.training.train_distributed` (the driver), the only stage code that imports Ray, and
only inside functions (Ray and Lightning are slow to import). The run's file layout and config are
shared with the driver through `stages.training.distributed_run`.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from stages.training.distributed_run import (
    CHECKPOINT_FILE,
    LATEST_CHECKPOINT,
    REPORTS_FILE,
    STARTS_FILE,
    STEP_FILE,
    DistributedConfig,
    run_dir_of,
)


def worker_rank() -> tuple[int, int]:
    """(rank, world size) of this process inside a Ray Train worker group; (0, 1) elsewhere."""
    try:
        import ray.train

        context = ray.train.get_context()
        return context.get_world_rank(), context.get_world_size()
    except Exception:  # noqa: BLE001 - not inside a Ray Train worker: one process
        return 0, 1


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import pytorch_lightning as pl
    import ray.train
    from ray.train.lightning import RayLightningEnvironment, prepare_trainer

    from stages.data.row_sampler import RowSampler, sampler_checkpoint
    from stages.training.finite_guard import make_finite_guard

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
    guard = make_finite_guard(None, LATEST_CHECKPOINT.format(run_dir=run_dir_of(cfg)))
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
    if cfg.strategy == "ddp":  # Ray's check knows only its own strategy classes, not our FSDP2 one
        trainer = prepare_trainer(trainer)
    ckpt_path, resumed_from = None, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a resumed run: continue from the latest checkpoint on storage
        where = Path(checkpoint.to_directory())
        ckpt_path = str(where / CHECKPOINT_FILE)
        step_file = where / STEP_FILE
        resumed_from = int(json.loads(step_file.read_text())["step"]) if step_file.is_file() else -1
    if ray.train.get_context().get_world_rank() == 0 and "://" not in cfg.storage_path:
        with open(Path(run_dir_of(cfg)) / STARTS_FILE, "a") as f:  # the summary's restart record
            f.write(json.dumps({"time": time.time(), "resumed_from_step": resumed_from}) + "\n")
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
    from stages.training.optimisation import resolve_precision

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
    walk = next((m.context_walk for m in module.modules() if hasattr(m, "context_walk")), None)
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
    from ray.train.lightning import RayDDPStrategy

    if cfg.strategy == "ddp":
        # Frozen towers have no grads: tell DDP not to wait for them.
        return RayDDPStrategy(find_unused_parameters=False)
    try:
        classes = layer_classes(module, cfg.wrap_layer_classes)
    except ValueError:
        if cfg.wrap_layer_classes:
            raise
        classes = set()  # no layer list: FSDP2 shards the module's children as whole units
    return _fsdp2_strategy(cfg, classes)


def _fsdp2_strategy(cfg: DistributedConfig, classes: set[type]):
    """FSDP2 under Ray Train: `torch.distributed.fsdp.fully_shard` (per-parameter sharding over
    DTensor) on each unit of `classes`, then on the module's remaining parameters, through
    Lightning's `ModelParallelStrategy`, with sharded (distributed) checkpoints.

    Why FSDP2 and not Lightning's FSDP strategy (FSDP1): torch refuses FSDP1 on a CPU-only process
    group, so the sharded path could only ever run on GPUs; FSDP2 runs over gloo as over NCCL, and
    the same wrapping, sharded save and resume and optimizer state are exercised on CPU workers
    (the rehearsal, the tests). Frozen and trainable parameters may share a unit (the context
    tower lives in the root unit), which FSDP2 shards per parameter."""
    import ray.train.torch
    from pytorch_lightning.strategies import ModelParallelStrategy
    from pytorch_lightning.trainer.states import TrainerFn
    from torch.distributed.fsdp import fully_shard

    class RayFSDP2Strategy(ModelParallelStrategy):
        @property
        def root_device(self):
            return ray.train.torch.get_device()

        @property
        def distributed_sampler_kwargs(self) -> dict[str, Any]:
            return {"num_replicas": self.world_size, "rank": self.global_rank}

        def setup(self, trainer) -> None:
            # ModelParallelStrategy.setup, with the sharding applied here rather than in the
            # LightningModule's `configure_model` (the module stays strategy-agnostic)
            self.accelerator.setup(trainer)
            mesh = self.device_mesh["data_parallel"]
            units = [m for m in self.lightning_module.modules() if type(m) in classes]
            for unit in units:
                if cfg.activation_checkpointing:
                    from torch.distributed._composable import checkpoint
                    checkpoint(unit)
                fully_shard(unit, mesh=mesh)
            for child in self.lightning_module.children():  # the root units: what is left
                if any(True for _ in child.parameters()) and child not in units:
                    fully_shard(child, mesh=mesh)
            self.model = self.precision_plugin.convert_module(self.model)
            self.model_to_device()
            self.barrier()
            if trainer.state.fn == TrainerFn.FITTING:
                self.setup_optimizers(trainer)
            self.setup_precision_plugin()

    return RayFSDP2Strategy(data_parallel_size=cfg.num_workers, tensor_parallel_size=1,
                            save_distributed_checkpoint=True)


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
                with open(Path(run_dir_of(cfg)) / REPORTS_FILE, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            if not with_checkpoint:
                ray.train.report(metrics)
                return
            with tempfile.TemporaryDirectory() as tmp:
                trainer.save_checkpoint(Path(tmp) / CHECKPOINT_FILE)  # collective under FSDP
                (Path(tmp) / STEP_FILE).write_text(json.dumps({"step": step}))
                # FSDP2 writes one shard per rank (each reports its own: Ray Train merges them into
                # one checkpoint directory); DDP's rank 0 holds the whole model
                checkpoint = Checkpoint.from_directory(tmp) if rank0 or cfg.strategy == "fsdp" else None
                ray.train.report(metrics, checkpoint=checkpoint)

    return StepReport()
