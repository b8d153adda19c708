"""OLMo 3 adapter: OLMo 2 (no input norms, post-norms after attention and MLP, q/k RMSNorms over
all heads' concatenated projections) with per-layer attention types.

`config.layer_types[i]` is `sliding_attention` (a window of `config.sliding_window`, which the
attention module carries as its own `sliding_window`) or `full_attention` (None), and the rotary
module keeps one table per layer type (`rotary_emb(x, positions, layer_type)`: OLMo 3 puts its
YaRN scaling on the full-attention layers only), read through `adapters.rotary.rotary`.
"""
from __future__ import annotations

from adapters.olmo2 import Olmo2Adapter
from adapters.rotary import rotary


class Olmo3Adapter(Olmo2Adapter):
    """Layer walk of `Olmo3ForCausalLM` (the window comes from each attention module: see OLMo 2's walk)."""

    model_types = ("olmo3",)

    def cos_sin(self, model, attn, x, positions):
        return rotary(model, x, positions, attn.attention_type)  # a table per layer type
