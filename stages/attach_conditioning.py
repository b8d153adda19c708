"""Stage `attach_conditioning`: build the denoiser's new modules and verify the zero-init identity.

Reads the `twotower` section (`Config` is `twotower.TwoTowerConfig`, resolved lazily so that
importing this module stays cheap). It wraps the backbone with `TwoTowerForDiffusionLM.from_backbone`,
records the per-layer conditioning map and the new parameters by kind, re-verifies the trainable set
and then checks invariant 4: with gates and AdaLN at their initial zeros the denoiser's own forward
gives the backbone's logits (`twotower.checks.zero_init_identity`, max |Δ| below `tolerance`).
The block size is checked against the data's sequence length here, before the denoiser trains.
No weights are written: `train_denoiser` rebuilds the same model from the manifest.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from stages.api import StageContext
from stages.backbones.loading import BackboneRef, load_backbone

SECTION = "twotower"
REQUIRES = ("freeze_context",)

IDENTITY_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 5e-2}
"""Max |Δ| between a zero-init denoiser layer and its backbone layer: rounding only (fp32 sums in a
different order; half precision keeps ~3 significant digits)."""


def check_block_size(block_size: int, seq_len: int) -> None:
    """A block size must divide the packed sequence length (and leave room for a denoised token)."""
    if block_size < 2:
        raise ValueError(f"twotower.block_size={block_size}: must be at least 2")
    if seq_len % block_size or seq_len < block_size:
        raise ValueError(f"twotower.block_size={block_size} does not fit data.seq_len={seq_len}: "
                         "the sequence length must be a multiple of the block size")


def __getattr__(name: str):
    # PEP 562: `Config` is the runtime's own dataclass; importing it pulls in transformers (slow).
    if name == "Config":
        from twotower.config import TwoTowerConfig

        return TwoTowerConfig
    raise AttributeError(name)


def check(sections: dict) -> None:
    """Cross-section check for the engine to call at config time (before anything trains): the
    block size must divide `data.seq_len` and match `data.block_size`. ValueError naming the keys."""
    block = (sections.get("twotower") or {}).get("block_size", 16)
    data = sections.get("data") or {}
    if "seq_len" in data:
        check_block_size(int(block), int(data["seq_len"]))
    if "block_size" in data and int(data["block_size"]) != int(block):
        raise ValueError(f"twotower.block_size={block} differs from data.block_size={data['block_size']}: "
                         "the data is laid out for the denoiser's blocks; set them equal")
    check_denoiser_layers(sections)


def check_denoiser_layers(sections: dict) -> None:
    """`twotower.denoiser_layers` (and `fused_layers` with `fused_kv`) against the backbone's layer count,
    at config time, when the
    backbone's config is readable offline without weights (a local checkpoint or a config shipped
    under recipes/backbones/, and no `random_init` reshaping it); otherwise the stage checks it
    when it builds the towers. ValueError naming the key and the layer count."""
    import json

    from stages.backbones.backbone_configs import backbone_config_file

    tt = sections.get("twotower") or {}
    layers = tt.get("denoiser_layers")
    fused = tt.get("fused_layers", 4) if tt.get("attention_conditioning") == "fused_kv" else None
    backbone = sections.get("backbone") or {}
    name = backbone.get("name_or_path")
    if (layers is None and fused is None) or not name or backbone.get("random_init"):
        return
    found = backbone_config_file(str(name))
    n = json.loads(found.read_text()).get("num_hidden_layers") if found else None
    if isinstance(n, int):
        from twotower.config import TwoTowerConfig

        TwoTowerConfig(denoiser_layers=layers).kept_layers(n)
        if fused is not None:
            TwoTowerConfig(fused_layers=fused).fused_context_layers(n)


def probe_ids(vocab_size: int, block_size: int, seed: int, n_blocks: int = 3):
    """Deterministic token ids [2, n_blocks*B] avoiding the first 5 (special) ids when possible."""
    import torch

    g = torch.Generator().manual_seed(seed)
    low = 5 if vocab_size > 10 else 0
    return torch.randint(low, vocab_size, (2, n_blocks * block_size), generator=g)


def run(cfg, inputs: dict[str, dict], ctx: StageContext) -> dict:
    """Build the two towers with `cfg`, check trainable set and zero-init identity, record them."""
    from stages.freeze_context import trainable_report
    from twotower import TwoTowerForDiffusionLM, checks, sizing

    up = inputs["freeze_context"]
    ref = BackboneRef.of(up, "freeze_context")
    if ref.seq_len:
        check_block_size(cfg.block_size, int(ref.seq_len))
    dtype = ref.dtype
    backbone, tokenizer = load_backbone(ref.model, dtype)
    model = TwoTowerForDiffusionLM.from_backbone(backbone, cfg)
    model.eval()
    report = trainable_report(model)
    if report["violations"]:
        raise ValueError("trainable set violates the contract after attaching: "
                         + ", ".join(report["violations"][:10]))
    new = sizing.new_parameters_by_kind(model.denoiser, backbone)
    delta = None
    if model.full_depth:  # every layer kept: at zero init the denoiser computes the backbone
        delta = float(checks.zero_init_identity(model, probe_ids(backbone.config.vocab_size, cfg.block_size, ctx.seed)))
        tol = IDENTITY_TOLERANCE.get(dtype, 1e-4)
        if not delta <= tol:
            raise ValueError(f"zero-init identity failed: max |Δ| = {delta:.3g} > {tol:g} between the denoiser's "
                             f"logits and the context tower's with twotower={asdict(cfg)}")
    else:  # a shallow denoiser: its kept layers must start as the backbone's own
        bad = checks.kept_layers_match(model, backbone)
        if bad:
            raise ValueError(f"twotower.denoiser_layers={cfg.denoiser_layers}: the denoiser's copy differs from "
                             f"the backbone at {bad[:5]}")
    if not checks.context_matches(model, backbone):
        raise ValueError("context tower differs from the backbone after attaching")
    layer_map = model.layer_map()
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "conditioning_map.json").write_text(json.dumps(layer_map, indent=1, default=str))
    (out / "twotower_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    den_params = sum(p.numel() for p in model.denoiser.parameters())
    metrics = {**({"zero_init_max_abs_delta": delta} if delta is not None else {}),
               "denoiser_layers": len(model.denoiser_layers), "denoiser_params": den_params,
               "params_new_total": new["total"],
               **{f"params_new_{k}": v for k, v in new.items() if k != "total"},
               "params_trainable": report["trainable"], "params_frozen": report["frozen"],
               "block_size": cfg.block_size}
    ctx.log_artifact(out / "conditioning_map.json")
    ctx.log_artifact(out / "twotower_config.json")
    return {"metrics": metrics,
            "artifacts": {"conditioning_map": ctx.artifact_path("conditioning_map.json"),
                          "twotower_config": ctx.artifact_path("twotower_config.json")},
            "backbone": ref.as_manifest(), "twotower": asdict(cfg), "conditioning_map": layer_map}
