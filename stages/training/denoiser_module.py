"""`DenoiserModule`: the LightningModule that trains the denoiser tower of a `TwoTowerForDiffusionLM`.

Imported only by the code that fits (Lightning takes seconds to import; `validate` never loads it).
Only the denoiser's parameters are optimised and checkpointed: the context tower is the frozen
backbone, rebuilt from it on resume. The LR follows the step *or* the time budget, whichever is
further along, so a time-bounded run still ends its cosine decay.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import pytorch_lightning as pl
import torch

from stages.training.optimisation import lr_factor

ADAMW_BETAS = (0.9, 0.95)
"""β2 = 0.95 rather than torch's 0.999: the usual choice for language-model training (a shorter
second-moment memory); the tuned runs of docs/results/ used it."""


class DenoiserModule(pl.LightningModule):
    """Lightning wrapper around `TwoTowerForDiffusionLM`.

    Args:
        model_factory: zero-argument callable returning the model (e.g. `TwoTowerFactory`);
            called once in `__init__`, on each worker under a distributed runner.
        cfg: the `train` section (LR, warmup, schedule, budget).
        block_size: the model's block size.
    """

    def __init__(self, model_factory: Callable[[], Any], cfg: Any, block_size: int):
        super().__init__()
        self.model = model_factory()
        self.cfg = cfg
        self.block_size = block_size
        self.strict_loading = False  # checkpoints omit the frozen context tower
        self.elapsed_before = 0.0  # seconds trained in earlier sessions (resume)
        self.started = time.monotonic()
        self.resumed_from_step = 0
        self.resumed_lr: float | None = None  # the checkpoint's peak LR, when a resume changed it
        self.cpu_seconds = 0.0

    # budget and schedule ------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def progress_fraction(self) -> float:
        p = self.global_step / max(1, self.cfg.max_steps)
        if self.cfg.max_minutes:
            p = max(p, self.elapsed() / (60.0 * self.cfg.max_minutes))
        return min(1.0, p)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        # foreach: one fused kernel per op over all tensors (on CPU the per-tensor loop cost ~0.2 s
        # a step on a 35 M-parameter denoiser)
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, betas=ADAMW_BETAS,
                                foreach=True)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(step, self.cfg.warmup_steps, self.progress_fraction(),
                                        self.cfg.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # steps ----------------------------------------------------------------------------------------
    def _forward(self, batch, generator=None):
        """Training forward on a (ids, attention_mask, loss_mask) batch; pads are no-ops."""
        x, attn, loss_mask = batch
        return self.model(x, attention_mask=attn, loss_mask=loss_mask, generator=generator)

    def training_step(self, batch, batch_idx):
        out = self._forward(batch)
        self.log("train/loss", out.loss, prog_bar=True)
        if getattr(out, "masked_accuracy", None) is not None:
            self.log("train/masked_acc", out.masked_accuracy)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        if self.cfg.max_minutes and self.elapsed() >= 60.0 * self.cfg.max_minutes:
            self.trainer.should_stop = True
        return out.loss

    def validation_step(self, batch, batch_idx):
        x = batch[0]
        out = self._forward(batch, torch.Generator().manual_seed(batch_idx))  # same noise each time
        # sync_dist: Ray Train workers validate disjoint parts of the eval rows (`ShardLoaders`);
        # the logged value is their mean (a no-op in one process)
        self.log("val/loss", out.loss, prog_bar=True, batch_size=x.shape[0], sync_dist=True)
        if getattr(out, "masked_accuracy", None) is not None:
            self.log("val/masked_acc", out.masked_accuracy, batch_size=x.shape[0], sync_dist=True)
        self.log("val/elbo", out.elbo, batch_size=x.shape[0], sync_dist=True)  # 1/t-weighted, per maskable token

    # checkpoints: denoiser only -------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        sd = checkpoint["state_dict"]
        for k in [k for k in sd if k.startswith("model.context_tower.")]:
            del sd[k]
        checkpoint["elapsed_seconds"] = self.elapsed()

    def on_load_checkpoint(self, checkpoint):
        self.elapsed_before = float(checkpoint.get("elapsed_seconds", 0.0))
        self.started = time.monotonic()
        self.resumed_lr = rescale_lr(checkpoint, float(self.cfg.lr))


def rescale_lr(checkpoint: dict, lr: float) -> float | None:
    """Make a resumed run follow `lr` (e.g. lowered after a NaN): the checkpoint's optimizer and
    scheduler states carry the peak LR they were built with, and Lightning restores them after this
    hook, so they are rewritten here. Returns the checkpoint's peak LR when it differed, else None."""
    old = None
    for sched in checkpoint.get("lr_schedulers") or []:
        if "base_lrs" in sched:
            old = old if old is not None else float(sched["base_lrs"][0])
            factor = [last / base if base else 1.0 for last, base in
                      zip(sched.get("_last_lr", sched["base_lrs"]), sched["base_lrs"])]
            sched["base_lrs"] = [lr for _ in sched["base_lrs"]]
            if "_last_lr" in sched:
                sched["_last_lr"] = [lr * f for f in factor]
    for opt in checkpoint.get("optimizer_states") or []:
        for group in opt.get("param_groups", []):
            initial = float(group.get("initial_lr", group["lr"]))
            old = old if old is not None else initial
            group["lr"] = lr * (group["lr"] / initial if initial else 1.0)
            group["initial_lr"] = lr
    return old if old is not None and abs(old - lr) > 1e-12 * max(abs(lr), 1.0) else None
