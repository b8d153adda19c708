"""Stop training at the first non-finite loss or gradient norm, before it reaches a checkpoint.

A NaN or Inf in the loss or the gradients poisons every later step and, once saved, the `last.ckpt`
that a resume starts from. `FiniteGuard` (a Lightning callback) checks the loss after each batch and
the total gradient norm before each optimizer step, and raises `NonFiniteError` naming the step and
the last good checkpoint; the optimizer step that would write non-finite weights never runs, so
`last.ckpt` stays the last good one; and a checkpoint whose weights are not all finite is refused
while it is assembled, before any file is written (one pass over the weights per checkpoint).

Fault injection for tests: `PIPELINE_FAULT_NONFINITE=grad@N` makes the gradients NaN at optimizer
step N, `weights@N` makes a weight NaN at step N (the next loss is then NaN), `loss@N` the loss.
The variable is read where the callback is built, i.e. in the training process: `fault_env()` is what
a driver hands to processes it starts that may not inherit its environment (Ray Train workers of a
Ray started earlier, or on other nodes).
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


def fault_env() -> dict[str, str]:
    """The fault injection setting of this process, for workers that do not inherit its environment."""
    value = os.environ.get(FAULT_ENV)
    return {FAULT_ENV: value} if value else {}


def find_nonfinite(err: BaseException | None) -> NonFiniteError | None:
    """The `NonFiniteError` inside `err`: its cause/context chain, or a Ray Train
    `WorkerGroupError`'s per-rank `worker_failures` (the first rank that has one)."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, NonFiniteError):
            return e
        failures = getattr(e, "worker_failures", None) or {}
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        todo += [failures[rank] for rank in sorted(failures)]
    return None


def last_good_checkpoint(ckpt_dir: Path) -> str:
    """How the error names the checkpoint a resume will start from."""
    last = Path(ckpt_dir) / "last.ckpt"
    return str(last) if last.exists() else f"none (no checkpoint in {ckpt_dir} yet: a resume starts at step 0)"


def make_finite_guard(ckpt_dir: Path | None, last_good: str | None = None, section: str = "train"):
    """The Lightning callback; imported lazily (Lightning takes seconds to import). The error names
    `ckpt_dir/last.ckpt`, or `last_good` where checkpoints live elsewhere (Ray Train's storage).

    Under torch.distributed every rank takes the same decision (a MAX all-reduce of its verdict),
    so a NaN in one rank's gradient shard (FSDP) stops every rank instead of leaving the others
    waiting in the next collective."""
    import pytorch_lightning as pl
    import torch

    fault = parse_fault(os.environ.get(FAULT_ENV))

    def any_rank(bad: bool, device) -> bool:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return bad
        flag = torch.tensor([1.0 if bad else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    class FiniteGuard(pl.Callback):
        def _fail(self, what: str, step: int, value: float) -> None:
            where = last_good or last_good_checkpoint(ckpt_dir)
            raise NonFiniteError(
                f"non-finite {what} ({value}) at optimizer step {step}; training stopped before the "
                f"step was applied. Last good checkpoint: {where}. Resume with a change, e.g. "
                f"`python -m pipeline run --resume RUN_DIR {section}.lr=...`")

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
            norm = float(torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad.detach().float()) for p in params]))) if params else 0.0
            if any_rank(not math.isfinite(norm), pl_module.device):
                self._fail("gradient norm", step, norm)

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            # runs while the checkpoint is assembled, before any file is written
            bad = next((name for name, tensor in checkpoint.get("state_dict", {}).items()
                        if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all())), None)
            if any_rank(bad is not None, pl_module.device):
                self._fail(f"weight `{bad or 'on another rank'}` in the checkpoint to save",
                           trainer.global_step, math.nan)

    return FiniteGuard()
