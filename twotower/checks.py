"""Checks the pipeline stages run on a built model (attach_conditioning, freeze_context).

zero_init_identity: with every new module at its zero init, the denoiser's forward computes the
backbone's logits (invariant 4), checked on the real forward, never a copy of it.
context_matches: the context tower is bit-identical to a reference backbone (invariant 1).
kept_layers_match: a shallow denoiser's kept layers (and embedding, final norm, LM head) start
bit-identical to the backbone's (`denoiser_layers`); there is no backbone computation a shallow
denoiser equals at init, so this is what replaces the zero-init identity below full depth.
"""
from __future__ import annotations

import torch

from twotower.block_context import TrainingContext
from twotower.cache import TowerCache
from twotower.walk import context_forward


@torch.no_grad()
def zero_init_identity(model, input_ids: torch.Tensor, t: float = 0.5) -> float:
    """Max |Δ logits| between the denoiser's own forward and the context tower on `input_ids` `[b, T]`.

    Every position is denoised as a clean one-token block through a `TrainingContext` over the
    clean context pass: it sees the keys before it and itself, and Mamba-2 is seeded with the
    state before it, which is exactly the causal prefix the context tower sees. So with AdaLN,
    gates, cross-attention, block positions and context-key offsets at their zero init the
    denoiser's real forward (`DenoiserTower.forward`, the one training and decoding run) must
    give the context tower's logits, up to float rounding of the two key layouts.

    Ablations that hide the context from every mixer (`attention_conditioning=none`,
    `mamba_conditioning=zero_state`) compare with the context tower run on each token alone;
    hiding it from one kind but not the other leaves no backbone computation to compare with."""
    den, walk, cfg = model.denoiser, model.context_walk, model.tt_config
    kinds = {sub.kind for sub in walk.subs}
    sees_context = ({cfg.attention_conditioning != "none"} if "attention" in kinds else set()) | (
        {cfg.mamba_conditioning == "seeded_state"} if "mamba" in kinds else set())
    if len(sees_context) == 2:
        raise ValueError(f"zero_init_identity: attention_conditioning={cfg.attention_conditioning!r} with "
                         f"mamba_conditioning={cfg.mamba_conditioning!r} hides the context from one layer kind "
                         "only; no backbone computation equals that denoiser")
    ctx_dev = next(model.context_tower.parameters()).device
    dev = next(den.parameters()).device
    ids = input_ids.to(ctx_dev)
    b, T = ids.shape
    record: dict = {}
    hidden, cache = context_forward(walk, ids, TowerCache.empty(b, ctx_dev), chunk=1, record=record,
                                    **model.context_options())
    reference = walk.logits(hidden).to(dev)
    if sees_context == {False}:  # each one-token block sees only itself
        alone, _ = context_forward(walk, ids.reshape(b * T, 1), TowerCache.empty(b * T, ctx_dev), chunk=1)
        reference = walk.logits(alone).view(b, T, -1).to(dev)
    if ctx_dev != dev:
        cache = cache.to(dev)
        record = {k: {i: x.to(dev) for i, x in v.items()} for k, v in record.items()}
    ctx = TrainingContext(cache, record, cfg, b, T, block_len=1)
    clean = torch.zeros(b * T, 1, dtype=torch.bool, device=dev)
    logits = den(ids.to(dev).reshape(b * T, 1), clean, torch.full((b * T,), t, device=dev),
                 cache.positions.reshape(b * T, 1), ctx)
    return (logits.view(b, T, -1) - reference).abs().max().item()


@torch.no_grad()
def context_matches(model, backbone) -> bool:
    """True when every context-tower tensor equals the backbone's, bit for bit."""
    mine = model.context_tower.state_dict()
    ref = backbone.state_dict()
    if mine.keys() != ref.keys():
        return False
    return all(torch.equal(mine[k].cpu(), ref[k].cpu()) for k in ref)


@torch.no_grad()
def kept_layers_match(model, backbone) -> list[str]:
    """The denoiser-backbone tensors that differ from the backbone's tensor of the same name (empty
    when every kept layer, the embedding, final norm and LM head start as the backbone's), plus the
    name of any denoiser-backbone tensor the backbone lacks."""
    ref = backbone.state_dict()
    bad = []
    for name, value in model.denoiser.backbone.state_dict().items():
        if name not in ref or not torch.equal(value.cpu(), ref[name].cpu()):
            bad.append(name)
    return bad
