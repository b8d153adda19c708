"""The one place later stages load models from: the backbone reference, the backbone, the trained model.

`duplicate_backbone` resolves which backbone the run adapts and hands it downstream as one typed
`BackboneRef` (model directory, tokenizer, dtype, sequence length) under the manifest key `backbone`;
`freeze_context`, `attach_conditioning` and `train_denoiser` forward that one entry instead of
re-forwarding four loose keys, and `calibrate_gamma`, `evaluate` and `export` rebuild the trained
model with `load_trained(train_manifest)`. The context tower is the backbone bit for bit, so only
the denoiser tower is saved by training (`save_denoiser`) and the rest is rebuilt from the backbone.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

Dtype = Literal["float32", "bfloat16", "float16"]
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per parameter for the dtypes a tower can be held in."""
MANIFEST_KEY = "backbone"


@dataclass(frozen=True)
class BackboneRef:
    """Which backbone the run adapts, as every stage after `duplicate_backbone` needs it."""

    model: str
    """Directory (or hub id) loadable with `AutoModelForCausalLM.from_pretrained`."""
    tokenizer: str
    """Directory (or hub id) of its tokenizer."""
    dtype: Dtype = "float32"
    """Dtype the towers are loaded in (`backbone.dtype`)."""
    seq_len: int | None = None
    """Packed sequence length of the data (None when no data stage is upstream)."""
    context_device: str = "auto"
    """`backbone.context_device`: where decoding stages put the context tower (`twotower.devices`)."""
    denoiser_device: str = "auto"
    """`backbone.denoiser_device`: where decoding stages put the denoiser tower."""

    def as_manifest(self) -> dict[str, Any]:
        """The plain-JSON entry stored under `manifest["backbone"]`."""
        return asdict(self)

    @classmethod
    def of(cls, manifest: dict[str, Any], stage: str) -> "BackboneRef":
        """The reference an upstream `stage` forwarded; a clear error when it did not."""
        entry = manifest.get(MANIFEST_KEY)
        if not isinstance(entry, dict) or "model" not in entry:
            raise ValueError(f"the manifest of '{stage}' has no '{MANIFEST_KEY}' reference: it must come "
                             "after duplicate_backbone in the graph")
        return cls(**{k: entry[k] for k in ("model", "tokenizer", "dtype", "seq_len", "context_device",
                                                  "denoiser_device") if k in entry})


def torch_dtype(name: str):
    """`torch.float32` etc. from the config string, with a clear error naming the key."""
    import torch

    if name not in DTYPE_BYTES:
        raise ValueError(f"backbone.dtype={name!r}: expected one of {sorted(DTYPE_BYTES)}")
    return getattr(torch, name)


def load_backbone(path: str, dtype: str = "float32"):
    """Load the causal LM backbone and its tokenizer (saved beside it) from `path`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


@dataclass
class TwoTowerFactory:
    """A picklable recipe for the model: the backbone path + the `TwoTowerConfig` fields.

    Calling it loads the backbone and wraps it with `TwoTowerForDiffusionLM.from_backbone`
    (a distributed fit calls it once on each worker).
    """

    backbone_path: str
    """Directory of the backbone (AutoModelForCausalLM)."""
    twotower: dict[str, Any]
    """Keyword arguments of `TwoTowerConfig`."""
    dtype: str = "float32"
    """Dtype the backbone is loaded in."""

    def __call__(self):
        from twotower import TwoTowerConfig, TwoTowerForDiffusionLM

        backbone, _ = load_backbone(self.backbone_path, self.dtype)
        return TwoTowerForDiffusionLM.from_backbone(backbone, TwoTowerConfig(**self.twotower))

    @classmethod
    def of(cls, backbone: BackboneRef, twotower: dict[str, Any]) -> "TwoTowerFactory":
        return cls(backbone.model, dict(twotower), backbone.dtype)


def save_denoiser(model, path: Path) -> None:
    """Write the denoiser tower's state dict (shared tensors cloned apart) as safetensors."""
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.denoiser.state_dict().items()}
    save_file(sd, str(path))


def load_trained(train_manifest: dict, context_device: str | None = None, denoiser_device: str | None = None):
    """Rebuild the trained model from a train_denoiser manifest: (model, tokenizer), eval mode, the
    towers placed per the run's `backbone.context_device` / `denoiser_device` (forwarded in the
    manifest's `BackboneRef`; `auto` resolves against the GPUs this process sees) unless given here."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from twotower.devices import place

    backbone = BackboneRef.of(train_manifest, "train_denoiser")
    weights = train_manifest["artifacts"]["denoiser"]
    model = TwoTowerFactory.of(backbone, train_manifest["twotower"])()
    missing, unexpected = model.denoiser.load_state_dict(load_file(weights), strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights}: does not match the denoiser "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    place(model, context_device or backbone.context_device, denoiser_device or backbone.denoiser_device)
    model.eval()
    return model, AutoTokenizer.from_pretrained(backbone.tokenizer)
