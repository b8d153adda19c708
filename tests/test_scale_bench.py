"""The GPU check script and the CPU decode benchmark, run for real at a tiny size on CPU.

No GPU here: `bench/gpu_check.py --tiny --device cpu` takes the same code path (training, decode
side by side, the two-device placement with both towers on one device) as the 1 B GPU run.
"""
from __future__ import annotations

import json

import pytest
import torch

from bench import decode_cpu, forward_cost, gpu_check
from bench.common import SIZES, nemotron_h_config
from twotower import sizing


def test_gpu_check_tiny_on_cpu(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "gpu_check.json"
    args = ["--tiny", "--device", "cpu", "--ar-steps", "6", "--steps", "6", "--max-new-tokens", "16",
            "--out", str(out)]
    assert gpu_check.main(args) == 0
    report = json.loads(out.read_text())
    assert report["placement"] == {"same_device": "cpu", "mock_ar_equals_ar": True,
                                   "diffusion_unchanged_by_placement": True}
    assert [r["batch"] for r in report["decode"]] == [1, 8]
    for row in report["decode"]:
        assert row["ar_tokens_per_s"] > 0 and row["diffusion_tokens_per_s"] > 0
        assert row["tokens_per_diffusion_forward"] >= 1.0 - 1e-9
    for key in ("train_backbone", "train_denoiser"):
        assert report[key]["tokens_per_s"] > 0 and report[key]["steps"] == 6


def test_the_gpu_size_is_about_one_billion_parameters():
    config = nemotron_h_config(SIZES["1b"])
    model = sizing.build_on_meta(config)
    counts = sizing.count_parameters(model)
    kinds = sizing.layer_kinds(sizing.family_facts(model))
    assert 0.9e9 < counts.total < 1.3e9
    assert kinds["attention"] > 0 and kinds["moe"] > 0 and kinds["mamba"] > 0


def test_decode_cpu_quick_side_by_side(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = decode_cpu.run(decode_cpu.parse_args(["--quick", "--gammas", "0.8", "--batches", "1", "2",
                                                 "--repeats", "1", "--out", str(out)]))
    assert [(r["gamma"], r["batch"]) for r in rows] == [(0.8, 1), (0.8, 2)]
    assert json.loads(out.read_text())[0]["speedup"] > 0
    assert "AR tok/s" in capsys.readouterr().out


def test_train_steps_respects_the_time_cap():
    from bench.common import train_steps

    w = torch.nn.Parameter(torch.ones(3))
    out = train_steps(lambda i: (w ** 2).sum(), [w], steps=50, warmup=0, tokens_per_step=1, lr=0.1,
                      device=torch.device("cpu"), bf16=False, max_seconds=0.0)
    assert out["steps"] == 1  # the cap is checked before each step: a device budget is never overrun
    full = train_steps(lambda i: (w ** 2).sum(), [w], steps=5, warmup=1, tokens_per_step=1, lr=0.1,
                       device=torch.device("cpu"), bf16=False)
    assert full["steps"] == 5 and full["last_loss"] < out["first_loss"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_check_tiny_on_cuda(tmp_path):
    """The tiny run on the GPU: bf16 autocast training and the same-device placement on cuda:0."""
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--tiny", "--device", "cuda", "--ar-steps", "6", "--steps", "6", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["placement"]["same_device"] == "cuda"
    assert report["peak_memory_gib"] > 0


def test_forward_cost_times_the_three_decoding_forwards(tmp_path):
    """bench/forward_cost.py on a saved tiny Nemotron-H: positive times and a consistent ratio."""
    from twotower_fixtures import tiny_backbone

    tiny_backbone("nemotron_h").save_pretrained(tmp_path / "bb")
    ms = forward_cost.main([str(tmp_path / "bb"), "--block-size", "4", "--prompt-len", "6", "--rounds", "1"])
    assert set(ms) == {"prefill", "ar_step", "denoiser_forward", "denoiser_per_ar_step"}
    assert all(v > 0 for v in ms.values())
    assert ms["denoiser_per_ar_step"] == pytest.approx(ms["denoiser_forward"] / ms["ar_step"])


def test_scan_cost_times_both_cuts_against_the_old_paths(tmp_path):
    """bench/scan_cost.py on a saved tiny Nemotron-H: both pairs timed, ratios consistent, and the
    one-chunk limit restored afterwards."""
    from twotower_fixtures import tiny_backbone

    from bench import scan_cost
    from twotower import walk

    tiny_backbone("nemotron_h").save_pretrained(tmp_path / "bb")
    out = scan_cost.main([str(tmp_path / "bb"), "--block-size", "4", "--prompt-len", "10", "--rounds", "1"])
    assert out["block scan/ratio"] == pytest.approx(out["block scan/no_states_us"] / out["block scan/with_states_us"])
    assert out["prefill 10 tok/one_chunk_us"] > 0 and out["prefill 10 tok/chunks_of_B_us"] > 0
    assert walk.ONE_CHUNK_MAX == 64
