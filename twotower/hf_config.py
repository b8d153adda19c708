"""`TwoTowerHFConfig`: the `config.json` of a saved two-tower model (`model_type: twotower`).

Kept apart from `twotower.config` because it subclasses transformers' `PretrainedConfig`, and
importing transformers costs seconds that config validation must not pay.

An export is not a causal LM: `AutoModelForCausalLM` (what lm-eval's `--model hf` loads) finds
`NotACausalLM` for this config, whose loaders raise an error naming the lm-eval wrapper
(`twotower-lm-eval`) and the call that scores the export.
"""
from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

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


def not_a_causal_lm(path: object = None) -> str:
    """The error for loading an export as a causal LM: what it is, and how lm-eval scores it."""
    where = str(path) if path is not None else "EXPORT_DIR"
    return (f"{where} is a two-tower block-diffusion export (model_type `twotower`), not a causal LM: "
            "AutoModelForCausalLM (and so lm-eval's `--model hf`) cannot load it. Score it with lm-eval "
            f"through the project's wrapper: `twotower-lm-eval --model twotower --model_args pretrained={where}"
            ",mode=diffusion,gamma=0.8 --tasks TASKS` (mode/gamma default to the export's "
            "generation_config.json); load it in Python with `TwoTowerForDiffusionLM.from_pretrained(PATH)`.")


class NotACausalLM:
    """What `AutoModelForCausalLM` finds for `model_type: twotower`: every loader raises `not_a_causal_lm`."""

    config_class = TwoTowerHFConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *args, **kwargs):
        raise ValueError(not_a_causal_lm(pretrained_model_name_or_path))

    @classmethod
    def from_config(cls, config=None, *args, **kwargs):
        raise ValueError(not_a_causal_lm(getattr(config, "_name_or_path", None) or None))

    _from_config = from_config


AutoConfig.register("twotower", TwoTowerHFConfig, exist_ok=True)  # also in twotower/model.py, with AutoModel
AutoModelForCausalLM.register(TwoTowerHFConfig, NotACausalLM, exist_ok=True)
