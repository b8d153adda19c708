"""Tiny random backbones for the twotower/adapters tests (no network, seconds on CPU).

`TINY_CONFIGS` is the conformance kit's parameter list: a new adapter joins every invariant test
by adding one entry here (its model_type must be in `adapters.REGISTRY`). Each fixture exercises
every layer kind, window, multiplier and norm its family has, with sequences longer than its
windows; `tiny_backbone` randomises every norm weight so that a norm used in the wrong place
fails HF parity (HF initialises them all equal).
"""
from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    FalconH1Config,
    Gemma2Config,
    Gemma3TextConfig,
    GraniteMoeHybridConfig,
    LlamaConfig,
    MistralConfig,
    NemotronHConfig,
    Olmo2Config,
    Olmo3Config,
    Phi3Config,
    PhiConfig,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 48
EOS = 2
PAD = 0


WINDOW = 5
"""Sliding window of the windowed fixtures: shorter than every test sequence, longer than a block."""


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
    """Qwen3: per-head q/k norms; layer 1 slides (layers >= max_window_layers), layer 0 is global."""
    return Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, tie_word_embeddings=False,
        initializer_range=0.2,  # large weights: Mamba states and every path visibly matter
    )


def qwen2_config() -> Qwen2Config:
    """Qwen2: biases on q/k/v; layer 1 slides (layers >= max_window_layers), layer 0 is global."""
    return Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, tie_word_embeddings=False,
        initializer_range=0.2,
    )


def mistral_config() -> MistralConfig:
    return MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256, sliding_window=WINDOW,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, tie_word_embeddings=False,
        initializer_range=0.2,
    )


def gemma3_text_config() -> Gemma3TextConfig:
    """Gemma 3: a sliding layer (RoPE base 1e4) and a global one (1e6), sandwich (1+w) norms, q/k
    norms, query_pre_attn_scalar != head_dim, √d embeddings, final-logit soft-capping, tied head."""
    return Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        layer_types=["sliding_attention", "full_attention"], sliding_window=WINDOW,
        query_pre_attn_scalar=12, final_logit_softcapping=3.0,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, tie_word_embeddings=True,
        initializer_range=0.2,
    )


def gemma2_config() -> Gemma2Config:
    """Gemma 2: as Gemma 3 without q/k norms and with attention-score soft-capping (eager in HF)."""
    return Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        layer_types=["sliding_attention", "full_attention"], sliding_window=WINDOW,
        query_pre_attn_scalar=12, attn_logit_softcapping=1.5, final_logit_softcapping=3.0,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, tie_word_embeddings=True,
        initializer_range=0.2, attn_implementation="eager",
    )


def granitemoehybrid_config(rope: bool = True) -> GraniteMoeHybridConfig:
    """Granite-4.0-H: Mamba-2 and attention layers, each with MoE + shared MLP, and the four
    multipliers away from 1 (embedding, residual, attention scale, logit scaling)."""
    return GraniteMoeHybridConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, shared_intermediate_size=48,
        layer_types=["mamba", "attention", "mamba"], num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        num_local_experts=4, num_experts_per_tok=2,
        mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=2, mamba_d_conv=4, mamba_expand=2,
        mamba_chunk_size=16, position_embedding_type="rope" if rope else None,
        embedding_multiplier=3.0, residual_multiplier=0.6, attention_multiplier=0.3, logits_scaling=2.5,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, tie_word_embeddings=False,
        initializer_range=0.2,
    )


def granitemoehybrid_nope_config() -> GraniteMoeHybridConfig:
    """Granite-4.0-H as shipped: attention without RoPE."""
    return granitemoehybrid_config(rope=False)


def phi3_config() -> Phi3Config:
    """Phi-3: fused qkv and gate_up projections, half the head dims rotary, a sliding window."""
    return Phi3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        sliding_window=WINDOW, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, tie_word_embeddings=False,
        initializer_range=0.2,
    )


def phi_config(qk_layernorm: bool = True) -> PhiConfig:
    """Phi-2: parallel attention and MLP on one LayerNorm, partial rotary, q/k LayerNorms, biases."""
    return PhiConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        qk_layernorm=qk_layernorm, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS,
        tie_word_embeddings=False, initializer_range=0.2,
    )


def falcon_h1_config(rms_norm: bool = True) -> FalconH1Config:
    """Falcon-H1: Mamba-2 and attention in parallel on one norm, then an MLP; every µP multiplier
    away from 1 (the Mamba-2 ones through its mup_vector) and a finite dt ceiling."""
    return FalconH1Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_n_groups=2, mamba_d_conv=4,
        mamba_chunk_size=16, mamba_rms_norm=rms_norm, time_step_limit=(0.0, 2.0),
        attention_in_multiplier=0.7, attention_out_multiplier=1.3, key_multiplier=0.8,
        ssm_in_multiplier=1.2, ssm_out_multiplier=0.6, ssm_multipliers=[0.9, 1.1, 0.8, 1.2, 0.7],
        mlp_multipliers=[1.1, 0.9], embedding_multiplier=2.0, lm_head_multiplier=0.5,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, tie_word_embeddings=False, initializer_range=0.2,
    )


def falcon_h1_gated_config() -> FalconH1Config:
    """Falcon-H1 as shipped: no RMSNorm in the Mamba-2 output, a plain SiLU gate."""
    return falcon_h1_config(rms_norm=False)


def olmo2_config() -> Olmo2Config:
    """OLMo 2: no input norms, post-norms after attention and MLP, q/k norms over all heads."""
    return Olmo2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, tie_word_embeddings=False,
        initializer_range=0.2,
    )


def olmo3_config() -> Olmo3Config:
    """OLMo 3: OLMo 2 with sliding and full-attention layers (windows of WINDOW) and a RoPE table per
    layer type: base 1e4 on the sliding layers, YaRN (base 5e5) on the full ones, as OLMo 3 ships."""
    return Olmo3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=WINDOW,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0,
                                            "original_max_position_embeddings": 32}},
        pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, tie_word_embeddings=False,
        initializer_range=0.2,
    )


TINY_CONFIGS = {
    "nemotron_h": nemotron_h_config,
    "llama": llama_config,
    "qwen3": qwen3_config,
    "qwen2": qwen2_config,
    "mistral": mistral_config,
    "gemma3_text": gemma3_text_config,
    "gemma2": gemma2_config,
    "granitemoehybrid": granitemoehybrid_config,
    "granitemoehybrid_nope": granitemoehybrid_nope_config,
    "phi": phi_config,
    "phi3": phi3_config,
    "olmo2": olmo2_config,
    "olmo3": olmo3_config,
    "falcon_h1": falcon_h1_config,
    "falcon_h1_gated": falcon_h1_gated_config,
}


@torch.no_grad()
def randomise_norms(model, seed: int = 0, std: float = 0.3) -> None:
    """Add noise to every norm weight (HF starts them all at ones or zeros, so a norm used in
    the wrong sublayer would still match the HF forward)."""
    gen = torch.Generator().manual_seed(seed + 7)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if "norm" in type(module).__name__.lower() and isinstance(weight, torch.nn.Parameter):
            weight.add_(torch.randn(weight.shape, generator=gen) * std)


def tiny_backbone(name: str, seed: int = 0, scale: float = 1.0):
    """A random tiny `*ForCausalLM` in float32 eval mode. scale>1 sharpens its logits so greedy
    choices are well separated (no near-ties between code paths)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[name]())
    model.float().eval()
    randomise_norms(model, seed)
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


SWITCH = 16
"""Where the length-dependent RoPE fixtures change table: `original_max_position_embeddings` of
`phi3_longrope_config`, `max_position_embeddings` of `llama_dynamic_config` (tests cross it)."""


def phi3_longrope_config() -> Phi3Config:
    """Phi-3.5-style `longrope`: short and long factors far apart, switching after SWITCH tokens.
    No EOS, so generation runs its whole budget across the switch."""
    return Phi3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4 * SWITCH,
        original_max_position_embeddings=SWITCH,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "short_factor": [1.0, 1.3], "long_factor": [3.0, 7.0],
                         "original_max_position_embeddings": SWITCH},
        pad_token_id=PAD, bos_token_id=1, eos_token_id=None, tie_word_embeddings=False, initializer_range=0.2,
    )


def llama_dynamic_config() -> LlamaConfig:
    """Llama with `dynamic` NTK scaling past SWITCH positions (no EOS, as above)."""
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SWITCH,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 100.0, "factor": 4.0},
        pad_token_id=PAD, bos_token_id=1, eos_token_id=None, tie_word_embeddings=True, initializer_range=0.2,
    )


ROPE_CONFIGS = {"phi3_longrope": phi3_longrope_config, "llama_dynamic": llama_dynamic_config}
"""Length-dependent RoPE fixtures (not in TINY_CONFIGS: `tests/test_rope_scaling.py` runs them)."""


def rope_backbone(name: str, seed: int = 0, qk_scale: float = 3.0, **overrides):
    """A fresh random `ROPE_CONFIGS[name]` model (transformers' rotary modules keep state between
    calls: compare against a freshly built one); `overrides` replace config attributes. qk_scale
    sharpens attention (query and key weights multiplied), so the rotary table visibly changes
    greedy tokens: without it, skipping the switch entirely still matches on these prompts."""
    torch.manual_seed(seed)
    config = ROPE_CONFIGS[name]()
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config)
    model.float().eval()
    randomise_norms(model, seed)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            if hasattr(attn, "qkv_proj"):  # Phi-3: q and k are the first rows of the fused projection
                qk = (config.num_attention_heads + config.num_key_value_heads) * attn.head_dim
                attn.qkv_proj.weight[:qk] *= qk_scale
            else:
                attn.q_proj.weight *= qk_scale
                attn.k_proj.weight *= qk_scale
    return model
