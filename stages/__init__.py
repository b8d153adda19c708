"""Adaptation stages: one module per stage, each exposing `SECTION`, `Config` and `run` (see api.py).

REGISTRY is the literal map from a stage name (as used in `pipeline.yaml`'s graph) to its module.
Modules are imported lazily by the engine so that `--help`, `plan` and config errors stay fast.
"""
REGISTRY: dict[str, str] = {
    "prepare_data": "stages.prepare_data",
    "pretrain_backbone": "stages.pretrain_backbone",
    "duplicate_backbone": "stages.duplicate_backbone",
    "freeze_context": "stages.freeze_context",
    "attach_conditioning": "stages.attach_conditioning",
    "train_denoiser": "stages.train_denoiser",
    "calibrate_gamma": "stages.calibrate_gamma",
    "evaluate": "stages.evaluate",
    "fidelity": "stages.fidelity",
    "export": "stages.export",
    "lm_eval": "stages.lm_eval_stage",
}
