"""OLMo 2 adapter: no input norms; each sublayer normalises its *output* (`post_attention_layernorm`,
`post_feedforward_layernorm`) before the residual add, and q/k RMSNorms run over all heads'
concatenated projections (before the split into heads and RoPE), unlike Qwen3's per-head norms.

Without an input norm the sublayer's `norm` is the identity, so AdaLN modulates the residual stream
itself (`norm(h)·(1+scale)+shift` with `norm` = identity); at zero init it is still the identity.

OLMo 3 (`adapters/olmo3.py`) walks the same way: the window is each attention module's own (None
here, where the module has none), and `cos_sin` is the one hook it overrides (a table per layer type).
"""
from __future__ import annotations

from torch import nn

from adapters.base import Sublayer, apply_rotary_pos_emb
from adapters.llama import LlamaFamilyAdapter, attention_window
from adapters.rotary import rotary

IDENTITY = nn.Identity()
"""The input `norm` of every OLMo 2 sublayer (one shared, parameter-free module)."""


class Olmo2Adapter(LlamaFamilyAdapter):
    """Layer walk of `Olmo2ForCausalLM`."""

    model_types = ("olmo2",)
    exact_position_rope = True

    def sublayers(self, model):
        subs: list[Sublayer] = []
        for i, layer in enumerate(model.model.layers):
            subs.append(Sublayer(len(subs), i, "attention", IDENTITY, layer.self_attn,
                                 window=attention_window(model, layer.self_attn),
                                 post_norm=layer.post_attention_layernorm))
            subs.append(Sublayer(len(subs), i, "mlp", IDENTITY, layer.mlp, post_norm=layer.post_feedforward_layernorm))
        return subs

    def qkv(self, model, sub, x, positions):
        attn = sub.mixer
        shape = (*x.shape[:-1], -1, attn.head_dim)
        q = attn.q_norm(attn.q_proj(x)).view(shape).transpose(1, 2)  # over all heads, then split
        k = attn.k_norm(attn.k_proj(x)).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = self.cos_sin(model, attn, x, positions)
        return (*apply_rotary_pos_emb(q, k, cos, sin), v)

    def cos_sin(self, model, attn, x, positions):
        """RoPE cos/sin for attention module `attn` (one table for every layer here)."""
        return rotary(model, x, positions)
