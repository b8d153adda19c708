"""Where the two towers run: the context tower on one device, the denoiser on another
(`place_towers_on_devices`), and the recipe's `backbone.context_device` / `backbone.denoiser_device`
resolved, checked and applied.

Hidden states and caches cross between the devices inside the runtime (`TowerCache.to`, the training
forward's record), so callers only place the towers.

Why a module: the keys used to feed only the memory plan, while every decoding stage rebuilt the
model on the host, so a stage that reserved two GPUs for a 2 x 59 GiB model decoded it on the CPU.
Now one rule resolves `auto` (`resolve_devices`), one check runs at config time against the GPUs a
stage reserves (`check_reserved`, called by the `check_resources` hooks of calibrate_gamma, evaluate
and export), one at run time against the GPUs the process sees (`check_visible`), and `place` moves
the towers (`place_towers_on_devices`). `duplicate_backbone` forwards the two keys
downstream in its `BackboneRef`, so `stages.backbones.loading.load_trained` places what the recipe asked for.

Light by contract (imported at config time): torch only inside the functions.
"""
from __future__ import annotations

import re
from typing import Any

DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
"""What `backbone.context_device` / `backbone.denoiser_device` accept (torch device strings)."""
KEYS = ("context_device", "denoiser_device")


def resolve_devices(context_device: str, denoiser_device: str, n_gpus: int) -> tuple[str, str]:
    """`auto` made concrete for `n_gpus` visible GPUs: the context tower on cuda:0 (else cpu), the
    denoiser on cuda:1 when there are two (else beside the context tower)."""
    ctx = context_device if context_device != "auto" else ("cuda:0" if n_gpus else "cpu")
    den = denoiser_device if denoiser_device != "auto" else ("cuda:1" if n_gpus >= 2 else ctx)
    return ctx, den


def gpu_index(device: str) -> int | None:
    """The CUDA index a device string names (`cuda` is 0); None for cpu, mps and auto."""
    if not device.startswith("cuda"):
        return None
    return int(device.partition(":")[2] or 0)


def check_reserved(backbone: dict[str, Any], reserved_gpus: float, stage: str) -> None:
    """Config time: each placed tower's GPU index must be among the GPUs `graph.<stage>` reserves
    (a Ray task sees only those, numbered from 0). ValueError naming the keys."""
    for key in KEYS:
        value = str(backbone.get(key, "auto"))
        if not DEVICE.fullmatch(value):
            raise ValueError(f"backbone.{key}={value!r}: expected auto, cpu, mps, cuda or cuda:N")
        index = gpu_index(value)
        if index is not None and index >= reserved_gpus:
            raise ValueError(f"backbone.{key}={value!r} needs {index + 1} GPU(s) but "
                             f"graph.{stage}.resources.num_gpus={reserved_gpus:g}: reserve {index + 1}, "
                             f"or set backbone.{key}=cpu")


RECIPE_KEYS = tuple(f"backbone.{key}" for key in KEYS)


def check_visible(devices: tuple[str, str], visible_gpus: int, names: tuple[str, str] = RECIPE_KEYS) -> None:
    """Run time: the resolved devices must exist in this process. ValueError naming the key (or
    flag: `names`) that asked for them."""
    for name, value in zip(names, devices):
        index = gpu_index(value)
        if index is not None and index >= visible_gpus:
            raise ValueError(f"{name}={value!r}: this process sees {visible_gpus} GPU(s); reserve them "
                             "(a stage: graph.<stage>.resources.num_gpus), or place it on cpu")


def place_towers_on_devices(model, context_device="cpu", denoiser_device="cpu"):
    """Move `model.context_tower` to `context_device` and `model.denoiser` to `denoiser_device`
    (torch devices or their strings); returns the model."""
    model.context_tower.to(context_device)
    model.denoiser.to(denoiser_device)
    return model


def place(model, context_device: str = "auto", denoiser_device: str = "auto",
          names: tuple[str, str] = RECIPE_KEYS) -> tuple[str, str]:
    """Resolve, check against the visible GPUs, and move the towers; returns (context, denoiser)."""
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices = resolve_devices(context_device, denoiser_device, visible)
    check_visible(devices, visible, names)
    place_towers_on_devices(model, *devices)
    return devices


def devices_of(model) -> dict[str, str]:
    """Where the towers actually are (for a stage's metrics): `{context_tower, denoiser}`."""
    return {"context_tower": str(next(model.context_tower.parameters()).device),
            "denoiser": str(next(model.denoiser.parameters()).device)}


def input_device(model):
    """The device prompts go to: the context tower's (it reads them first)."""
    return next(model.context_tower.parameters()).device
