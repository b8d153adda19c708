"""The two-tower block-diffusion runtime (no Ray, MLflow or pipeline imports).

    from twotower import TwoTowerConfig, TwoTowerForDiffusionLM, place_towers_on_devices

Names are resolved lazily (PEP 562): `from twotower import TwoTowerConfig` does not import torch
or transformers, so the pipeline can validate a recipe's `twotower` section in well under a second.

`import twotower` still registers `model_type: twotower` with transformers' Auto classes, so that
`AutoModel.from_pretrained(EXPORT)` works right after it: when transformers' Auto-model module is
already loaded the registration happens at once, otherwise the moment it is imported (an import
hook, `_AutoRegistration`), so a process that never touches transformers pays nothing.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

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


_AUTO_MODULE = "transformers.models.auto.modeling_auto"
"""Where `AutoModel` lives; our classes are registered once it has been executed."""


def _register() -> None:
    """Import `twotower.model`, whose last lines register the config and model with the Auto
    classes. Skipped while `twotower.model` is itself being imported (it registers when done)."""
    if "twotower.model" not in sys.modules:
        importlib.import_module("twotower.model")


class _AutoRegistration(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the loader of transformers' Auto-model module so that
    `_register` runs right after that module is executed, then removes itself."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _AUTO_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


if _AUTO_MODULE in sys.modules:
    _register()
elif not any(isinstance(f, _AutoRegistration) for f in sys.meta_path):
    sys.meta_path.insert(0, _AutoRegistration())
