"""A randomly initialised backbone built from a recipe's own architecture, shrunk (`backbone.random_init`).

Why: a recipe sized for a cluster (the Nemotron-3-Nano's 31.6 B parameters per tower) cannot be
loaded here, but everything about it except the widths can be exercised: the same config file
(`recipes/backbones/`, found by `backbone.name_or_path` as `plan` finds it), the same layer pattern
and layer kinds, the same adapter and conditioning code. `random_init` names the config fields to
override (widths, expert counts); the vocabulary becomes the data's tokenizer's so the model reads the
data's token ids. The model is built with the run's seed, saved with that tokenizer into
`cache_root/<key>/` (atomically: a temporary directory renamed into place), and loaded from there
like any local checkpoint.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from stages.backbones.built_once import build_once

MARKER = "random_init.json"


def shrunk_config(name_or_path: str, overrides: dict[str, Any], vocab_size: int):
    """The backbone's config (`stages.backbones.backbone_configs`: local or shipped) with
    `overrides` applied and the vocabulary set to `vocab_size`. ValueError naming the key for a
    field the config does not have."""
    from stages.backbones.backbone_configs import load_backbone_config

    config = load_backbone_config(name_or_path)
    unknown = sorted(k for k in overrides if not hasattr(config, k))
    if unknown:
        raise ValueError(f"backbone.random_init: {unknown} are not fields of {name_or_path}'s "
                         f"{type(config).__name__}")
    for key, value in {**overrides, "vocab_size": vocab_size}.items():
        setattr(config, key, value)
    return config


def materialise(name_or_path: str, overrides: dict[str, Any], tokenizer_dir: str, cache_root: Path,
                seed: int, dtype: str = "float32") -> str:
    """The directory of the random backbone (built once per config, tokenizer, seed and dtype)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = shrunk_config(name_or_path, overrides, len(tokenizer))
    spec = json.dumps({"config": config.to_dict(), "tokenizer": str(tokenizer_dir), "seed": seed,
                       "dtype": dtype}, sort_keys=True, default=str)
    final = Path(cache_root) / f"random-{hashlib.sha256(spec.encode()).hexdigest()[:16]}"

    def build(tmp: Path) -> str:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        return json.dumps({"name_or_path": name_or_path, "overrides": overrides, "seed": seed}, indent=1)

    return build_once(final, MARKER, build)
