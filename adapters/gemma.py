"""Gemma adapter: `gemma3_text` and `gemma2` (sandwich norms, sliding/global layers, √d-scaled
embeddings, final-logit soft-capping).

A decoder layer is two sublayers, each with a norm after its mixer (`post_norm`):
`h + post_attention_layernorm(self_attn(input_layernorm(h)))`, then
`h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))`. Every Gemma RMSNorm computes
`x̂·(1 + w)` (zero-init weights); the HF modules are called, never re-implemented.
- Attention: softmax scale `query_pre_attn_scalar^-0.5`; a window on the `sliding_attention`
  layers (the module's own `sliding_window`). Gemma 3 applies per-head q/k RMSNorms before RoPE
  and has one RoPE base per layer type (`rotary_emb(x, positions, layer_type)`); Gemma 2 has one
  RoPE and soft-caps the attention scores (`attn_logit_softcapping`, which HF's Gemma 3 attention
  does not pass on, so neither do we there).
- Embeddings are scaled by √d in the table's dtype (`embedding_scale`); logits are soft-capped
  by `final_logit_softcapping`; the LM head is usually tied to the embedding table.
"""
from __future__ import annotations

import torch
from torch import nn

from adapters.base import Adapter, Sublayer, apply_rotary_pos_emb, project_qkv


class GemmaAdapter(Adapter):
    """Layer walk of `Gemma3ForCausalLM` (text) and `Gemma2ForCausalLM`."""

    model_types = ("gemma3_text", "gemma2")

    def sublayers(self, model: nn.Module) -> list[Sublayer]:
        # Gemma 2 passes `attn_logit_softcapping` to its attention function; Gemma 3 does not.
        cap = model.config.attn_logit_softcapping if model.config.model_type == "gemma2" else None
        subs: list[Sublayer] = []
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            subs.append(Sublayer(len(subs), i, "attention", layer.input_layernorm, attn, window=attn.sliding_window,
                                 post_norm=layer.post_attention_layernorm, logit_softcap=cap))
            subs.append(Sublayer(len(subs), i, "mlp", layer.pre_feedforward_layernorm, layer.mlp,
                                 post_norm=layer.post_feedforward_layernorm))
        return subs

    def embedding_scale(self, model: nn.Module) -> float:
        return float(model.model.embed_tokens.scalar_embed_scale)

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        logits = model.lm_head(hidden)
        cap = model.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def qkv(self, model, sub, x, positions):
        attn = sub.mixer
        q, k, v = project_qkv(attn, x)  # gemma3: per-head (1+w) RMSNorms before RoPE
        if model.config.model_type == "gemma3_text":
            cos, sin = model.model.rotary_emb(x, positions, attn.layer_type)  # a RoPE base per layer type
        else:
            cos, sin = model.model.rotary_emb(x, positions)
        return apply_rotary_pos_emb(q, k, cos, sin) + (v,)
