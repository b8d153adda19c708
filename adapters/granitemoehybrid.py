"""Granite-4.0-H adapter (`granitemoehybrid`): Mamba-2 / attention layers, each followed by a MoE
with a shared MLP (or the shared MLP alone), and four scalar multipliers.

A decoder layer is two sublayers: `h + m·mixer(input_layernorm(h))` with the mixer a Mamba-2
or an attention module (`config.layers_block_type`), then
`h + m·(moe(x) + shared_mlp(x))`, x = `post_attention_layernorm(h)` (kind `moe`; `mlp` when the
config has no experts). The multipliers: m = `residual_multiplier` on every residual branch
(`Sublayer.residual_scale`), `embedding_multiplier` on the embeddings (`embedding_scale`),
`attention_multiplier` as the softmax scale (the module's `scaling`), and logits divided by
`logits_scaling`. Attention uses RoPE only when `position_embedding_type == "rope"` (the HF
model then has a `rotary_emb`); Granite-4.0-H itself has none.
"""
from __future__ import annotations

import torch
from torch import nn

from adapters.base import Adapter, Experts, Mamba2Params, Sublayer, apply_rotary_pos_emb, project_qkv
from adapters.nemotron_h import mamba2_params
from adapters.rotary import rotary


class GraniteMoeHybridAdapter(Adapter):
    """Layer walk of `GraniteMoeHybridForCausalLM`."""

    model_types = ("granitemoehybrid",)

    def sublayers(self, model: nn.Module) -> list[Sublayer]:
        subs: list[Sublayer] = []
        for i, layer in enumerate(model.model.layers):
            m = float(layer.residual_multiplier)
            if layer.mamba is not None:
                subs.append(Sublayer(len(subs), i, "mamba", layer.input_layernorm, layer.mamba, residual_scale=m))
            else:
                subs.append(Sublayer(len(subs), i, "attention", layer.input_layernorm, layer.self_attn,
                                     residual_scale=m))
            if layer.block_sparse_moe is not None:
                subs.append(Sublayer(len(subs), i, "moe", layer.post_attention_layernorm, layer.block_sparse_moe,
                                     residual_scale=m, parts=(layer.shared_mlp,)))
            else:
                subs.append(Sublayer(len(subs), i, "mlp", layer.post_attention_layernorm, layer.shared_mlp,
                                     residual_scale=m))
        return subs

    def embed(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return model.model.embed_tokens(input_ids) * model.model.embedding_multiplier

    def embedding_scale(self, model: nn.Module) -> float:
        return float(model.model.embedding_multiplier)

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.lm_head(hidden) / model.config.logits_scaling

    def qkv(self, model, sub, x, positions):
        q, k, v = project_qkv(sub.mixer, x)
        if model.model.rotary_emb is not None:
            cos, sin = rotary(model, x, positions)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def mamba(self, sub: Sublayer) -> Mamba2Params:
        return mamba2_params(sub.mixer)

    def ffn(self, sub: Sublayer, x: torch.Tensor) -> torch.Tensor:
        out = sub.mixer(x)  # the router computes its logits in float32
        for part in sub.parts:  # the shared MLP beside the routed experts
            out = out + part(x)
        return out

    def experts(self, sub: Sublayer) -> Experts:
        moe = sub.mixer
        return Experts(moe.experts, int(moe.experts.num_experts), int(moe.router.top_k))
