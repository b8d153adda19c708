"""Bad input raises a ValueError whose message names the problem."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from twotower_fixtures import tiny_twotower

import adapters
from twotower import TwoTowerConfig, TwoTowerForDiffusionLM

torch.set_num_threads(1)


def test_unknown_model_type_lists_supported():
    supported = ", ".join(sorted(adapters.REGISTRY))
    with pytest.raises(ValueError, match=rf"'gpt2'.*supported: {supported}$"):
        adapters.get("gpt2")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match="unsupported backbone model_type 'gpt2'"):
        TwoTowerForDiffusionLM.from_backbone(gpt2, TwoTowerConfig())


@pytest.mark.parametrize("bad", [1, 0, -4])
def test_block_size_below_two(bad):
    with pytest.raises(ValueError, match="block_size must be an integer >= 2"):
        TwoTowerConfig(block_size=bad)


def test_bad_choice_and_unknown_key():
    with pytest.raises(ValueError, match="time_conditioning"):
        TwoTowerConfig(time_conditioning="film")
    with pytest.raises(ValueError, match="unknown twotower config keys: \\['blok_size'\\]"):
        TwoTowerConfig.from_dict({"blok_size": 4})


def test_context_position_keys_checked():
    with pytest.raises(ValueError, match="context_position_keys must be an integer >= 0"):
        TwoTowerConfig(context_position_keys=-1)
    with pytest.raises(ValueError, match="context_position_keys needs attention_conditioning=context_kv"):
        TwoTowerConfig(context_position_keys=8, attention_conditioning="none")


def test_zero_init_check_refuses_half_ablated_context():
    from twotower import checks

    model = tiny_twotower("nemotron_h", attention_conditioning="none")
    with pytest.raises(ValueError, match="hides the context from one layer kind only"):
        checks.zero_init_identity(model, torch.randint(3, 40, (1, 6)))


@pytest.fixture(scope="module")
def model():
    return tiny_twotower("llama")


@pytest.mark.parametrize("draft", [0, -1, 1.5, "greedy", None, True])
def test_draft_policy_must_be_named_or_a_positive_int(model, draft):
    with pytest.raises(ValueError, match=r"draft must be one of \('full', 'confident', 'prefix'\) or an int >= 1"):
        model.generate(torch.tensor([[5, 6, 7]]), mode="verified", draft=draft, max_new_tokens=4)


@pytest.mark.parametrize("gamma", [0.0, -0.1, 1.5])
def test_gamma_outside_unit_interval(model, gamma):
    with pytest.raises(ValueError, match=r"gamma must be in \(0, 1\]"):
        model.generate(torch.tensor([[5, 6, 7]]), gamma=gamma, max_new_tokens=4)


def test_empty_prompt(model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        model.generate([[5, 6], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=4)


def test_prompt_longer_than_max_positions(model):
    too_long = torch.full((1, 300), 5)
    with pytest.raises(ValueError, match="300 tokens exceeds the backbone's max_position_embeddings=256"):
        model.generate(too_long, max_new_tokens=4)


def test_unknown_mode_and_block_size(model):
    with pytest.raises(ValueError, match="mode must be one of"):
        model.generate(torch.tensor([[5]]), mode="beam")
    with pytest.raises(ValueError, match="block_size 8 exceeds the trained block size 4"):
        model.generate(torch.tensor([[5]]), block_size=8)


def test_checkpoint_without_safetensors(model, tmp_path):
    model.save_pretrained(tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors weights"):
        TwoTowerForDiffusionLM.from_pretrained(tmp_path)


def test_noise_mask_on_block_start_rejected(model):
    ids = torch.randint(3, 40, (1, 8))
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 4] = True
    with pytest.raises(ValueError, match="position 0 of a block"):
        model(ids, noise_mask=mask, t=torch.full((1, 2), 0.5))


@pytest.mark.parametrize("first", ["twotower.ops", "twotower.generate", "twotower.denoiser", "twotower.walk",
                                   "adapters"])
def test_any_runtime_module_imports_first_and_auto_classes_still_resolve(first):
    """Importing one runtime module first, in a fresh process, works (it once hit a circular import
    through an import hook that registered the Auto classes), and once the model is imported the
    Auto classes know `twotower`."""
    import subprocess
    import sys
    from pathlib import Path

    code = (f"import {first}; from twotower import TwoTowerForDiffusionLM; "
            "from transformers import AutoConfig, AutoModel; AutoModel.register; "
            "print(type(AutoConfig.for_model('twotower')).__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("TwoTowerHFConfig")


@pytest.mark.parametrize("rope_type", ["longrope", "dynamic"])
def test_a_length_dependent_rope_scaling_is_refused_where_the_adapter_cannot_follow_it(rope_type):
    """`longrope` and `dynamic` NTK switch the rotary table by sequence length: exact in the families
    whose adapters take cos/sin from `adapters.rotary` (Llama, Phi-3, ...; tests/test_rope_scaling.py),
    refused, naming the field and its value, in the others (here a Mamba-2 hybrid, Falcon-H1)."""
    from transformers import FalconH1Config, LlamaConfig, Phi3Config

    import adapters

    rope = {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 2.0,
            "original_max_position_embeddings": 64}
    if rope_type == "longrope":
        rope.update(short_factor=[1.0] * 4, long_factor=[2.0] * 4)
    family = Phi3Config if rope_type == "longrope" else LlamaConfig  # Phi-3 accepts only longrope
    config = family(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    rope_parameters=rope)
    assert adapters.get(config)
    hybrid = FalconH1Config(vocab_size=48, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                            rope_parameters=dict(rope))
    with pytest.raises(ValueError, match=rf"config\.rope_(scaling|parameters)\.rope_type='{rope_type}'"):
        adapters.get(hybrid)
    assert adapters.get("falcon_h1")  # by name alone: nothing to check yet


def test_olmo3_refuses_a_length_dependent_rope_named_for_one_layer_type():
    """OLMo 3 keeps a rotary table per layer type; `adapters.rotary` computes only static ones per
    type, so `dynamic` on the full-attention layers is refused naming the layer type's field."""
    from twotower_fixtures import olmo3_config

    import adapters

    config = olmo3_config()
    config.rope_parameters["full_attention"] = {"rope_type": "dynamic", "rope_theta": 100.0, "factor": 2.0}
    with pytest.raises(ValueError, match=r"config\.rope_(scaling|parameters)\.full_attention\.rope_type='dynamic'"):
        adapters.get(config)
    assert adapters.get(olmo3_config())  # YaRN on the full-attention layers: a static table
