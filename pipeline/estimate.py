"""Parameter and memory estimate for `python -m pipeline plan`: no weights, no GPU, no network.

`estimate(cfg)` resolves the recipe's backbone config (a local checkpoint directory, or a config
shipped under `recipes/backbones/` whose `_name_or_path` names the hub id), builds the backbone
and, when the runtime is importable, both towers of `TwoTowerForDiffusionLM` on the meta device,
and returns plain JSON: parameters per tower (total / active per token, with and without the
input embedding table), the new parameters by kind, bf16 memory per device for diffusion decoding
(two devices, one tower each) and AR-only, and per-GPU training memory under FSDP.

The arithmetic lives in `twotower.sizing`; this module only reads the config and assembles.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

SHIPPED_BACKBONES = Path(__file__).resolve().parent.parent / "recipes" / "backbones"
"""Backbone configs shipped with the repo, so `plan` works offline for the published recipes."""

GPU_GIB = 80.0
"""The accelerator memory training plans are sized against (an 80 GB H100/A100)."""


def shipped_backbone_configs() -> dict[str, Path]:
    """Hub id (`_name_or_path`) -> shipped JSON file."""
    out: dict[str, Path] = {}
    for path in sorted(SHIPPED_BACKBONES.glob("*.json")):
        name = json.loads(path.read_text()).get("_name_or_path")
        if name:
            out[name] = path
    return out


def load_backbone_config(name_or_path: str):
    """The transformers config of a backbone, offline: a local directory/JSON or a shipped config."""
    from transformers import AutoConfig

    path = Path(name_or_path)
    if path.is_dir() and (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path, local_files_only=True)
    if path.suffix == ".json" and path.is_file():
        return config_from_json(path)
    shipped = shipped_backbone_configs()
    if name_or_path in shipped:
        return config_from_json(shipped[name_or_path])
    raise ValueError(
        f"backbone.name_or_path={name_or_path!r}: not a local checkpoint and no shipped config in "
        f"{SHIPPED_BACKBONES} (shipped: {sorted(shipped)})"
    )


def config_from_json(path: Path):
    """A transformers config from a config.json-style file, by its `model_type`."""
    from transformers import AutoConfig

    data = json.loads(Path(path).read_text())
    if "model_type" not in data:
        raise ValueError(f"{path}: no `model_type` key")
    kwargs = {k: v for k, v in data.items() if not k.startswith("_") and k != "model_type"}
    config = AutoConfig.for_model(data["model_type"], **kwargs)
    config._name_or_path = data.get("_name_or_path", str(path))
    return config


def _select(cfg: Any, key: str, default: Any = None) -> Any:
    """`cfg[a][b]` for a dotted key on a DictConfig or plain dict; `default` when absent/None."""
    node = cfg
    for part in key.split("."):
        try:
            node = node[part] if part in node else None
        except TypeError:
            node = getattr(node, part, None)
        if node is None:
            return default
    return node


def _plain(cfg: Any) -> dict:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(cfg)


def estimate(cfg: Any, *, num_gpus: int | None = None, gpu_gib: float = GPU_GIB) -> dict:
    """The plan's parameter/memory estimate for a resolved recipe config (DictConfig or dict)."""
    from twotower import sizing

    started = time.perf_counter()
    gpu_gib = float(_select(cfg, "plan.gpu_memory_gib", 0) or _select(cfg, "backbone.device_memory_gb", 0) or gpu_gib)
    name = _select(cfg, "backbone.name_or_path")
    if not name and _select(cfg, "backbone.gguf_file"):
        return {"backbone": None, "note": f"backbone.gguf_file={_select(cfg, 'backbone.gguf_file')!r}: sized by "
                "duplicate_backbone once converted (the plan reads no weights)"}
    if not name:
        return {"backbone": None, "note": "backbone.name_or_path is not set (the backbone is pretrained "
                "by the pipeline); nothing to size before it exists"}
    config = load_backbone_config(str(name))
    block_size = int(_select(cfg, "twotower.block_size", 16))
    backbone = sizing.build_on_meta(config)
    counts = sizing.count_parameters(backbone, config)
    new, new_source = _new_parameters(cfg, backbone, config, block_size)
    context = counts.as_dict()
    denoiser = {k: v + (new["total"] if k in ("total", "active", "total_without_embeddings",
                                              "active_without_embeddings") else 0)
                for k, v in context.items()}
    largest = sizing.largest_layer_params(backbone)
    shape = _train_shape(cfg, block_size, num_gpus)
    decode = {
        f"batch_{b}": sizing.decode_memory(context["total"], denoiser["total"], config, batch=b,
                                            context_len=int(_select(cfg, "plan.context_len", 4096)),
                                            block_size=block_size)
        for b in (1, 8)
    }
    traffic = {f"batch_{b}": sizing.decode_traffic(counts, config, batch=b, block_size=block_size,
                                                    new_params=new["total"]) for b in (1, 8)}
    train = sizing.training_memory(context["total"], denoiser["total"], largest, config, shape)
    ctx_counts = counts
    den_counts = sizing.ParamCounts(**{k: v + (new["total"] if k in ("total", "active") else 0)
                                       for k, v in asdict(counts).items()})
    step_time = sizing.training_step_time(ctx_counts, den_counts, shape,
                                          grad_accum=int(_select(cfg, "train.grad_accum", 1)))
    steps = int(_select(cfg, "train.max_steps", 0) or 0)
    step_time["max_steps"] = steps
    step_time["hours_for_max_steps"] = steps * step_time["step_s"] / 3600
    fit = sizing.min_gpus(context["total"], denoiser["total"], largest, config, shape, gpu_gib)
    summary = {
        "params_per_tower_b": round(context["total"] / 1e9, 2),
        "active_per_token_b_without_embeddings": round(context["active_without_embeddings"] / 1e9, 2),
        "new_params_m": round(new["total"] / 1e6, 1),
        "diffusion_gib_per_device_batch1": [round(decode["batch_1"]["diffusion"]["context_device_gib"], 1),
                                            round(decode["batch_1"]["diffusion"]["denoiser_device_gib"], 1)],
        "ar_only_gib_batch1": round(decode["batch_1"]["ar_only"]["device_gib"], 1),
        "train_gib_per_gpu": round(train["total_gib"], 1),
        "train_gpus": shape.num_gpus,
        "train_min_gpus": fit,
        "train_hours_for_max_steps": round(step_time["hours_for_max_steps"], 1),
    }
    return {
        "summary": summary,
        "backbone": {"name_or_path": str(name), "model_type": config.model_type,
                     "layers": sizing.layer_kinds(config), "hidden_size": int(config.hidden_size),
                     "vocab_size": int(config.vocab_size)},
        "params": {"context_tower": context, "denoiser": denoiser,
                   "both_towers_total": context["total"] + denoiser["total"]},
        "new_params": {**new, "source": new_source},
        "decode_memory": decode,
        "decode_traffic": traffic,
        "train_memory": {**train, "largest_layer_params": largest},
        "train_memory_by_gpus": {
            str(n): round(sizing.training_memory(context["total"], denoiser["total"], largest, config,
                                                 replace(shape, num_gpus=n))["total_gib"], 1)
            for n in (8, 16, 32, 64)
        },
        "train_min_gpus": {"gpu_gib": gpu_gib, "num_gpus": fit},
        "train_time": step_time,
        "placement": _placement(cfg, decode["batch_1"]),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _train_shape(cfg: Any, block_size: int, num_gpus: int | None):
    """The training job to size: GPUs from `plan.num_gpus`, else `train.num_workers` /
    `train.devices` (16 if none is set above 1)."""
    from twotower.sizing import TrainShape

    workers = num_gpus or int(_select(cfg, "plan.num_gpus", 0) or 0) or max(int(_select(cfg, "train.num_workers", 0) or 0),
                              int(_select(cfg, "train.devices", 0) or 0))
    seq_len = int(_select(cfg, "train.seq_len", 0) or _select(cfg, "data.seq_len", 4096))
    micro = int(_select(cfg, "train.micro_batch_size", 0) or _select(cfg, "train.batch_size", 1))
    return TrainShape(num_gpus=workers if workers > 1 else 16, micro_batch=micro,
                      seq_len=seq_len - seq_len % block_size or block_size, block_size=block_size)


def _new_parameters(cfg: Any, backbone, config, block_size: int) -> tuple[dict, str]:
    """New parameters by kind from both towers built on meta; the formula if the runtime is absent."""
    from twotower import sizing

    try:
        from twotower import TwoTowerConfig, TwoTowerForDiffusionLM
    except ImportError as err:
        return _formula(cfg, config, block_size), f"formula ({err})"
    import torch

    section = _plain(_select(cfg, "twotower", {}) or {})
    try:
        tt_cfg = TwoTowerConfig(**section)
        with torch.device("meta"):
            model = TwoTowerForDiffusionLM.from_backbone(backbone, tt_cfg)
    except Exception as err:  # noqa: BLE001 - report, never fail the plan on the optional build
        return _formula(cfg, config, block_size), f"formula (meta build: {err})"
    return sizing.new_parameters_by_kind(model.denoiser, backbone), "TwoTowerForDiffusionLM on meta"


def _formula(cfg: Any, config, block_size: int) -> dict:
    from twotower import sizing

    return sizing.formula_new_parameters(config, block_size=block_size,
                                         time_embed_dim=int(_select(cfg, "twotower.time_embed_dim", 128)))


def _placement(cfg: Any, decode: dict) -> dict:
    """Where the recipe puts each tower (`auto`: cuda:0 / cuda:1) and whether each device fits."""
    ctx = str(_select(cfg, "backbone.context_device", "auto"))
    den = str(_select(cfg, "backbone.denoiser_device", "auto"))
    ctx = "cuda:0" if ctx == "auto" else ctx
    den = "cuda:1" if den == "auto" else den
    gib = float(_select(cfg, "backbone.device_memory_gb", GPU_GIB) or GPU_GIB)
    dif = decode["diffusion"]
    same = ctx == den
    need_ctx = dif["context_device_gib"] + (dif["denoiser_device_gib"] if same else 0.0)
    return {
        "diffusion": {"context_tower": ctx, "denoiser": den, "device_memory_gib": gib,
                      "fits": need_ctx <= gib and dif["denoiser_device_gib"] <= gib},
        "ar_only": {"context_tower": ctx, "fits": decode["ar_only"]["device_gib"] <= gib},
        "crosses_devices_per_block": "the block's new context K/V, the Mamba states at its start, "
                                     "the committed token ids" if not same else "nothing (one device)",
    }
