"""Parameter and memory estimate for `python -m pipeline plan`: no weights, no GPU, no network.

`estimate(cfg)` resolves the recipe's backbone config (a local checkpoint directory, or a config
shipped under `recipes/backbones/` whose `_name_or_path` names the hub id), builds the backbone
and, when the runtime is importable, both towers of `TwoTowerForDiffusionLM` on the meta device,
and returns plain JSON: parameters per tower (total / active per token, with and without the
input embedding table), the new parameters by kind, bf16 memory per device for diffusion decoding
(two devices, one tower each) and AR-only, and per-GPU training memory under FSDP.

The arithmetic lives in `twotower.sizing` (counts), `planning.memory` and `planning.training`; this
module only reads the config and assembles. It reads
the sections through the typed configs of the stages that own them (`backbone`, `data`, `train`,
`twotower`, `plan`), never by key strings: a key the schema does not have cannot be read here.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from planning import memory
from planning.memory import DEFAULT_GPU_GIB
from stages.backbones.backbone_configs import (  # noqa: F401
    SHIPPED_BACKBONES,
    config_from_json,
    load_backbone_config,
    shipped_backbone_configs,
)

GPU_GIB = DEFAULT_GPU_GIB
"""The accelerator memory training plans are sized against when the recipe does not say."""
UNSET_GPUS = 16
"""GPUs the training estimate is sized for when neither `plan.num_gpus` nor `train` asks for more
than one: two 8-GPU nodes, the smallest job the shipped large recipe needs (docs/scaling.md)."""


def _plain(cfg: Any) -> dict:
    """A resolved config as a plain dict: a PipelineConfig, a DictConfig or a dict of sections."""
    if hasattr(cfg, "resolved"):
        return cfg.resolved
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


@dataclass
class Sections:
    """The typed sections the estimate reads (defaults filled in where the recipe is silent)."""

    backbone: Any
    data: Any
    train: Any
    twotower: Any
    plan: Any

    @classmethod
    def of(cls, cfg: Any) -> "Sections":
        """From a resolved config (plain dict or DictConfig; sections may be absent)."""
        from pipeline.schema import PlanConfig, build
        from stages import duplicate_backbone, prepare_data, train_denoiser
        from twotower import TwoTowerConfig

        plain = _plain(cfg)
        section = lambda name: dict(plain.get(name) or {})  # noqa: E731
        return cls(backbone=build(duplicate_backbone.Config, section("backbone")),
                   data=build(prepare_data.Config, section("data")),
                   train=build(train_denoiser.Config, section("train")),
                   twotower=TwoTowerConfig(**section("twotower")),
                   plan=build(PlanConfig, section("plan")))


SHALLOW_DEPTHS = (2, 4)
"""Shallow denoiser depths `plan` sizes beside the full depth (DFlash drafts with ~5 layers)."""


def estimate(cfg: Any, *, num_gpus: int | None = None, gpu_gib: float = GPU_GIB) -> dict:
    """The plan's parameter/memory estimate for a resolved recipe config (DictConfig or dict)."""
    from planning import memory, training
    from twotower import sizing

    started = time.perf_counter()
    sec = Sections.of(cfg)
    gpu_gib = float(sec.plan.gpu_memory_gib or sec.backbone.device_memory_gb or gpu_gib)
    name = sec.backbone.name_or_path
    if not name and sec.backbone.gguf_file:
        return {"backbone": None, "note": f"backbone.gguf_file={sec.backbone.gguf_file!r}: sized by "
                "duplicate_backbone once converted (the plan reads no weights)"}
    if not name:
        return {"backbone": None, "note": "backbone.name_or_path is not set (the backbone is pretrained "
                "by the pipeline); nothing to size before it exists"}
    config = load_backbone_config(str(name))
    block_size = int(sec.twotower.block_size)
    backbone = sizing.build_on_meta(config)
    facts = sizing.family_facts(backbone)
    counts = sizing.count_parameters(backbone, facts)
    new, new_source, kept = _new_parameters(sec, backbone, facts, block_size)
    context = counts.as_dict()
    n_layers = int(getattr(config, "num_hidden_layers", 0) or 0) or None
    fraction = 1.0 if kept is None else kept["fraction"]
    den_counts = memory.shallow_counts(counts, fraction, new["total"])
    denoiser = den_counts.as_dict()
    largest = sizing.largest_layer_params(backbone)
    shape = _train_shape(sec, block_size, num_gpus)
    decode = {
        f"batch_{b}": memory.decode_memory(context["total"], denoiser["total"], facts, batch=b,
                                            context_len=int(sec.plan.context_len),
                                            block_size=block_size)
        for b in (1, 8)
    }
    traffic = {f"batch_{b}": memory.decode_traffic(counts, facts, batch=b, block_size=block_size,
                                                    denoiser=den_counts) for b in (1, 8)}
    train = training.training_memory(context["total"], denoiser["total"], largest, facts, shape)
    step_time = training.training_step_time(counts, den_counts, shape, grad_accum=int(sec.train.grad_accum))
    steps = int(sec.train.max_steps)
    step_time["max_steps"] = steps
    step_time["hours_for_max_steps"] = steps * step_time["step_s"] / 3600
    by_depth = {}  # the same recipe at full depth and at shallow depths, side by side (estimates)
    for name, frac in [("full", 1.0)] + [(f"{k}_layers", k / n_layers) for k in SHALLOW_DEPTHS
                                         if n_layers and k < n_layers]:
        dc = memory.shallow_counts(counts, frac, new["total"])
        t = training.training_step_time(counts, dc, shape, grad_accum=int(sec.train.grad_accum))
        by_depth[name] = {"denoiser_params_b": round(dc.total / 1e9, 3),
                          "train_gib_per_gpu": round(training.training_memory(
                              context["total"], dc.total, largest, facts, shape)["total_gib"], 1),
                          "step_s": round(t["step_s"], 2), "bound": t["bound"],
                          "train_hours_for_max_steps": round(steps * t["step_s"] / 3600, 2),
                          "denoiser_forward_gib_batch1": round(memory.decode_traffic(
                              counts, facts, batch=1, block_size=block_size, denoiser=dc)["denoiser_forward_gib"], 2)}
    fit = training.min_gpus(context["total"], denoiser["total"], largest, facts, shape, gpu_gib)
    summary = {
        "params_per_tower_b": round(context["total"] / 1e9, 2),
        "active_per_token_b_without_embeddings": round(context["active_without_embeddings"] / 1e9, 2),
        "new_params_m": round(new["total"] / 1e6, 1),
        "denoiser_layers": (kept or {}).get("layers", "all"),
        "denoiser_params_b": round(denoiser["total"] / 1e9, 2),
        "denoiser_forward_vs_ar_traffic_batch1": round(traffic["batch_1"]["denoiser_forward_gib"]
                                                       / traffic["batch_1"]["ar_forward_gib"], 2),
        "diffusion_gib_per_device_batch1": [round(decode["batch_1"]["diffusion"]["context_device_gib"], 1),
                                            round(decode["batch_1"]["diffusion"]["denoiser_device_gib"], 1)],
        "ar_only_gib_batch1": round(decode["batch_1"]["ar_only"]["device_gib"], 1),
        "train_gib_per_gpu": round(train["total_gib"], 1),
        "train_gpus": shape.num_gpus,
        "world_size": world(sec).world_size,
        "tokens_per_step": world(sec).tokens_per_step,
        "train_min_gpus": fit,
        "train_hours_for_max_steps": round(step_time["hours_for_max_steps"], 1),
    }
    return {
        "summary": summary,
        "backbone": {"name_or_path": str(name), "model_type": config.model_type,
                     "layers": sizing.layer_kinds(facts), "hidden_size": facts.hidden_size,
                     "vocab_size": facts.vocab_size},
        "params": {"context_tower": context, "denoiser": denoiser,
                   "both_towers_total": context["total"] + denoiser["total"]},
        "new_params": {**new, "source": new_source},
        "decode_memory": decode,
        "decode_traffic": traffic,
        "train_memory": {**train, "largest_layer_params": largest},
        "train_memory_by_gpus": {
            str(n): round(training.training_memory(context["total"], denoiser["total"], largest, facts,
                                                 replace(shape, num_gpus=n))["total_gib"], 1)
            for n in (8, 16, 32, 64)
        },
        "train_min_gpus": {"gpu_gib": gpu_gib, "num_gpus": fit},
        "train_time": step_time,
        "train_by_denoiser_depth": by_depth,
        "placement": _placement(sec, decode["batch_1"]),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _train_shape(sec: Sections, block_size: int, num_gpus: int | None):
    """The training job to size: GPUs from `plan.num_gpus`, else the run's world size
    (`stages.training.world_size`; `UNSET_GPUS` if neither is above 1); rows of `data.seq_len` tokens in
    micro-batches of `train.batch_size`."""
    from planning.training import TrainShape

    workers = num_gpus or sec.plan.num_gpus or world(sec).num_workers
    seq_len = int(sec.data.seq_len)
    return TrainShape(num_gpus=workers if workers > 1 else UNSET_GPUS, micro_batch=int(sec.train.batch_size),
                      seq_len=seq_len - seq_len % block_size or block_size, block_size=block_size)


def world(sec: Sections):
    """The training world the run will use (`stages.training.world_size.world_of`, as `train_denoiser` calls it)."""
    from stages.training.world_size import world_of

    return world_of(sec.train, int(sec.data.seq_len))


def plan_world(cfg: Any) -> dict | None:
    """World size, micro-batch and tokens per step of the recipe's training, for `plan`; None when
    the graph does not train the denoiser. Light: no backbone config is read."""
    from pipeline.schema import build
    from stages import prepare_data, train_denoiser
    from stages.training.world_size import world_of

    plain = _plain(cfg)
    if "train_denoiser" not in (plain.get("graph") or {}):
        return None
    train = build(train_denoiser.Config, dict(plain.get("train") or {}))
    data = build(prepare_data.Config, dict(plain.get("data") or {}))
    return world_of(train, int(data.seq_len)).as_dict()


def _new_parameters(sec: Sections, backbone, facts, block_size: int) -> tuple[dict, str, dict | None]:
    """New parameters by kind from both towers built on meta (the formula if the runtime is
    absent), and the kept layers of the denoiser: `{"layers": [...], "fraction": their share of
    the backbone's layer parameters}` (None: full depth, or not built)."""
    from twotower import sizing

    try:
        from twotower import TwoTowerConfig, TwoTowerForDiffusionLM
    except ImportError as err:
        return _formula(sec, facts, block_size), f"formula ({err})", None
    import torch

    tt_cfg = TwoTowerConfig(**asdict(sec.twotower))
    try:
        with torch.device("meta"):
            model = TwoTowerForDiffusionLM.from_backbone(backbone, tt_cfg)
    except ValueError as err:
        if "denoiser_layers" in str(err):  # a layer the backbone does not have: the recipe's error
            raise
        return _formula(sec, facts, block_size), f"formula (meta build: {err})", None
    except Exception as err:  # noqa: BLE001 - report, never fail the plan on the optional build
        return _formula(sec, facts, block_size), f"formula (meta build: {err})", None
    new = sizing.new_parameters_by_kind(model.denoiser, backbone)
    kept = None
    if not model.full_depth:
        kept = {"layers": model.denoiser_layers,
                "fraction": layer_parameters(model.denoiser.backbone) / max(1, layer_parameters(backbone))}
    return new, "TwoTowerForDiffusionLM on meta", kept


def layer_parameters(model) -> int:
    """Parameters of a causal LM outside its input embedding and LM head (tied ones counted once)."""
    outside = {id(p) for mod in (model.get_input_embeddings(), model.get_output_embeddings()) if mod is not None
               for p in mod.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in outside)


def _formula(sec: Sections, facts, block_size: int) -> dict:
    return memory.formula_new_parameters(facts, block_size=block_size,
                                         time_embed_dim=int(sec.twotower.time_embed_dim))


def _placement(sec: Sections, decode: dict) -> dict:
    """Where the recipe puts each tower (`auto`: cuda:0 / cuda:1) and whether each device fits."""
    ctx, den = sec.backbone.context_device, sec.backbone.denoiser_device
    ctx = "cuda:0" if ctx == "auto" else ctx
    den = "cuda:1" if den == "auto" else den
    gib = float(sec.backbone.device_memory_gb)
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
