"""Training plumbing shared by `pretrain_backbone` and `train_denoiser`: one set of optimisation
fields, one LR schedule, one precision rule, one resume-step reader, one token-file reader.

Both stages fit a Lightning module on `prepare_data`'s token files with AdamW, a linear warmup and a
cosine decay, checkpoints in the stage's work directory and resume from the last one. What differs
between them (the loss, the stop rule, the optimizer's betas) stays in their own modules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from stages.api import Range

Precision = Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true"]


@dataclass
class Optimisation:
    """The optimisation fields of every training section (`pretrain`, `train`); a section's own
    `Config` inherits them, and a recipe sets the values it tunes."""

    max_steps: Annotated[int, Range(1)] = 300
    """Optimizer steps at most (training may stop earlier: a time budget, a reached target)."""
    batch_size: Annotated[int, Range(1)] = 16
    """Rows per micro-batch."""
    lr: Annotated[float, Range(0, low_open=True)] = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: Annotated[float, Range(0, 1)] = 0.1
    """The cosine decay ends at lr x min_lr_ratio."""
    warmup_steps: Annotated[int, Range(0)] = 20
    """Linear warmup steps."""
    weight_decay: Annotated[float, Range(0)] = 0.0
    """AdamW weight decay."""
    grad_clip: Annotated[float, Range(0)] = 1.0
    """Gradient-norm clip; 0 disables."""
    checkpoint_every: Annotated[int, Range(1)] = 100
    """Save a resumable checkpoint every this many optimizer steps (in the stage's work dir)."""
    num_threads: Annotated[int, Range(0)] = 0
    """torch intra-op threads on CPU; 0 leaves torch's default (the Ray task's CPUs)."""
    precision: Precision = "auto"
    """Lightning precision; `auto` is bf16-mixed on GPU and 32-true on CPU."""


def lr_factor(step: int, warmup_steps: int, progress: float, min_ratio: float) -> float:
    """LR multiplier: linear warmup over `warmup_steps` optimizer steps, times a cosine decay from 1
    to `min_ratio` over `progress` in [0, 1] of the budget (steps, or time when it ends first)."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    cos = min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    return warm * cos


def resolve_precision(precision: str, on_gpu: bool) -> str:
    """`auto` -> bf16-mixed on a GPU, 32-true on CPU (CPU bf16 autocast is slower than fp32)."""
    return precision if precision != "auto" else ("bf16-mixed" if on_gpu else "32-true")


def checkpoint_step(path: Path) -> int:
    """The optimizer step a resumable Lightning checkpoint was written at (0 when there is none)."""
    if not Path(path).exists():
        return 0
    import torch

    return int(torch.load(str(path), map_location="cpu", weights_only=False).get("global_step", 0))


def load_tokens(path: str, key_name: str) -> tuple[Any, Any]:
    """(`input_ids` int64 [N, L], `loss_mask` bool [N, L]) of a prepare_data split, in memory.

    `path` is a token-shard directory (`stages.data.token_shards`, what prepare_data writes) or a
    safetensors file with `input_ids` and optionally `loss_mask` (an all-ones one when absent).
    Only for splits that are small by construction (eval rows, the synthetic task corpus);
    training on a corpus reads it lazily (`stages.data.rows.ShardRows`). Errors name the manifest key
    the path came from (`key_name`)."""
    import torch
    from safetensors.torch import load_file

    from stages.data.token_shards import TokenShards, is_shard_dir

    if is_shard_dir(path):
        return TokenShards(path, key_name).to_tensors()
    if not Path(path).exists():
        raise ValueError(f"{key_name}: token file {path} does not exist")
    if Path(path).is_dir():
        raise ValueError(f"{key_name}: {path} is a directory without index.json (an unfinished token-shard split?)")
    tensors = load_file(path)
    ids = tensors.get("input_ids")
    if ids is None:
        raise ValueError(f"{key_name}: {path} has no `input_ids` tensor")
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise ValueError(f"{key_name}: {path} is empty (shape {tuple(ids.shape)})")
    mask = tensors.get("loss_mask")
    return ids.long(), (torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool())
