"""Falcon-H1 adapter: Mamba-2 and attention **in parallel** on one normed input, then an MLP, with
µP multipliers everywhere.

A decoder layer is `h + ssm_out·mamba(ssm_in·n(h)) + attn_out·attn(attn_in·n(h))`, then
`h + mlp(n_ff(h))`: the attention sublayer is declared `parallel=True` beside the Mamba-2 one
(`adapters.base.Sublayer.parallel`), each output multiplier is its sublayer's `residual_scale`, and
the input multipliers live where transformers applies them: `attention_in_multiplier` on the
attention's input and `key_multiplier` on its keys (in `qkv`), `ssm_in_multiplier` and the
`mup_vector` around the Mamba-2 input projection (a callable `Mamba2Params.in_proj`). The MLP's
gate/down multipliers are inside its module, which `ffn` calls whole. The embedding is scaled by
`embedding_multiplier`, the logits by `lm_head_multiplier`; dt is clamped to `time_step_limit`.
"""
from __future__ import annotations

import dataclasses

import torch
from torch.nn import functional as F

from adapters.base import Adapter, Mamba2Params, Sublayer, apply_rotary_pos_emb
from adapters.nemotron_h import mamba2_params
from adapters.rotary import rotary


class FalconH1Adapter(Adapter):
    """Layer walk of `FalconH1ForCausalLM`."""

    model_types = ("falcon_h1",)
    scale_fields = ("attention_in_multiplier", "key_multiplier", "ssm_in_multiplier", "mup_vector")

    def sublayers(self, model):
        subs: list[Sublayer] = []
        for i, layer in enumerate(model.model.layers):
            subs.append(Sublayer(len(subs), i, "mamba", layer.input_layernorm, layer.mamba,
                                 residual_scale=float(layer.ssm_out_multiplier)))
            subs.append(Sublayer(len(subs), i, "attention", layer.input_layernorm, layer.self_attn,
                                 residual_scale=float(layer.attn_out_multiplier), parallel=True))
            subs.append(Sublayer(len(subs), i, "mlp", layer.pre_ff_layernorm, layer.feed_forward))
        return subs

    def final_norm(self, model):
        return model.model.final_layernorm

    def embed(self, model, input_ids):
        return model.model.embed_tokens(input_ids) * model.model.embedding_multiplier

    def embedding_scale(self, model):
        return float(model.model.embedding_multiplier)

    def logits(self, model, hidden):
        return self.lm_head(model)(hidden) * model.model.lm_head_multiplier

    def qkv(self, model, sub, x, positions):
        attn = sub.mixer
        layer = model.model.layers[sub.layer]
        x = x * layer.attention_in_multiplier
        shape = (*x.shape[:-1], -1, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2) * attn.key_multiplier
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = rotary(model, x, positions)
        return (*apply_rotary_pos_emb(q, k, cos, sin), v)

    def mamba(self, sub) -> Mamba2Params:
        m = sub.mixer

        def in_proj(h: torch.Tensor) -> torch.Tensor:
            return m.in_proj(h * m.ssm_in_multiplier) * m.mup_vector

        def gated(y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
            return y * F.silu(gate)

        # the Mamba2Mixer layout Nemotron-H and Granite share, with Falcon-H1's input scaling and gate
        return dataclasses.replace(mamba2_params(m), in_proj=in_proj, norm=m.norm if m.mamba_rms_norm else gated)
