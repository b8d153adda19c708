"""The two-tower block-diffusion runtime (no Ray, MLflow or pipeline imports).

    from twotower import TwoTowerConfig, TwoTowerForDiffusionLM, place_towers_on_devices
"""
from twotower.config import TwoTowerConfig, TwoTowerHFConfig
from twotower.model import TwoTowerForDiffusionLM, TwoTowerOutput
from twotower.generate import GenerateOutput
from twotower.devices import place_towers_on_devices

__all__ = [
    "GenerateOutput",
    "TwoTowerConfig",
    "TwoTowerForDiffusionLM",
    "TwoTowerHFConfig",
    "TwoTowerOutput",
    "place_towers_on_devices",
]
