"""Phi-1 / Phi-1.5 / Phi-2 adapter: **parallel residual steps**. A decoder layer is
`h + attn(ln(h)) + mlp(ln(h))`: one LayerNorm feeds both mixers, whose outputs add to the same
residual. The MLP sublayer is declared `parallel=True`, so the runtime gives it the attention
sublayer's input instead of its output (`adapters.base.Sublayer.parallel`).

Attention: biased q/k/v projections, optional LayerNorms over each head's q and k
(`qk_layernorm`), partial rotary (`partial_rotary_factor`; `adapters.base.apply_rotary_pos_emb`),
the output projection named `dense`. The final norm is `final_layernorm`; the LM head has a bias.
"""
from __future__ import annotations

from adapters.base import Adapter, Sublayer, apply_rotary_pos_emb
from adapters.rotary import rotary


class PhiAdapter(Adapter):
    """Layer walk of `PhiForCausalLM`."""

    model_types = ("phi",)
    exact_position_rope = True

    def sublayers(self, model):
        subs: list[Sublayer] = []
        for i, layer in enumerate(model.model.layers):
            subs.append(Sublayer(len(subs), i, "attention", layer.input_layernorm, layer.self_attn))
            subs.append(Sublayer(len(subs), i, "mlp", layer.input_layernorm, layer.mlp, parallel=True))
        return subs

    def final_norm(self, model):
        return model.model.final_layernorm

    def qkv(self, model, sub, x, positions):
        attn = sub.mixer
        shape = (*x.shape[:-1], -1, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        if attn.qk_layernorm:
            q, k = attn.q_layernorm(q), attn.k_layernorm(k)
        cos, sin = rotary(model, x, positions)
        return (*apply_rotary_pos_emb(q, k, cos, sin), v)

    def attn_out(self, sub, o):
        return sub.mixer.dense(o)
