"""Length-dependent RoPE (`longrope`, `dynamic` NTK) decoded exactly (adapters.rotary,
twotower.rope_switch): prompts shorter than the switch point, generation crossing it.

- `ar` equals transformers' greedy `generate` (batch 1, a freshly built model: its rotary module
  keeps state), token for token; `mock_ar` and `verified` equal `ar` (verification blocks that
  straddle the switch, and roll back before it, included);
- a batch of prompts of different lengths gives each row what it gets alone;
- a RoPE type the runtime cannot reproduce is refused, naming the field and its value.
"""
from __future__ import annotations

import pytest
import torch

from tests.twotower_fixtures import ROPE_CONFIGS, SWITCH, VOCAB, rope_backbone
from twotower import TwoTowerConfig, TwoTowerForDiffusionLM

NEW = 16
"""Tokens generated: every prompt below is shorter than SWITCH and ends past it."""
LENGTHS = (10, 13, 14, 15)


def prompts(lengths=LENGTHS, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (length,), generator=g) for length in lengths]


def twotower(name: str) -> TwoTowerForDiffusionLM:
    return TwoTowerForDiffusionLM.from_backbone(rope_backbone(name), TwoTowerConfig(block_size=4))


def hf_greedy(name: str, prompt: torch.Tensor, **overrides) -> list[int]:
    out = rope_backbone(name, **overrides).generate(prompt[None], max_new_tokens=NEW, do_sample=False)
    return out[0, prompt.numel():].tolist()


def straddling(trace, start: int) -> list[tuple[int, int, int]]:
    """(block start, block length, accepted) of a batch-1 `verified` run's verifications whose
    block straddles the switch (`trace` of `return_trace`, `start`: the prompt length)."""
    found = []
    for steps in trace:
        n, accepted = len(steps[-1]["tokens"][0]), steps[-1]["accepted"][0]
        if start <= SWITCH < start + n:
            found.append((start, n, accepted))
        start += accepted
    return found


@pytest.mark.parametrize("name", sorted(ROPE_CONFIGS))
def test_every_mode_equals_transformers_greedy_across_the_switch(name):
    model = twotower(name)
    rolled_back_before = 0
    for prompt in prompts():
        want = hf_greedy(name, prompt)
        for mode in ("ar", "mock_ar", "verified"):
            out = model.generate(prompt, mode=mode, max_new_tokens=NEW, return_trace=mode == "verified")
            assert out.generated[0].tolist() == want, (mode, prompt.numel())
            if mode == "verified":
                crossed = straddling(out.trace, prompt.numel())
                assert crossed, "no verification block straddled the switch"
                rolled_back_before += sum(start + accepted <= SWITCH for start, _, accepted in crossed)
    assert rolled_back_before, "no straddling verification was rolled back before the switch"


@pytest.mark.parametrize("name", sorted(ROPE_CONFIGS))
def test_the_switch_changes_the_tokens(name):
    """The fixtures are sensitive: a static table (the short one throughout) decodes otherwise."""
    prompt = prompts()[0]
    if name == "phi3_longrope":
        static = dict(ROPE_CONFIGS[name]().rope_parameters)
        static["long_factor"] = static["short_factor"]
    else:
        static = {"rope_type": "default", "rope_theta": ROPE_CONFIGS[name]().rope_parameters["rope_theta"]}
    assert hf_greedy(name, prompt) != hf_greedy(name, prompt, rope_parameters=static)


@pytest.mark.parametrize("name", sorted(ROPE_CONFIGS))
@pytest.mark.parametrize("mode", ["ar", "mock_ar", "verified"])
def test_a_mixed_length_batch_gives_each_row_its_tokens_alone(name, mode):
    model = twotower(name)
    rows = prompts((10, 15, 7, 13), seed=2)
    batch = model.generate([r.tolist() for r in rows], mode=mode, max_new_tokens=NEW)
    for i, prompt in enumerate(rows):
        alone = model.generate(prompt, mode=mode, max_new_tokens=NEW).generated[0].tolist()
        assert batch.generated[i].tolist() == alone, (mode, i)


def test_an_unsupported_rope_type_is_refused_naming_the_field_and_value():
    from transformers import FalconH1Config

    import adapters

    config = ROPE_CONFIGS["llama_dynamic"]()
    config.rope_parameters = {"rope_type": "mystery", "rope_theta": 100.0}
    with pytest.raises(ValueError, match=r"config\.rope_(scaling|parameters)\.rope_type='mystery'"):
        adapters.get(config)
    # a length-dependent type in a family whose adapter does not compute it exactly (Mamba-2 hybrid)
    hybrid = FalconH1Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                            rope_parameters={"rope_type": "dynamic", "rope_theta": 100.0, "factor": 2.0})
    with pytest.raises(ValueError, match=r"config\.rope_(scaling|parameters)\.rope_type='dynamic'"):
        adapters.get(hybrid)
    for name in ROPE_CONFIGS:  # the supported ones
        assert adapters.get(ROPE_CONFIGS[name]())
