"""Backbone adapters: one module per family, picked by the HF `config.model_type`.

    from adapters import get
    adapter = get(model)            # or get(model.config), or get("nemotron_h")
"""
from __future__ import annotations

from adapters.base import KINDS, Adapter, Experts, Mamba2Params, Sublayer, check_rope_scaling
from adapters.falcon_h1 import FalconH1Adapter
from adapters.gemma import GemmaAdapter
from adapters.granitemoehybrid import GraniteMoeHybridAdapter
from adapters.llama import LlamaFamilyAdapter
from adapters.nemotron_h import NemotronHAdapter
from adapters.olmo2 import Olmo2Adapter
from adapters.olmo3 import Olmo3Adapter
from adapters.phi import PhiAdapter
from adapters.phi3 import Phi3Adapter

# A literal registry: model_type -> adapter. A new family joins with one line here.
REGISTRY: dict[str, Adapter] = {
    "nemotron_h": NemotronHAdapter(),
    "llama": LlamaFamilyAdapter(),
    "qwen2": LlamaFamilyAdapter(),
    "qwen3": LlamaFamilyAdapter(),
    "mistral": LlamaFamilyAdapter(),
    "gemma2": GemmaAdapter(),
    "gemma3_text": GemmaAdapter(),
    "granitemoehybrid": GraniteMoeHybridAdapter(),
    "phi": PhiAdapter(),
    "phi3": Phi3Adapter(),
    "olmo2": Olmo2Adapter(),
    "olmo3": Olmo3Adapter(),
    "falcon_h1": FalconH1Adapter(),
}


def model_type_of(model_or_config) -> str:
    """`model_type` of a model, a config, or the string itself."""
    if isinstance(model_or_config, str):
        return model_or_config
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise ValueError(f"cannot read a model_type from {type(model_or_config).__name__}")
    return model_type


def get(model_or_config) -> Adapter:
    """The adapter for a model, a config or a model_type; ValueError listing supported types, or
    naming a config field the runtime cannot reproduce exactly (an unknown RoPE type, or a length-dependent
    one this family's adapter does not compute through `adapters.rotary`)."""
    model_type = model_type_of(model_or_config)
    if model_type not in REGISTRY:
        raise ValueError(
            f"unsupported backbone model_type {model_type!r}; supported: {', '.join(sorted(REGISTRY))}"
        )
    if not isinstance(model_or_config, str):
        check_rope_scaling(getattr(model_or_config, "config", model_or_config),
                           REGISTRY[model_type].exact_position_rope)
    return REGISTRY[model_type]


__all__ = ["KINDS", "REGISTRY", "Adapter", "Experts", "Mamba2Params", "Sublayer", "get", "model_type_of"]
