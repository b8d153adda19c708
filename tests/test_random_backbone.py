"""`backbone.random_init` (stages/backbones/random_backbone.py): the shipped Nemotron-3-Nano architecture,
widths and expert counts shrunk, random weights, the data's tokenizer: `duplicate_backbone`,
`freeze_context` and `attach_conditioning` run on it as on the real checkpoint (52 sublayers of the
same kinds, the zero-init identity of the conditioning)."""
from __future__ import annotations

import pytest
import torch
from test_stages_fixtures import BLOCK, make_ctx, tiny_backbone, tiny_data

from stages import attach_conditioning as A
from stages import duplicate_backbone as D
from stages import freeze_context as F

NANO_ID = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16"
SHRINK = dict(hidden_size=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
              moe_shared_expert_intermediate_size=8, intermediate_size=8, mamba_num_heads=2, mamba_head_dim=8,
              ssm_state_size=4, n_groups=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
              chunk_size=16, max_position_embeddings=256)


def test_random_nano_keeps_the_pattern_and_runs_the_early_stages(tmp_path):
    from planning.estimate import load_backbone_config
    from twotower import sizing

    torch.set_num_threads(1)
    data = tiny_data(tmp_path / "data", tiny_backbone(tmp_path / "tok"))
    cfg = D.Config(name_or_path=NANO_ID, random_init=SHRINK)
    dup = D.run(cfg, {"prepare_data": data}, make_ctx(tmp_path, "dup", seed=3))
    shipped = sizing.layer_kinds(sizing.family_facts(sizing.build_on_meta(load_backbone_config(NANO_ID))))
    kinds = [e["kind"] for e in dup["layer_map"]]
    assert len(kinds) == 52 and dup["metrics"]["n_sublayers"] == 52
    assert {k: kinds.count(k) for k in set(kinds)} == {k: v for k, v in shipped.items() if v}
    assert dup["vocab_size"] == data["vocab_size"] and "random init (seed 3)" in dup["metrics"]["source_checkpoint"]
    again = D.run(cfg, {"prepare_data": data}, make_ctx(tmp_path, "dup2", seed=3))
    assert again["backbone"]["model"] == dup["backbone"]["model"]  # built once per config and seed
    fr = F.run(F.Config(), {"duplicate_backbone": dup}, make_ctx(tmp_path, "freeze"))
    att = A.run(A.Config(block_size=BLOCK), {"freeze_context": fr}, make_ctx(tmp_path, "attach"))
    assert att["metrics"]["zero_init_max_abs_delta"] <= A.IDENTITY_TOLERANCE["float32"]


def test_unknown_field_names_the_key(tmp_path):
    data = tiny_data(tmp_path / "data", tiny_backbone(tmp_path / "tok"))
    with pytest.raises(ValueError, match=r"backbone.random_init: \['hiden_size'\] are not fields"):
        D.run(D.Config(name_or_path=NANO_ID, random_init={"hiden_size": 16}), {"prepare_data": data},
              make_ctx(tmp_path, "dup"))
