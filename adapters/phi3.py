"""Phi-3 / Phi-4-mini adapter: the Llama layer shape with a fused `qkv_proj` (and a fused
`gate_up_proj`, called through the MLP module as a whole) and partial rotary embeddings
(`partial_rotary_factor`: the rotary table covers the first dims of each head, the rest pass
through; `adapters.base.apply_rotary_pos_emb` handles it). Sliding windows come from
`config.sliding_window` on every layer, as for Mistral. `longrope` scaling (Phi-3.5, Phi-4-mini)
switches its table by sequence length: cos/sin per row from `adapters.rotary`, and the decoding
loop rebuilds the context cache at the switch as Phi-3's `generate` does (`twotower.rope_switch`).
"""
from __future__ import annotations

from adapters.base import apply_rotary_pos_emb
from adapters.llama import LlamaFamilyAdapter
from adapters.rotary import rotary


class Phi3Adapter(LlamaFamilyAdapter):
    """Layer walk of `Phi3ForCausalLM`."""

    model_types = ("phi3",)

    def qkv(self, model, sub, x, positions):
        attn = sub.mixer
        qkv = attn.qkv_proj(x)
        n_q = model.config.num_attention_heads * attn.head_dim
        n_kv = attn.num_key_value_heads * attn.head_dim
        shape = (*x.shape[:-1], -1, attn.head_dim)
        q = qkv[..., :n_q].view(shape).transpose(1, 2)
        k = qkv[..., n_q:n_q + n_kv].view(shape).transpose(1, 2)
        v = qkv[..., n_q + n_kv:].view(shape).transpose(1, 2)
        cos, sin = rotary(model, x, positions)
        return (*apply_rotary_pos_emb(q, k, cos, sin), v)
