"""Stage `duplicate_backbone`: inspect the backbone that both towers are copied from.

It does the real checks without copying weights three times: it loads the backbone (from
`pretrain_backbone` when that stage is in the graph, else `backbone.name_or_path`), walks its layers
through the adapter registry and records the layer map, the parameter counts (total and active per
token, per tower) and a per-device memory plan for the two towers. No tower weights are written
here: `train_denoiser` materialises them and `export` writes them once.

The manifest hands the backbone downstream as one typed reference (`stages.backbones.loading.BackboneRef`:
model, tokenizer, dtype, sequence length) under `backbone`, so later stages need only their direct
upstream manifests. `Config` is the `backbone` section, shared with `freeze_context`.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from planning.memory import DEFAULT_GPU_GIB
from stages.api import Range, StageContext
from stages.backbones.loading import DTYPE_BYTES, BackboneRef, Dtype, load_backbone
from twotower.devices import DEVICE, resolve_devices

SECTION = "backbone"
REQUIRES: tuple[str, ...] = ()  # prepare_data and pretrain_backbone are read when the graph has them

"""Accelerator memory assumed when a recipe does not say: one 80 GB H100 / A100, the card the
shipped large recipe is sized for (also `plan.gpu_memory_gib`'s fallback)."""
PLAN_BLOCK_SIZE = 16
"""Block size the memory plan assumes when no data stage says (the default `data.block_size`)."""
PLAN_SEQ_LEN = 256
"""Sequence length the memory plan assumes when no data stage says."""


@dataclass
class Config:
    """The `backbone` section: which pretrained model the two towers start from."""

    name_or_path: str | None = None
    """A local directory (or hub id, when online) loadable by `AutoModelForCausalLM`. Ignored when
    `pretrain_backbone` is in the graph: its model is used."""
    gguf_file: str | None = None
    """A GGUF checkpoint instead: a path (relative to `name_or_path` when that is a directory) or
    `package:MODULE/FILE` inside an installed package. Converted once to a safetensors directory
    under `<run.root>/cache/backbone_sources/` (stages/backbones/backbone_source.py; the `[real]` extra)."""
    revision: str | None = None
    """Hub revision of `name_or_path` (part of the hub source's key); None: the default branch."""
    dtype: Dtype = "float32"
    """Dtype the towers are held in for the memory plan and for loading: float32, bfloat16, float16."""
    context_device: str = "auto"
    """Device of the frozen context tower (`cpu`, `cuda:0`, ...); `auto` picks cuda:0 or cpu."""
    denoiser_device: str = "auto"
    """Device of the trainable denoiser tower; `auto` picks cuda:1 when two GPUs exist, else the
    context tower's device."""
    device_memory_gb: Annotated[float, Range(0, low_open=True)] = DEFAULT_GPU_GIB
    """Memory of one accelerator, for the plan's fit check (ignored on CPU)."""
    random_init: dict[str, Any] | None = None
    """Config fields to override (widths, expert counts) on `name_or_path`'s architecture, then a
    random init with the run's seed and the data's tokenizer (`stages.backbones.random_backbone`): the
    recipe's layer pattern and kinds at a size a CPU holds. None: the pretrained weights."""


def validate(cfg: Config) -> None:
    """Config-only checks, before anything runs: ValueError naming the key."""
    for key in ("context_device", "denoiser_device"):
        value = getattr(cfg, key)
        if not DEVICE.fullmatch(value):
            raise ValueError(f"backbone.{key}={value!r}: expected auto, cpu, mps, cuda or cuda:N")


def resolve_backbone_path(cfg: Config, inputs: dict[str, dict], cache_root: Path | None = None) -> str:
    """The backbone to use: the pretrained tiny model when present upstream, else the config's
    (a GGUF file converted once into `cache_root`; see `stages.backbones.backbone_source`)."""
    return resolve_backbone(cfg, inputs, cache_root)[0]


def resolve_backbone(cfg: Config, inputs: dict[str, dict], cache_root: Path | None = None,
                     seed: int = 0) -> tuple[str, dict]:
    """(loadable path, description of the source checkpoint for the card and summary.json)."""
    from stages.backbones import backbone_source

    if "pretrain_backbone" in inputs:
        return inputs["pretrain_backbone"]["artifacts"]["model"], {"kind": "pretrain_backbone"}
    root = Path(cache_root) if cache_root is not None else Path(tempfile.gettempdir()) / "twotower_backbones"
    if cfg.random_init is not None:
        from stages.backbones import random_backbone

        tokenizer = inputs.get("prepare_data", {}).get("artifacts", {}).get("tokenizer")
        if not cfg.name_or_path or not tokenizer:
            raise ValueError("backbone.random_init needs backbone.name_or_path (the architecture) and "
                             "prepare_data upstream (the tokenizer)")
        path = random_backbone.materialise(cfg.name_or_path, dict(cfg.random_init), tokenizer, root, seed, cfg.dtype)
        return path, {"kind": "random_init", "architecture": cfg.name_or_path, "seed": seed}
    path, source = backbone_source.resolve(cfg.name_or_path, cfg.gguf_file, cfg.revision, root, cfg.dtype)
    return path, source.describe()


def layer_map(model) -> list[dict[str, Any]]:
    """The adapter's layer walk: one entry per sublayer (index, backbone layer, kind)."""
    import adapters

    return [{"index": s.index, "layer": s.layer, "kind": s.kind} for s in adapters.get(model).sublayers(model)]


def memory_plan(cfg: Config, model, counts, seq_len: int, n_gpus: int,
                block_size: int = PLAN_BLOCK_SIZE) -> dict[str, Any]:
    """Where the towers go and how much memory each device needs (decoding and training).

    Arithmetic from `twotower.sizing` on the parameter counts and the cache shapes; both towers are
    the backbone's size (the new modules are a rounding error and counted by `attach_conditioning`).
    """
    from planning import memory, training
    from twotower import sizing

    ctx_dev, den_dev = resolve_devices(cfg.context_device, cfg.denoiser_device, n_gpus)
    bytes_w = DTYPE_BYTES[cfg.dtype]
    facts = sizing.family_facts(model)
    decode = memory.decode_memory(counts.total, counts.total, facts, batch=1,
                                  context_len=seq_len, block_size=block_size)
    train_len = max(block_size, seq_len // block_size * block_size)  # whole blocks
    train = training.training_memory(counts.total, counts.total, sizing.largest_layer_params(model),
                                   facts, training.TrainShape(max(1, n_gpus), 1, train_len, block_size))
    per_device: dict[str, float] = {}
    for dev, key in ((ctx_dev, "context_device_gib"), (den_dev, "denoiser_device_gib")):
        per_device[dev] = per_device.get(dev, 0.0) + decode["diffusion"][key]
    fits = all(gib <= cfg.device_memory_gb for d, gib in per_device.items() if d.startswith("cuda"))
    return {"dtype": cfg.dtype, "weights_gib_per_tower": counts.total * bytes_w / memory.GIB,
            "context_device": ctx_dev, "denoiser_device": den_dev,
            "decode_gib_per_device": per_device, "fits": fits, "decode_bf16": decode,
            "train_bf16_fsdp": train}


def run(cfg: Config, inputs: dict[str, dict], ctx: StageContext) -> dict:
    """Load the backbone, record layer map, parameter counts and the memory plan."""
    import torch

    from twotower import sizing

    path, source = resolve_backbone(cfg, inputs, Path(ctx.run_dir).parent / "cache" / "backbone_sources", ctx.seed)
    model, tokenizer = load_backbone(path, cfg.dtype)
    lmap = layer_map(model)
    counts = sizing.count_parameters(model)
    data = inputs.get("prepare_data", {})
    seq_len = int(data.get("seq_len") or PLAN_SEQ_LEN)
    plan = memory_plan(cfg, model, counts, seq_len, torch.cuda.device_count(),
                       int(data.get("block_size") or PLAN_BLOCK_SIZE))
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "layer_map.json").write_text(json.dumps(lmap, indent=1))
    (out / "memory_plan.json").write_text(json.dumps(plan, indent=1))
    kinds = [e["kind"] for e in lmap]
    metrics = {"params_total_per_tower": counts.total, "params_active_per_token": counts.active,
               "params_both_towers": 2 * counts.total, "params_routed_experts": counts.routed_experts,
               "n_sublayers": len(lmap), "weights_gib_per_tower": plan["weights_gib_per_tower"],
               "train_gib_per_gpu": plan["train_bf16_fsdp"]["total_gib"],
               **{f"layers_{k}": kinds.count(k) for k in sorted(set(kinds))}}
    from stages.backbones.backbone_source import source_line

    if source_line(source):
        metrics["source_checkpoint"] = source_line(source)
    ctx.log_artifact(out / "layer_map.json")
    ctx.log_artifact(out / "memory_plan.json")
    return {"metrics": metrics,
            "backbone": BackboneRef(path, path, cfg.dtype, data.get("seq_len"), cfg.context_device,
                                    cfg.denoiser_device).as_manifest(),
            "artifacts": {"layer_map": ctx.artifact_path("layer_map.json"),
                          "memory_plan": ctx.artifact_path("memory_plan.json")},
            "model_type": model.config.model_type, "source": source, "layer_map": lmap,
            "param_counts": counts.as_dict(),
            "memory_plan": {k: plan[k] for k in ("context_device", "denoiser_device", "decode_gib_per_device", "fits")},
            "vocab_size": len(tokenizer)}
