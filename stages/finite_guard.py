"""Stop training at the first non-finite loss or gradient norm, before it reaches a checkpoint.

A NaN or Inf in the loss or the gradients poisons every later step and, once saved, the `last.ckpt`
that a resume starts from. `FiniteGuard` (a Lightning callback) checks the loss after each batch and
the total gradient norm before each optimizer step, and raises `NonFiniteError` naming the step and
the last good checkpoint; the optimizer step that would write non-finite weights never runs, so
`last.ckpt` stays the last good one; and a checkpoint whose weights are not all finite is refused
while it is assembled, before any file is written (one pass over the weights per checkpoint).

Fault injection for tests: `PIPELINE_FAULT_NONFINITE=grad@N` makes the gradients NaN at optimizer
step N, `weights@N` makes a weight NaN at step N (the next loss is then NaN), `loss@N` the loss.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

FAULT_ENV = "PIPELINE_FAULT_NONFINITE"
"""`kind@step` with kind in grad, weights, loss: inject a non-finite value (tests only)."""
FAULT_KINDS = ("grad", "weights", "loss")


class NonFiniteError(FloatingPointError):
    """Training produced a NaN/Inf: the step, the quantity and the last good checkpoint."""


def parse_fault(value: str | None) -> tuple[str, int] | None:
    """`"grad@3"` -> ("grad", 3); None or "" -> None; anything else names the env var."""
    if not value:
        return None
    kind, _, step = value.partition("@")
    if kind not in FAULT_KINDS or not step.isdigit():
        raise ValueError(f"{FAULT_ENV}={value!r}: expected KIND@STEP with KIND one of {', '.join(FAULT_KINDS)}")
    return kind, int(step)


def last_good_checkpoint(ckpt_dir: Path) -> str:
    """How the error names the checkpoint a resume will start from."""
    last = Path(ckpt_dir) / "last.ckpt"
    return str(last) if last.exists() else f"none (no checkpoint in {ckpt_dir} yet: a resume starts at step 0)"


def make_finite_guard(ckpt_dir: Path):
    """The Lightning callback; imported lazily (Lightning takes seconds to import)."""
    import pytorch_lightning as pl
    import torch

    fault = parse_fault(os.environ.get(FAULT_ENV))

    class FiniteGuard(pl.Callback):
        def _fail(self, what: str, step: int, value: float) -> None:
            raise NonFiniteError(
                f"non-finite {what} ({value}) at optimizer step {step}; training stopped before the "
                f"step was applied. Last good checkpoint: {last_good_checkpoint(ckpt_dir)}. "
                "Resume with a change, e.g. `python -m pipeline run --resume RUN_DIR train.lr=...`")

        def _injected(self, kind: str, step: int) -> bool:
            return fault is not None and fault == (kind, step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if loss is None:
                return
            value = float(loss.detach())
            if self._injected("loss", trainer.global_step):
                value = math.nan
            if not math.isfinite(value):
                self._fail("loss", trainer.global_step, value)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            step = trainer.global_step
            params = [p for p in pl_module.parameters() if p.grad is not None]
            if self._injected("grad", step) and params:
                params[0].grad.fill_(math.nan)
            if self._injected("weights", step) and params:
                with torch.no_grad():
                    params[0].view(-1)[0] = math.nan
            if not params:
                return
            norm = float(torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad.detach().float()) for p in params])))
            if not math.isfinite(norm):
                self._fail("gradient norm", step, norm)

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            # runs while the checkpoint is assembled, before any file is written
            for name, tensor in checkpoint.get("state_dict", {}).items():
                if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all()):
                    self._fail(f"weight `{name}` in the checkpoint to save", trainer.global_step, math.nan)

    return FiniteGuard()
