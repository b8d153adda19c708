"""Fitting the denoiser: in this process with a Lightning Trainer, or across Ray Train workers.

Both paths take the same inputs (the `train` section, a model factory, the row tensors) and return
the trained `DenoiserModule`; `train_denoiser.run` picks one by `train.num_workers`. The local path
resumes from `ctx.work_dir/checkpoints/last.ckpt` when its sha256 sidecar matches
(`stages.training.checkpoint_io`), stops at the first NaN/Inf (`stages.training.finite_guard`), logs to the
stage's MLflow run (a CSV logger when
tracking is off) and reports progress to the live display; the distributed one is
`stages.training.train_distributed.fit_distributed` with checkpoints on the stage's work dir.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from stages.api import StageContext
from stages.backbones.loading import TwoTowerFactory
from stages.data.rows import BucketSampler, trim_blocks
from stages.training.checkpoint_io import make_checkpoint_io, usable_checkpoint
from stages.training.finite_guard import make_finite_guard
from stages.training.optimisation import checkpoint_step, resolve_precision

PROGRESS_EVERY = 5
"""Optimizer steps between progress events to the live display (each is a message to the driver)."""
PROGRESS_BAR_UPDATES = 50
"""About how many times Lightning's progress bar redraws over a run (not every step on a terminal)."""


def _progress_callback(ctx: StageContext, total: int):
    import pytorch_lightning as pl

    class _Progress(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step % PROGRESS_EVERY == 0 or step == total:
                ctx.progress(step, total, f"loss {float(outputs['loss']):.3f}")

    return _Progress()


def _logger(ctx: StageContext):
    if ctx.tracking_uri and ctx.mlflow_run_id:
        from pytorch_lightning.loggers import MLFlowLogger

        return MLFlowLogger(tracking_uri=ctx.tracking_uri, run_id=ctx.mlflow_run_id)
    from pytorch_lightning.loggers import CSVLogger

    return CSVLogger(str(Path(ctx.work_dir) / "logs"), name="train_denoiser")


def _checkpoint_callback(ckpt_dir: Path, every: int):
    import inspect

    from pytorch_lightning.callbacks import ModelCheckpoint

    # enable_version_counter=False: `last.ckpt` is overwritten, never joined by `last-v1.ckpt`. A
    # resume with an override (`pipeline.resume`) continues from a copied work dir; Lightning then
    # finds a `last.ckpt` it did not write in this dir (the restored dirpath differs) and would
    # version the new one, leaving `last.ckpt` at the old step for the next resume and the NaN error.
    kwargs: dict[str, Any] = {"dirpath": str(ckpt_dir), "every_n_train_steps": every, "save_last": True,
                              "save_top_k": 1, "enable_version_counter": False}
    if "save_on_exception" in inspect.signature(ModelCheckpoint.__init__).parameters:
        kwargs["save_on_exception"] = False  # a crash resumes from the last periodic checkpoint
    return ModelCheckpoint(**kwargs)


def memory_loaders(train_ids, val_ids, block_size: int, batch_size: int, seed: int):
    """(train, val) loaders over rows held in memory (the block-aligned task corpus): alike rows
    batched together (`BucketSampler`) and all-pad blocks trimmed per batch."""
    from torch.utils.data import DataLoader, TensorDataset

    collate = trim_blocks(block_size)
    return (DataLoader(TensorDataset(*train_ids), collate_fn=collate,
                       batch_sampler=BucketSampler(train_ids[1], block_size, batch_size, seed)),
            DataLoader(TensorDataset(*val_ids), batch_size=batch_size, collate_fn=collate))


def fit(cfg: Any, factory: TwoTowerFactory, block_size: int, loaders, ctx: StageContext):
    """Train on `loaders` (a `(train, val)` DataLoader pair) with resume from
    `ctx.work_dir/checkpoints/last.ckpt`; return (module, trainer, secs). A `RowSampler` training
    loader has its cursor saved in the checkpoints, so a resume continues at the exact batch."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import TQDMProgressBar

    from stages.data.row_sampler import RowSampler, sampler_checkpoint
    from stages.training.denoiser_module import DenoiserModule

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    pl.seed_everything(ctx.seed, workers=True, verbose=False)
    gpu = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda")
    module = DenoiserModule(factory, cfg, block_size)
    train_dl, val_dl = loaders
    ckpt_dir = Path(ctx.work_dir) / "checkpoints"
    callbacks = [_checkpoint_callback(ckpt_dir, cfg.checkpoint_every), _progress_callback(ctx, cfg.max_steps),
                 make_finite_guard(ckpt_dir)]
    row_sampler = isinstance(train_dl.batch_sampler, RowSampler)
    if row_sampler:  # first: its cursor must be advanced before a checkpoint of the same batch
        callbacks.insert(0, sampler_checkpoint(train_dl.batch_sampler))
    if cfg.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, cfg.max_steps // PROGRESS_BAR_UPDATES)))
    n_train_batches = max(1, len(train_dl))
    trainer = pl.Trainer(
        # one process: stages.training.world_size
        max_steps=cfg.max_steps, max_epochs=-1, accelerator=cfg.accelerator, devices=1,
        strategy=cfg.strategy, precision=resolve_precision(cfg.precision, gpu),
        accumulate_grad_batches=cfg.grad_accum,
        gradient_clip_val=cfg.grad_clip or None, logger=_logger(ctx), callbacks=callbacks,
        val_check_interval=min(cfg.val_every, n_train_batches) if cfg.val_every else None,
        check_val_every_n_epoch=None if cfg.val_every else 1,
        limit_val_batches=cfg.val_batches, num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(10, cfg.max_steps // 10)),
        enable_progress_bar=cfg.progress_bar, enable_model_summary=False,
        use_distributed_sampler=not row_sampler, default_root_dir=str(ctx.work_dir),
        plugins=[make_checkpoint_io()])
    last = usable_checkpoint(ckpt_dir / "last.ckpt", ctx.warn)  # None: absent, or corrupt (moved aside)
    module.resumed_from_step = checkpoint_step(last) if last else 0
    t0, cpu0 = time.monotonic(), time.process_time()
    trainer.fit(module, train_dl, val_dl, ckpt_path=str(last) if last else None)
    seconds = time.monotonic() - t0
    module.cpu_seconds = time.process_time() - cpu0  # all threads: a contention-free cost estimate
    if cfg.val_every:  # a final validation on the finished model
        trainer.validate(module, val_dl, verbose=False)
    return module, trainer, seconds


def fit_on_workers(cfg: Any, factory: TwoTowerFactory, block_size: int, make_loaders, ctx: StageContext):
    """`fit` across `cfg.num_workers` Ray Train workers, each calling `make_loaders()` (a picklable
    `RowLoaders` or `ShardLoaders`); returns (module with the trained weights loaded, metrics of
    the last step report plus the restarts, seconds). `restarts` counts worker-group restarts after
    a worker died, `resumed_from_step` is where the first start resumed (a rerun of the stage), and
    `restart_resumed_from_steps` lists where each restart resumed."""
    from stages.training.train_distributed import LazyFactory, config_from_train, fit_distributed

    dist = config_from_train(cfg, storage_path=str(Path(ctx.work_dir).resolve()), name="distributed",
                             seed=ctx.seed)
    make_module = LazyFactory("stages.training.denoiser_module:DenoiserModule", (factory, cfg, block_size))

    def on_report(report: dict) -> None:
        ctx.progress(report.get("step", 0), cfg.max_steps, "distributed")
        ctx.log_metrics({k.replace("/", "_"): float(v) for k, v in report.items() if k != "step"},
                        step=int(report.get("step", 0)))

    t0 = time.monotonic()
    result = fit_distributed(make_module, make_loaders, dist, on_report=on_report)
    seconds = time.monotonic() - t0
    module = make_module()
    module.load_state_dict(result.load_state_dict(), strict=False)  # the frozen tower is not saved
    starts = [int(s.get("resumed_from_step", 0)) for s in result.starts]
    faults = {"restarts": result.restarts, "resumed_from_step": starts[0] if starts else 0,
              "restart_resumed_from_steps": starts[1:]}
    if result.restarts:
        ctx.warn(f"Ray Train restarted the worker group {result.restarts} time(s) after a worker died; "
                 f"it resumed from step(s) {starts[1:]}")
    return module, {**dict(result.metrics), **faults}, seconds
