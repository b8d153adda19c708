"""The fused context feature of `attention_conditioning=fused_kv` (after DFlash and EAGLE-3).

`ContextFusion` holds the trained parameters (a projection of several context layers' outputs and
one gate per denoiser attention sublayer); `FusedContextFeatures` is what every context forward
runs for such a denoiser (`twotower.walk.ContextFeatures`): it turns the context tower's layer
outputs and layer inputs into the keys/values the denoiser's attention reads, appended to the
cache as it grows.
"""
from __future__ import annotations

import torch
from torch import nn


class ContextFusion(nn.Module):
    """A fused feature of several context layers (DFlash, EAGLE-3) added, through a zero-init gate,
    to the input each denoiser attention sublayer makes its context keys/values from.

    The outputs of `layers` context layers at each position are concatenated `[.., k·d]`, projected
    to `[.., d]` (initialised to their mean) and RMS-normalised: `feature`. Attention sublayer i's
    context keys/values are then its own projections of `norm_i(h_i + gate_i ⊙ feature)`, h_i the
    context tower's input to layer i. With the gates at zero that is exactly the context tower's own
    layer-i keys (the layer-aligned wiring, zero-init identity kept); training opens each gate as far
    as the deep and shallow features help that layer. Keys made from the fused feature alone (DFlash's
    wiring) start from nothing a copied layer can read: on SmolLM2 they drafted worse after 300 steps
    than the layer-aligned keys (docs/results/)."""

    def __init__(self, d: int, layers: list[int], attention_subs: list[int], dtype):
        super().__init__()
        self.layers = frozenset(layers)
        k = len(layers)
        self.proj = nn.Linear(k * d, d, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(d).repeat(1, k) / k)
        self.norm_weight = nn.Parameter(torch.ones(d))
        self.gate = nn.ParameterDict({str(i): nn.Parameter(torch.zeros(d)) for i in attention_subs})
        """Per attention sublayer (by index) `[d]`; zero-init."""
        self.to(dtype)

    def feature(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        x = self.proj(torch.cat(outputs, dim=-1)).float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (x * self.norm_weight.float()).to(self.proj.weight.dtype)


class FusedContextFeatures:
    """`twotower.walk.ContextFeatures` of a `fused_kv` denoiser: each of its attention sublayers'
    context keys/values from the context tower's input to that layer plus the gated fused feature
    (its own norm and projections, its positional encoding at the context positions, no AdaLN:
    the context is clean)."""

    def __init__(self, den: nn.Module):
        """den: a `DenoiserTower` with a `fusion` (typed loosely: the tower imports this module)."""
        self.den = den
        self.layers = den.fusion.layers
        self.subs = [sub for sub in den.walk.subs if sub.kind == "attention"]
        self.inputs = frozenset(sub.index for sub in self.subs)

    def __call__(self, outputs, inputs, positions):
        den, fusion = self.den, self.den.fusion
        home = positions.device  # the context tower's: the cache keeps the keys there
        dev = fusion.proj.weight.device
        feature = fusion.feature([h.to(dev) for h in outputs])
        pos = positions.to(dev)
        out = {}
        for sub in self.subs:
            h = torch.addcmul(inputs[sub.index].to(dev), fusion.gate[str(sub.index)].to(feature.dtype), feature)
            _, k, v = den.adapter.qkv(den.backbone, sub, sub.norm(h), pos)
            out[sub.index] = (k.to(home), v.to(home))
        return out
