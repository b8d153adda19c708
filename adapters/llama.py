"""Llama-family adapter: `llama`, `qwen2`, `qwen3`, `mistral` (RoPE, GQA, optional q/k norms).

A decoder layer is two sublayers: `h + self_attn(input_layernorm(h))` then
`h + mlp(post_attention_layernorm(h))`. RoPE comes from the model's shared `rotary_emb` at the
positions the runtime passes (per sequence, so left padding keeps positions exact). Qwen3's
per-head q/k RMSNorms are applied before RoPE, as in HF. Sliding windows are not applied: keep
sequences shorter than `config.sliding_window`.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from adapters.base import Mamba2Params, Sublayer


class LlamaFamilyAdapter:
    """Layer walk of `LlamaForCausalLM` and its close relatives."""

    model_types = ("llama", "qwen2", "qwen3", "mistral")

    def sublayers(self, model: nn.Module) -> list[Sublayer]:
        subs: list[Sublayer] = []
        for i, layer in enumerate(model.model.layers):
            subs.append(Sublayer(len(subs), i, "attention", layer.input_layernorm, layer.self_attn))
            subs.append(Sublayer(len(subs), i, "mlp", layer.post_attention_layernorm, layer.mlp))
        return subs

    def embed(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return model.model.embed_tokens(input_ids)

    def embedding_weight(self, model: nn.Module) -> torch.Tensor:
        return model.model.embed_tokens.weight

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.norm

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    def qkv(self, model, sub, x, positions):
        attn = sub.mixer
        shape = (*x.shape[:-1], -1, attn.head_dim)
        q, k = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape)
        if hasattr(attn, "q_norm"):  # qwen3: RMSNorm over each head before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = model.model.rotary_emb(x, positions)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def attn_scale(self, sub: Sublayer) -> float:
        return sub.mixer.scaling

    def attn_out(self, sub: Sublayer, o: torch.Tensor) -> torch.Tensor:
        return sub.mixer.o_proj(o)

    def mamba(self, sub: Sublayer) -> Mamba2Params:
        raise ValueError(f"sublayer {sub.index}: the Llama family has no Mamba-2 layers")

    def ffn(self, sub: Sublayer, x: torch.Tensor) -> torch.Tensor:
        return sub.mixer(x)

    def max_positions(self, config) -> int | None:
        return getattr(config, "max_position_embeddings", None)
