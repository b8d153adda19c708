"""`place_towers_on_devices`: the context tower on one device, the denoiser on another.

Hidden states and caches cross between them inside the runtime (`TowerCache.to`, the training
forward's record), so callers only place the towers.
"""
from __future__ import annotations

import torch


def place_towers_on_devices(model, context_device: str | torch.device = "cpu",
                            denoiser_device: str | torch.device = "cpu"):
    """Move `model.context_tower` to `context_device` and `model.denoiser` to `denoiser_device`."""
    model.context_tower.to(context_device)
    model.denoiser.to(denoiser_device)
    return model
