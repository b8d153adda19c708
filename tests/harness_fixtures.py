"""A tiny real two-tower model with the project's character tokenizer, for the benchmark-harness
tests (HumanEval, lm-eval): they drive models through text, so they need a tokenizer, not bare ids.
"""
from __future__ import annotations

import torch


def tiny_char_twotower(block_size: int = 4):
    """A random 2-layer Llama backbone (hidden 32) over the character tokenizer, as a two-tower model."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from stages.data.tokenizer import build_char_tokenizer
    from twotower import TwoTowerConfig, TwoTowerForDiffusionLM

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.2)).float().eval()
    return TwoTowerForDiffusionLM.from_backbone(backbone, TwoTowerConfig(block_size=block_size)).eval(), tok
