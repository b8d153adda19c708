"""Stage `duplicate_backbone`: inspect the backbone that both towers are copied from.

It does the real checks without copying weights three times: it loads the backbone (from
`pretrain_backbone` when that stage is in the graph, else `backbone.name_or_path`), walks its layers
through the adapter registry and records the layer map, the parameter counts (total and active per
token, per tower) and a per-device memory plan for the two towers. No tower weights are written
here: `train_denoiser` materialises them and `export` writes them once.

The manifest forwards the backbone path and tokenizer so that later stages need only their direct
upstream manifests. `Config` is the `backbone` section, shared with `freeze_context`.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.api import StageContext

SECTION = "backbone"
DEPENDS = ("twotower", "adapters", "stages.backbone_source")
"""Shared code this stage runs: hashed into its cache key (an edit there reruns the stage)."""

# Bytes per parameter for the dtypes a tower can be held in.
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Config:
    """The `backbone` section: which pretrained model the two towers start from."""

    name_or_path: str | None = None
    """A local directory (or hub id, when online) loadable by `AutoModelForCausalLM`. Ignored when
    `pretrain_backbone` is in the graph: its model is used."""
    gguf_file: str | None = None
    """A GGUF checkpoint instead: a path (relative to `name_or_path` when that is a directory) or
    `package:MODULE/FILE` inside an installed package. Converted once to a safetensors directory
    under `<run.root>/cache/backbone_sources/` (stages/backbone_source.py; the `[real]` extra)."""
    revision: str | None = None
    """Hub revision of `name_or_path` (part of the hub source's key); None: the default branch."""
    dtype: str = "float32"
    """Dtype the towers are held in for the memory plan and for loading: float32, bfloat16, float16."""
    context_device: str = "auto"
    """Device of the frozen context tower (`cpu`, `cuda:0`, ...); `auto` picks cuda:0 or cpu."""
    denoiser_device: str = "auto"
    """Device of the trainable denoiser tower; `auto` picks cuda:1 when two GPUs exist, else the
    context tower's device."""
    device_memory_gb: float = 80.0
    """Memory of one accelerator, for the plan's fit check (ignored on CPU)."""


def resolve_backbone_path(cfg: Config, inputs: dict[str, dict], cache_root: Path | None = None) -> str:
    """The backbone to use: the pretrained tiny model when present upstream, else the config's
    (a GGUF file converted once into `cache_root`; see `stages.backbone_source`)."""
    return resolve_backbone(cfg, inputs, cache_root)[0]


def resolve_backbone(cfg: Config, inputs: dict[str, dict], cache_root: Path | None = None) -> tuple[str, dict]:
    """(loadable path, description of the source checkpoint for the card and summary.json)."""
    from stages import backbone_source

    if "pretrain_backbone" in inputs:
        return inputs["pretrain_backbone"]["artifacts"]["model"], {"kind": "pretrain_backbone"}
    root = Path(cache_root) if cache_root is not None else Path(tempfile.gettempdir()) / "twotower_backbones"
    path, source = backbone_source.resolve(cfg.name_or_path, cfg.gguf_file, cfg.revision, root, cfg.dtype)
    return path, source.describe()


def torch_dtype(name: str):
    """`torch.float32` etc. from the config string, with a clear error naming the key."""
    import torch

    if name not in _DTYPE_BYTES:
        raise ValueError(f"backbone.dtype={name!r}: expected one of {sorted(_DTYPE_BYTES)}")
    return getattr(torch, name)


def load_backbone(path: str, dtype: str = "float32"):
    """Load the causal LM backbone and its tokenizer (saved beside it) from `path`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def layer_map(model) -> list[dict[str, Any]]:
    """The adapter's layer walk: one entry per sublayer (index, backbone layer, kind)."""
    import adapters

    return [{"index": s.index, "layer": s.layer, "kind": s.kind} for s in adapters.get(model).sublayers(model)]


def memory_plan(cfg: Config, model, counts, seq_len: int, n_gpus: int) -> dict[str, Any]:
    """Where the towers go and how much memory each device needs (decoding and training).

    Arithmetic from `twotower.sizing` on the parameter counts and the cache shapes; both towers are
    the backbone's size (the new modules are a rounding error and counted by `attach_conditioning`).
    """
    from twotower import sizing

    ctx_dev = cfg.context_device if cfg.context_device != "auto" else ("cuda:0" if n_gpus else "cpu")
    den_dev = cfg.denoiser_device
    if den_dev == "auto":
        den_dev = "cuda:1" if n_gpus >= 2 else ctx_dev
    bytes_w = _DTYPE_BYTES[cfg.dtype]
    decode = sizing.decode_memory(counts.total, counts.total, model.config, batch=1,
                                  context_len=seq_len, block_size=16)
    train_len = max(16, seq_len // 16 * 16)  # whole blocks of the plan's B=16
    train = sizing.training_memory(counts.total, counts.total, sizing.largest_layer_params(model),
                                   model.config, sizing.TrainShape(max(1, n_gpus), 1, train_len, 16))
    per_device: dict[str, float] = {}
    for dev, key in ((ctx_dev, "context_device_gib"), (den_dev, "denoiser_device_gib")):
        per_device[dev] = per_device.get(dev, 0.0) + decode["diffusion"][key]
    fits = all(gib <= cfg.device_memory_gb for d, gib in per_device.items() if d.startswith("cuda"))
    return {"dtype": cfg.dtype, "weights_gib_per_tower": counts.total * bytes_w / sizing.GIB,
            "context_device": ctx_dev, "denoiser_device": den_dev,
            "decode_gib_per_device": per_device, "fits": fits, "decode_bf16": decode,
            "train_bf16_fsdp": train}


def run(cfg: Config, inputs: dict[str, dict], ctx: StageContext) -> dict:
    """Load the backbone, record layer map, parameter counts and the memory plan."""
    import torch
    from twotower import sizing

    path, source = resolve_backbone(cfg, inputs, Path(ctx.run_dir).parent / "cache" / "backbone_sources")
    model, tokenizer = load_backbone(path, cfg.dtype)
    lmap = layer_map(model)
    counts = sizing.count_parameters(model, model.config)
    seq_len = int(inputs.get("prepare_data", {}).get("seq_len", 256))
    plan = memory_plan(cfg, model, counts, seq_len, torch.cuda.device_count())
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
    from stages.backbone_source import source_line

    if source_line(source):
        metrics["source_checkpoint"] = source_line(source)
    ctx.log_artifact(out / "layer_map.json")
    ctx.log_artifact(out / "memory_plan.json")
    return {"metrics": metrics,
            "artifacts": {"model": path, "tokenizer": path,
                          "layer_map": ctx.artifact_path("layer_map.json"),
                          "memory_plan": ctx.artifact_path("memory_plan.json")},
            "model_type": model.config.model_type, "source": source, "layer_map": lmap, "param_counts": counts.as_dict(),
            "memory_plan": {k: plan[k] for k in ("context_device", "denoiser_device", "decode_gib_per_device", "fits")},
            "vocab_size": len(tokenizer), "dtype": cfg.dtype,
            "seq_len": inputs.get("prepare_data", {}).get("seq_len")}
