"""The Nemotron-3-Nano-30B-A3B plan from the shipped config alone: counts match the published ones.

Published (model card / issue 5): 31.6 B parameters in total, 3.2 B active per token without the
input embedding table (3.6 B with it), about 59 GB per tower in BF16. All built on the meta device:
no weights, no network, a few seconds on a laptop.
"""
from __future__ import annotations

import json
import time

import pytest
import torch

from planning import memory, training
from planning.estimate import SHIPPED_BACKBONES, config_from_json, estimate, load_backbone_config
from twotower import sizing

NANO = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16"
NANO_JSON = SHIPPED_BACKBONES / "nemotron-3-nano-30b-a3b.json"


def within(value: float, published: float, rel: float = 0.01) -> bool:
    return abs(value - published) <= rel * published


@pytest.fixture(scope="module")
def nano_plan() -> dict:
    started = time.perf_counter()
    plan = estimate({"backbone": {"name_or_path": NANO}, "twotower": {"block_size": 16}})
    plan["_wall_s"] = time.perf_counter() - started
    return plan


def test_shipped_config_is_the_public_one():
    config = config_from_json(NANO_JSON)
    assert config.model_type == "nemotron_h"
    assert config.hybrid_override_pattern == "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
    assert sizing.layer_kinds(sizing.family_facts(sizing.build_on_meta(config))) == {
        "attention": 6, "mamba": 23, "moe": 23, "mlp": 0}
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (
        2688, 32, 2, 128)
    assert (config.mamba_num_heads, config.mamba_head_dim, config.ssm_state_size, config.n_groups) == (64, 64, 128, 8)
    assert (config.n_routed_experts, config.num_experts_per_tok, config.moe_intermediate_size,
            config.moe_shared_expert_intermediate_size, config.routed_scaling_factor) == (128, 6, 1856, 3712, 2.5)
    assert config.vocab_size == 131072 and config.tie_word_embeddings is False
    assert config.mlp_hidden_act == "relu2"


def test_nano_counts_match_published_within_1_percent(nano_plan):
    ctx = nano_plan["params"]["context_tower"]
    assert within(ctx["total"], 31.6e9)
    assert within(ctx["active_without_embeddings"], 3.2e9)
    assert within(ctx["active"], 3.6e9)
    # The exact figures of transformers' NemotronHConfig on the meta device (issue 5).
    assert round(ctx["total"] / 1e9, 2) == 31.58
    assert round(ctx["active_without_embeddings"] / 1e9, 2) == 3.23


def test_nano_memory_per_device(nano_plan):
    dec = nano_plan["decode_memory"]["batch_1"]
    assert within(dec["diffusion"]["context_weights_gib"], 59.0)
    # The denoiser carries the new modules too, a few percent more than the backbone.
    assert dec["diffusion"]["context_weights_gib"] < dec["diffusion"]["denoiser_weights_gib"] < 80.0 * 0.9
    assert dec["diffusion"]["devices"] == 2 and dec["ar_only"]["devices"] == 1
    # Both towers never fit one 80 GB device: that is why diffusion decoding needs two.
    assert nano_plan["params"]["both_towers_total"] * 2 / memory.GIB > 80.0
    assert nano_plan["train_min_gpus"]["num_gpus"] >= 8
    by_gpus = nano_plan["train_memory_by_gpus"]
    assert by_gpus["8"] > by_gpus["16"] > by_gpus["32"] > by_gpus["64"]


def test_nano_plan_is_fast_and_json(nano_plan):
    assert nano_plan["_wall_s"] < 60
    json.dumps(nano_plan)
    assert nano_plan["new_params"]["total"] > 0
    assert nano_plan["new_params"]["total"] < 0.1 * nano_plan["params"]["context_tower"]["total"]


def test_counts_on_a_real_tiny_moe_model_by_hand():
    """The active count is exact on a tiny model whose parameters we can enumerate."""
    from transformers import AutoConfig, AutoModelForCausalLM

    data = {k: v for k, v in json.loads(NANO_JSON.read_text()).items() if not k.startswith("_")}
    data.update(hidden_size=32, vocab_size=97, hybrid_override_pattern="ME*", num_hidden_layers=3,
                n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                moe_shared_expert_intermediate_size=24, mamba_num_heads=4, mamba_head_dim=8,
                ssm_state_size=8, n_groups=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)  # real CPU weights
    counts = sizing.count_parameters(model)
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert routed == 2 * 8 * 16 * 32  # up + down, 8 experts
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.active == counts.total - routed + routed * 2 // 8
    assert counts.embeddings == 97 * 32 and counts.lm_head == 97 * 32


def test_unknown_backbone_names_the_key():
    with pytest.raises(ValueError, match="backbone.name_or_path"):
        load_backbone_config("nobody/NoSuchModel-1B")


def test_new_parameters_by_kind_classifies_names():
    backbone = torch.nn.Module()
    backbone.embed = torch.nn.Embedding(10, 4)
    backbone.proj = torch.nn.Linear(4, 4)
    denoiser = torch.nn.Module()
    denoiser.embed = torch.nn.Embedding(11, 4)  # one [MASK] row more
    denoiser.proj = torch.nn.Linear(4, 4)
    denoiser.adaln_modulation = torch.nn.Linear(4, 12)
    denoiser.cross_attn_gate = torch.nn.Parameter(torch.zeros(4))
    denoiser.mystery = torch.nn.Parameter(torch.zeros(3))
    denoiser.context_key_pos = torch.nn.Parameter(torch.zeros(2))  # twotower.context_position_keys
    out = sizing.new_parameters_by_kind(denoiser, backbone)
    assert out == {"adaln": 60, "cross_attention": 4, "embeddings": 6, "other": 3, "total": 73}


def test_training_memory_shrinks_with_gpus_and_rejects_bad_shapes():
    facts = sizing.family_facts(sizing.build_on_meta(config_from_json(NANO_JSON)))
    args = (31_000_000_000, 32_000_000_000, 1_300_000_000, facts)
    small = training.training_memory(*args, training.TrainShape(64, 1, 4096, 16))["total_gib"]
    big = training.training_memory(*args, training.TrainShape(8, 1, 4096, 16))["total_gib"]
    assert big > small
    with pytest.raises(ValueError, match="seq_len"):
        training.training_memory(*args, training.TrainShape(8, 1, 4095, 16))


def test_formula_matches_the_runtime_on_meta():
    """The config-only fallback counts what `TwoTowerForDiffusionLM` actually adds."""
    from twotower import TwoTowerConfig, TwoTowerForDiffusionLM

    config = config_from_json(NANO_JSON)
    backbone = sizing.build_on_meta(config)
    with torch.device("meta"):
        model = TwoTowerForDiffusionLM.from_backbone(backbone, TwoTowerConfig(block_size=16))
    built = sizing.new_parameters_by_kind(model.denoiser, backbone)
    assert built["other"] == 0, built  # every new parameter is classified
    assert built == memory.formula_new_parameters(sizing.family_facts(backbone), block_size=16, time_embed_dim=128)
    assert built["adaln"] > 0 and built["embeddings"] == 2688 * 17


def test_plan_cli_on_the_nano_recipe(tmp_path):
    """`python -m pipeline plan recipes/nemotron_nano.yaml --json`: offline, <= 60 s, right numbers."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RUN_ROOT": str(tmp_path)}
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "plan", "recipes/nemotron_nano.yaml", "--json"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(proc.stdout)
    est = plan["estimate"]
    # <= 60 s on a laptop: CPU seconds, since wall time on a shared CI box depends on its neighbours.
    assert cpu_s < 60
    assert est["new_params"]["source"] == "TwoTowerForDiffusionLM on meta"
    assert within(est["params"]["context_tower"]["total"], 31.6e9)
    assert within(est["params"]["context_tower"]["active_without_embeddings"], 3.2e9)
    assert within(est["decode_memory"]["batch_1"]["diffusion"]["context_weights_gib"], 59.0)
    assert est["train_memory"]["num_gpus"] == 16 and est["train_memory"]["total_gib"] < 80
    assert plan["stages"]["calibrate_gamma"]["resources"]["num_gpus"] == 2


def test_decode_traffic_moe_block_reads_more_experts(nano_plan):
    facts = sizing.family_facts(sizing.build_on_meta(config_from_json(NANO_JSON)))
    assert memory.expert_fraction_touched(facts, 1) == pytest.approx(6 / 128)
    assert memory.expert_fraction_touched(facts, 16) == pytest.approx(1 - (122 / 128) ** 16)
    t1, t8 = nano_plan["decode_traffic"]["batch_1"], nano_plan["decode_traffic"]["batch_8"]
    # One AR token reads the active weights: ~3.2 B dense-equivalent params (+ LM head) in bf16.
    assert t1["ar_forward_gib"] == pytest.approx(
        2 * (nano_plan["params"]["context_tower"]["active"] - 352321536) / memory.GIB, rel=1e-6)
    assert t1["denoiser_forward_gib"] > 5 * t1["ar_forward_gib"]  # a 16-token block touches ~54% of experts
    assert 1.0 < t1["break_even_denoiser_steps"] < t8["break_even_denoiser_steps"] < 16


def test_training_step_time_intra_vs_inter_node(nano_plan):
    ctx = sizing.ParamCounts(**{k: nano_plan["params"]["context_tower"][k]
                                for k in ("total", "embeddings", "lm_head", "routed_experts", "active")})
    one_node = training.training_step_time(ctx, ctx, training.TrainShape(8, 1, 4096, 16))
    two_nodes = training.training_step_time(ctx, ctx, training.TrainShape(16, 1, 4096, 16))
    # FLOPs per token: 8 x active (denoiser fwd + bwd + recompute) + 2 x active (context fwd).
    assert one_node["flops_per_token_g"] == pytest.approx(10 * ctx.active_without_embeddings / 1e9)
    assert two_nodes["comm_s_per_microbatch"] > one_node["comm_s_per_microbatch"]  # slower link
    assert two_nodes["bound"] == "communication"
    assert nano_plan["train_time"]["tokens_per_s"] > 0


def test_new_parameters_with_cross_attention_are_all_classified():
    from test_scale_distributed import tiny_nano_config
    from transformers import AutoModelForCausalLM

    from twotower import TwoTowerConfig, TwoTowerForDiffusionLM

    backbone = AutoModelForCausalLM.from_config(tiny_nano_config())
    model = TwoTowerForDiffusionLM.from_backbone(backbone, TwoTowerConfig(block_size=8, cross_attention=True))
    kinds = sizing.new_parameters_by_kind(model.denoiser, backbone)
    assert kinds["other"] == 0 and kinds["cross_attention"] > 0 and kinds["adaln"] > 0
    assert kinds["total"] == sum(p.numel() for n, p in model.named_parameters()
                                 if n in set(model.new_parameter_names()))


def test_placement_two_devices_fit_one_does_not(nano_plan):
    assert nano_plan["placement"]["diffusion"] == {"context_tower": "cuda:0", "denoiser": "cuda:1",
                                                   "device_memory_gib": 80.0, "fits": True}
    assert nano_plan["placement"]["ar_only"]["fits"] is True
    one = estimate({"backbone": {"name_or_path": NANO, "context_device": "cuda:0", "denoiser_device": "cuda:0"}})
    assert one["placement"]["diffusion"]["fits"] is False  # 117.7 GiB of weights on one 80 GB card


def test_summary_headline(nano_plan):
    s = nano_plan["summary"]
    assert (s["params_per_tower_b"], s["active_per_token_b_without_embeddings"]) == (31.58, 3.23)
    assert s["diffusion_gib_per_device_batch1"][0] == pytest.approx(58.9, abs=0.05)
    assert s["train_min_gpus"] == nano_plan["train_min_gpus"]["num_gpus"]


def test_plan_sizes_full_depth_against_shallow_denoisers(nano_plan):
    """`plan` prices the recipe's denoiser depth beside the full depth and 2 / 4 kept layers: a
    shallow tower has fewer parameters, less training memory and time, and a cheaper forward."""
    by_depth = nano_plan["train_by_denoiser_depth"]
    assert set(by_depth) == {"full", "2_layers", "4_layers"}
    full, four, two = by_depth["full"], by_depth["4_layers"], by_depth["2_layers"]
    assert full["denoiser_params_b"] > four["denoiser_params_b"] > two["denoiser_params_b"]
    assert full["train_hours_for_max_steps"] > two["train_hours_for_max_steps"]
    assert full["train_gib_per_gpu"] > two["train_gib_per_gpu"]
    assert (full["denoiser_forward_gib_batch1"] > four["denoiser_forward_gib_batch1"]
            > two["denoiser_forward_gib_batch1"])
    assert nano_plan["summary"]["denoiser_layers"] == "all"


def test_plan_of_a_shallow_recipe_counts_its_own_tower():
    """With `twotower.denoiser_layers` set, the denoiser's counts are the built tower's: the kept
    layers' share of the backbone's layer parameters plus the new modules."""
    plan = estimate({"backbone": {"name_or_path": NANO}, "twotower": {"block_size": 16, "denoiser_layers": 4}})
    full = estimate({"backbone": {"name_or_path": NANO}, "twotower": {"block_size": 16}})
    assert plan["summary"]["denoiser_layers"] == [0, 17, 34, 51]
    assert plan["params"]["context_tower"] == full["params"]["context_tower"]
    assert plan["params"]["denoiser"]["total"] < 0.25 * full["params"]["denoiser"]["total"]
    assert (plan["summary"]["denoiser_forward_vs_ar_traffic_batch1"]
            < full["summary"]["denoiser_forward_vs_ar_traffic_batch1"])
    with pytest.raises(ValueError, match=r"twotower\.denoiser_layers names layer\(s\) \[60\]"):
        estimate({"backbone": {"name_or_path": NANO}, "twotower": {"block_size": 16, "denoiser_layers": [0, 60]}})
