"""`TwoTowerHFConfig`: the `config.json` of a saved two-tower model (`model_type: twotower`).

Kept apart from `twotower.config` because it subclasses transformers' `PretrainedConfig`, and
importing transformers costs seconds that config validation must not pay.
"""
from __future__ import annotations

from transformers import PretrainedConfig

from twotower.config import TwoTowerConfig


class TwoTowerHFConfig(PretrainedConfig):
    """The `config.json` of a saved two-tower model: our fields plus the nested backbone config."""

    model_type = "twotower"

    def __init__(self, twotower: dict | None = None, backbone: dict | None = None, **kwargs):
        self.twotower = dict(twotower or {})
        self.backbone = dict(backbone or {})
        super().__init__(**kwargs)

    def twotower_config(self) -> TwoTowerConfig:
        return TwoTowerConfig.from_dict(self.twotower)

    def backbone_config(self) -> PretrainedConfig:
        from transformers import AutoConfig

        data = dict(self.backbone)
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise ValueError("twotower config.json: `backbone` has no model_type")
        return AutoConfig.for_model(model_type, **data)
