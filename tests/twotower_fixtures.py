"""Tiny random backbones for the twotower/adapters tests (no network, seconds on CPU).

`TINY_CONFIGS` is the conformance kit's parameter list: a new adapter joins every invariant test
by adding one entry here (its model_type must be in `adapters.REGISTRY`).
"""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, NemotronHConfig, Qwen2Config, Qwen3Config

VOCAB = 48
EOS = 2
PAD = 0


def nemotron_h_config() -> NemotronHConfig:
    """Every Nemotron-H layer kind: mamba, attention, moe, mlp (and mamba again after attention)."""
    return NemotronHConfig(
        vocab_size=VOCAB, hidden_size=32, layers_block_type=["mamba", "attention", "moe", "mamba", "mlp"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64,
        mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=2, conv_kernel=4, chunk_size=16,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=32, max_position_embeddings=256,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, tie_word_embeddings=False,
        initializer_range=0.2,  # large weights: Mamba states and every path visibly matter
    )


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, tie_word_embeddings=True,
        initializer_range=0.2,  # large weights: Mamba states and every path visibly matter
    )


def qwen3_config() -> Qwen3Config:
    return Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, tie_word_embeddings=False,
        initializer_range=0.2,  # large weights: Mamba states and every path visibly matter
    )


def qwen2_config() -> Qwen2Config:
    """Qwen2: biases on q/k/v."""
    return Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, tie_word_embeddings=False,
        initializer_range=0.2,
    )


def mistral_config() -> MistralConfig:
    return MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256, sliding_window=None,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, tie_word_embeddings=False,
        initializer_range=0.2,
    )


TINY_CONFIGS = {
    "nemotron_h": nemotron_h_config,
    "llama": llama_config,
    "qwen3": qwen3_config,
    "qwen2": qwen2_config,
    "mistral": mistral_config,
}


def tiny_backbone(name: str, seed: int = 0, scale: float = 1.0):
    """A random tiny `*ForCausalLM` in float32 eval mode. scale>1 sharpens its logits so greedy
    choices are well separated (no near-ties between code paths)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[name]())
    model.float().eval()
    if scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)
    return model


def tiny_twotower(name: str, block_size: int = 4, seed: int = 0, perturb: float = 0.0, **cfg):
    """A two-tower model on `tiny_backbone(name)`. perturb>0 fills every new (zero-init) module
    with noise of that scale so AdaLN, gates and position embeddings all act in the test."""
    from twotower import TwoTowerConfig, TwoTowerForDiffusionLM

    backbone = tiny_backbone(name, seed=seed, scale=1.0)
    model = TwoTowerForDiffusionLM.from_backbone(backbone, TwoTowerConfig(block_size=block_size, **cfg))
    if perturb:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname in model.new_parameter_names():
                    p.add_(torch.randn(p.shape, generator=gen) * perturb)
    return model.eval()
