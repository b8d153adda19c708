"""The two-tower block-diffusion runtime (no Ray, MLflow or pipeline imports).

    from twotower import TwoTowerConfig, TwoTowerForDiffusionLM, place_towers_on_devices

Names are resolved lazily (PEP 562): `from twotower import TwoTowerConfig` does not import torch
or transformers, so the pipeline can validate a recipe's `twotower` section in well under a second.

Importing the model (`from twotower import TwoTowerForDiffusionLM`, or `import twotower.model`)
registers `model_type: twotower` with transformers' `AutoConfig` / `AutoModel` (the last lines of
`twotower/model.py`), so `AutoModel.from_pretrained(EXPORT)` works after it, while
`AutoModelForCausalLM.from_pretrained(EXPORT)` raises an error naming the lm-eval wrapper
(`twotower.hf_config.NotACausalLM`: an export is not a causal LM). A bare `import twotower`
registers nothing and imports neither torch nor transformers: there is no import hook to reason about.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "TwoTowerConfig": "twotower.config",
    "TwoTowerHFConfig": "twotower.hf_config",
    "TwoTowerForDiffusionLM": "twotower.model",
    "TwoTowerOutput": "twotower.model",
    "GenerateOutput": "twotower.generate",
    "place_towers_on_devices": "twotower.devices",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'twotower' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
