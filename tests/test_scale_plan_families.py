"""`python -m pipeline plan` on the shipped full-size configs (Granite-4.0-H-style, Gemma 3 1B, Phi-2,
Phi-3-mini, OLMo 2 7B, Falcon-H1 0.5B): parameters, active parameters and memory match a count made
here independently on the meta device (within 1%).

The independent count reads the family's own config fields and module names, which is exactly what
`twotower.sizing` may not do (it asks the adapter), so the two agree only if the adapter's facts
are right.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from planning.estimate import SHIPPED_BACKBONES, config_from_json

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


def within(value: float, expected: float, rel: float = 0.01) -> bool:
    return abs(value - expected) <= rel * abs(expected)


def independent_count(config) -> dict:
    """Totals, active parameters and bf16 decode memory from the config and module names."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = {id(p): (n, p.numel()) for n, p in model.named_parameters()}
    total = sum(n for _, n in params.values())
    if config.model_type == "granitemoehybrid":
        routed = sum(n for name, n in params.values() if ".block_sparse_moe.experts." in name)
        active = total - routed + routed * config.num_experts_per_tok // config.num_local_experts
        n_attn = config.layers_block_type.count("full_attention")
        kv_per_token = n_attn * 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
        n_mamba = config.layers_block_type.count("linear_attention")
        inner = config.mamba_n_heads * config.mamba_d_head
        states = n_mamba * (inner * config.mamba_d_state * 4
                            + (inner + 2 * config.mamba_n_groups * config.mamba_d_state)
                            * (config.mamba_d_conv - 1) * 2)
    elif config.model_type == "falcon_h1":  # attention AND Mamba-2 side by side in every layer
        active = total
        head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
        kv_per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim
        inner = config.mamba_n_heads * config.mamba_d_head
        assert inner == (config.mamba_d_ssm or config.mamba_expand * config.hidden_size)
        states = config.num_hidden_layers * (inner * config.mamba_d_state * 4
                                             + (inner + 2 * config.mamba_n_groups * config.mamba_d_state)
                                             * (config.mamba_d_conv - 1) * 2)
        mixers = {name.split(".")[3] for name, _ in params.values() if ".layers.0." in name}
        assert {"self_attn", "mamba"} <= mixers, mixers  # both mixers hold parameters in layer 0
    else:  # dense, every layer attention (Gemma 3's sliding layers keep every key too)
        active = total
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim
        states = 0
    return {"total": total, "active": active, "kv_bytes_per_token": kv_per_token * 2, "state_bytes": states}


CASES = {
    "granite_4_h_small": "granite-4.0-h-small-style.json",
    "gemma3_1b": "gemma-3-1b-pt-style.json",
    "phi2": "phi-2.json",
    "phi3_mini": "phi-3-mini-4k-instruct.json",
    "olmo2_7b": "olmo-2-1124-7b.json",
    "falcon_h1_0_5b": "falcon-h1-0.5b-base.json",
}
PUBLISHED_TOTALS = {  # parameters of the published checkpoints the shipped configs copy
    "phi2": 2_779_683_840, "phi3_mini": 3_821_079_552, "olmo2_7b": 7_298_617_344,
    "falcon_h1_0_5b": 521_411_104, "gemma3_1b": 999_885_952,
}


@pytest.mark.parametrize("recipe", sorted(CASES))
def test_plan_matches_an_independent_meta_count(recipe, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RUN_ROOT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "plan", f"recipes/{recipe}.yaml", "--json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    est = json.loads(proc.stdout)["estimate"]
    ref = independent_count(config_from_json(SHIPPED_BACKBONES / CASES[recipe]))
    ctx = est["params"]["context_tower"]
    assert within(ctx["total"], ref["total"]) and within(ctx["active"], ref["active"])
    if recipe in PUBLISHED_TOTALS:
        assert ctx["total"] == PUBLISHED_TOTALS[recipe]
    dec = est["decode_memory"]["batch_1"]
    assert within(dec["diffusion"]["context_weights_gib"], ref["total"] * 2 / GIB)
    context_len = dec["context_len"]
    expected_ar = (ref["total"] * 2 + ref["kv_bytes_per_token"] * context_len + ref["state_bytes"]) / GIB
    assert within(dec["ar_only"]["device_gib"], expected_ar)
    if ref["state_bytes"]:
        assert within(dec["mamba_state_gib"], ref["state_bytes"] / GIB)
    assert within(dec["kv_cache_gib"], ref["kv_bytes_per_token"] * context_len / GIB)


def test_granite_facts_count_its_moe_and_mamba_layers():
    """Granite's field names differ from Nemotron-H's (mamba_n_heads, num_local_experts): the
    facts come from the adapter, so its MoE and Mamba layers are all counted."""
    from twotower import sizing

    model = sizing.build_on_meta(config_from_json(SHIPPED_BACKBONES / CASES["granite_4_h_small"]))
    facts = sizing.family_facts(model)
    assert sizing.layer_kinds(facts) == {"attention": 4, "mamba": 36, "moe": 40, "mlp": 0}
    assert facts.experts == (72, 10) and facts.num_layers == 40
    counts = sizing.count_parameters(model, facts)
    assert 0.25 < counts.active / counts.total < 0.3  # ~9 B of ~32 B


def test_falcon_h1_counts_both_parallel_mixers_of_every_layer():
    """Falcon-H1 runs attention and Mamba-2 on the same input in every layer: each layer holds a
    K/V cache and a Mamba-2 state, and the facts count both (36 of each in the 0.5B)."""
    from planning import memory
    from twotower import sizing

    config = config_from_json(SHIPPED_BACKBONES / CASES["falcon_h1_0_5b"])
    facts = sizing.family_facts(sizing.build_on_meta(config))
    assert sizing.layer_kinds(facts) == {"attention": 36, "mamba": 36, "moe": 0, "mlp": 36}
    assert facts.num_layers == 36
    assert memory.kv_bytes_per_token(facts) == 36 * 2 * 2 * 64 * 2  # 2 K/V heads of 64, bf16
    assert facts.ssm_state_elems == 36 * 24 * 64 * 128  # 24 heads x 64 x d_state 128, per layer


@pytest.mark.parametrize("name", ["phi", "phi3", "olmo2", "olmo3"])
def test_the_newer_dense_families_are_sized_through_their_adapters(name):
    """Phi-1/2 (parallel steps), Phi-3 (fused q/k/v), OLMo 2 (no input norms) and OLMo 3 (windowed
    layers, whose K/V count in full: windows are masks, not a trimmed cache), at their tiny fixture:
    parameters and the K/V bytes per token, as `plan` computes them through the adapter, against a
    count made here from the config and the modules (their full-size configs go through `plan` in
    `test_plan_matches_an_independent_meta_count`)."""
    from twotower_fixtures import tiny_backbone

    from planning import memory
    from twotower import sizing

    model = tiny_backbone(name)
    facts = sizing.family_facts(model)
    counts = sizing.count_parameters(model, facts)
    total = sum(p.numel() for p in model.parameters())
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert counts.total == total and counts.active == total  # dense: every parameter is active
    assert memory.kv_bytes_per_token(facts) == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 2
