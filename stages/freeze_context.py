"""Stage `freeze_context`: fix the trainable set and verify it before any training.

The context tower is the backbone itself, frozen (it must stay bit-identical: invariant 1); the
denoiser tower is a copy whose every parameter trains (`copy.deepcopy` of a frozen module keeps
`requires_grad=False`, a known trap, so this is checked rather than assumed). The stage builds the
two-tower model with the runtime's defaults, checks both sides and that the context tower equals the
backbone bit for bit, and records the counts per parameter group. Reads the `backbone` section.
"""
from __future__ import annotations

import json
from pathlib import Path

from stages.api import StageContext
from stages.backbones.loading import BackboneRef, load_backbone
from stages.duplicate_backbone import Config  # the shared `backbone` section

SECTION = "backbone"
REQUIRES = ("duplicate_backbone",)
__all__ = ["SECTION", "Config", "run", "trainable_report"]


def _group(name: str) -> str:
    """A parameter's group for the report: its first two name components (`denoiser.model`)."""
    return ".".join(name.split(".")[:2])


def trainable_report(model) -> dict:
    """Count trainable/frozen parameters per tower and group; list violations of the contract.

    Contract: every `context_tower.*` parameter frozen, every `denoiser.*` parameter trainable.
    """
    trainable = frozen = 0
    groups: dict[str, dict[str, int]] = {}
    bad: list[str] = []
    for name, p in model.named_parameters():
        g = groups.setdefault(_group(name), {"trainable": 0, "frozen": 0})
        key = "trainable" if p.requires_grad else "frozen"
        g[key] += p.numel()
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
        if name.startswith("context_tower.") and p.requires_grad:
            bad.append(f"{name} (context tower, trainable)")
        if name.startswith("denoiser.") and not p.requires_grad:
            bad.append(f"{name} (denoiser, frozen)")
    return {"trainable": trainable, "frozen": frozen, "groups": groups, "violations": bad}


def run(cfg: Config, inputs: dict[str, dict], ctx: StageContext) -> dict:
    """Build the two towers, verify the trainable set and the context tower's identity."""
    from twotower import TwoTowerConfig, TwoTowerForDiffusionLM, checks

    up = inputs["duplicate_backbone"]
    ref = BackboneRef.of(up, "duplicate_backbone")
    path = ref.model
    backbone, _ = load_backbone(path, ref.dtype)
    model = TwoTowerForDiffusionLM.from_backbone(backbone, TwoTowerConfig())
    report = trainable_report(model)
    if report["violations"]:
        raise ValueError("trainable set violates the contract: " + ", ".join(report["violations"][:10]))
    if report["trainable"] == 0:
        raise ValueError("no trainable parameters in the denoiser tower")
    identical = bool(checks.context_matches(model, backbone))
    if not identical:
        raise ValueError(f"context tower differs from the backbone {path}")
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trainable_set.json").write_text(json.dumps(report, indent=1))
    metrics = {"params_trainable": report["trainable"], "params_frozen": report["frozen"],
               "context_matches_backbone": 1.0,
               "trainable_fraction": report["trainable"] / (report["trainable"] + report["frozen"])}
    ctx.log_artifact(out / "trainable_set.json")
    return {"metrics": metrics,
            "artifacts": {"trainable_set": ctx.artifact_path("trainable_set.json")},
            "backbone": ref.as_manifest(), "trainable_groups": report["groups"], "layer_map": up.get("layer_map")}
