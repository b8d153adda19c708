"""Llama-family adapter: `llama`, `qwen2`, `qwen3`, `mistral` (RoPE, GQA, optional q/k norms,
optional sliding windows).

A decoder layer is two sublayers: `h + self_attn(input_layernorm(h))` then
`h + mlp(post_attention_layernorm(h))`. RoPE comes from the model's shared `rotary_emb` at the
positions the runtime passes (per sequence, so left padding keeps positions exact), through
`adapters.rotary.rotary` (exact for the length-dependent `longrope` and `dynamic` scalings too). Qwen3's
per-head q/k RMSNorms are applied before RoPE, as in HF. Sliding windows: Qwen2/Qwen3 attention
modules carry their own (`sliding_window`, None on full-attention layers); Mistral applies
`config.sliding_window` to every layer.
"""
from __future__ import annotations

from torch import nn

from adapters.base import Adapter, Sublayer, apply_rotary_pos_emb, project_qkv
from adapters.rotary import rotary


def attention_window(model: nn.Module, attn: nn.Module) -> int | None:
    """The layer's sliding window as HF applies it: the module's own, else the config's."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(model.config, "sliding_window", None)


class LlamaFamilyAdapter(Adapter):
    """Layer walk of `LlamaForCausalLM` and its close relatives."""

    model_types = ("llama", "qwen2", "qwen3", "mistral")
    exact_position_rope = True

    def sublayers(self, model: nn.Module) -> list[Sublayer]:
        subs: list[Sublayer] = []
        for i, layer in enumerate(model.model.layers):
            window = attention_window(model, layer.self_attn)
            subs.append(Sublayer(len(subs), i, "attention", layer.input_layernorm, layer.self_attn, window=window))
            subs.append(Sublayer(len(subs), i, "mlp", layer.post_attention_layernorm, layer.mlp))
        return subs

    def qkv(self, model, sub, x, positions):
        q, k, v = project_qkv(sub.mixer, x)  # qwen3: per-head RMSNorms before RoPE
        cos, sin = rotary(model, x, positions)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v
