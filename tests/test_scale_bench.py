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


@pytest.mark.slow
@pytest.mark.ray
def test_gpu_check_fsdp2_step_on_cpu_workers():
    """Step 5 of the GPU check (FSDP2 under Ray Train, bf16-mixed) on 2 gloo workers: what a GPU
    run adds is NCCL and CUDA bf16, not new code."""
    args = gpu_check._defaults(gpu_check.parse_args(["--tiny", "--device", "cpu", "--fsdp"]))
    got = gpu_check.check_fsdp2(torch.device("cpu"), args)
    assert got["ok"] and got["backend"] == "gloo", got
    assert got["shards"] == ["__0_0.distcp", "__1_0.distcp"]
    assert got["losses"][-1] < got["losses"][0]  # bf16-mixed steps still learn


def test_gpu_check_tiny_on_cpu(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "gpu_check.json"
    args = ["--tiny", "--device", "cpu", "--ar-steps", "6", "--steps", "6", "--max-new-tokens", "16",
            "--out", str(out)]
    assert gpu_check.main(args) == 0
    report = json.loads(out.read_text())
    assert report["placement"] == {"same_device": "cpu", "mock_ar_equals_ar": True, "verified_equals_ar": True,
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
    assert [(r["gamma"], r["batch"]) for r in rows] == [(0.8, 1), (0.8, 2)] * 2  # the modes, then ar beside auto
    assert all(r["auto_picked"] in ("ar", "verified", "diffusion") for r in rows[2:])
    saved = json.loads(out.read_text())[0]
    assert saved["speedup"] > 0 and saved["verified_speedup"] > 0
    assert saved["verified_agreement"] == 1.0  # verified is AR token for token, whatever the denoiser drafts
    assert 1.0 <= saved["verified_accepted_per_verify"] <= 8
    printed = capsys.readouterr().out
    assert "ar tok/s" in printed and "verif tok/s" in printed and "kept/verify" in printed


def test_auto_table_picks_the_fastest_qualifying_mode():
    """ar and verified always qualify; diffusion only where it agrees with AR enough."""
    from bench.common import auto_table

    rows = [{"batch": 1, "ar_tokens_per_s": 10, "diffusion_tokens_per_s": 40, "diffusion_agreement": 0.9,
             "verified_tokens_per_s": 30},
            {"batch": 4, "ar_tokens_per_s": 50, "diffusion_tokens_per_s": 60, "diffusion_agreement": 1.0,
             "verified_tokens_per_s": 45},
            {"batch": 16, "ar_tokens_per_s": 90, "diffusion_tokens_per_s": 60, "diffusion_agreement": 1.0,
             "verified_tokens_per_s": 45}]
    assert auto_table(rows, 0.987) == {1: "verified", 4: "diffusion", 16: "ar"}
    assert auto_table(rows, 0.5)[1] == "diffusion"


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
    """bench/scan_cost.py on a saved tiny Nemotron-H: every pair timed, ratios consistent, and the
    one-chunk limits restored afterwards."""
    from twotower_fixtures import tiny_backbone

    from bench import scan_cost
    from twotower import walk

    tiny_backbone("nemotron_h").save_pretrained(tmp_path / "bb")
    out = scan_cost.main([str(tmp_path / "bb"), "--block-size", "4", "--prompt-len", "10", "--rounds", "1"])
    assert out["block scan/ratio"] == pytest.approx(out["block scan/no_states_us"] / out["block scan/with_states_us"])
    assert out["prefill 10 tok/one_chunk_us"] > 0 and out["prefill 10 tok/chunks_of_B_us"] > 0
    assert walk.ONE_CHUNK_MAX == 64
    assert out["rollback/ratio"] == pytest.approx(out["rollback/every_position_us"] / out["rollback/rescan_prefix_us"])
    assert out["every-pos scan/one_chunk_us"] > 0 and out["every-pos scan/token_chunks_us"] > 0
    assert out["rollback now/ratio"] == pytest.approx(out["rollback now/state_at_us"]
                                                      / out["rollback now/every_position_us"])
    from twotower import ops
    assert ops.EVERY_POSITION_MAX == 64


def test_decode_over_several_batches_merges_their_tokens_and_seconds():
    """Every batch size decodes the same prompts cut into batches (decode_cpu.py --shared-prompts):
    the merged row sums the batches' tokens and seconds, so tokens/s is the whole set's, and
    verified stays AR's output in every batch."""
    import torch

    from bench.common import decode_batches_side_by_side, decode_side_by_side

    model, prompts = decode_cpu.trained_copy_model(decode_cpu.parse_args(["--quick"]))
    (batch,) = prompts(4)
    kwargs = dict(gamma=0.8, max_new_tokens=8, device=torch.device("cpu"), bf16=False, repeats=1)
    whole = decode_side_by_side(model, batch, **kwargs)
    merged = decode_batches_side_by_side(model, [batch[:2], batch[2:]], **kwargs)
    assert merged["batch"] == 2 and merged["n_prompts"] == 4
    for m in ("ar", "diffusion", "verified"):
        assert merged[f"{m}_tokens"] == whole[f"{m}_tokens"]  # the same prompts, split: the same tokens
        assert merged[f"{m}_tokens_per_s"] == pytest.approx(merged[f"{m}_tokens"] / merged[f"{m}_seconds"])
        assert merged[f"{m}_tokens_per_forward"] > 0
    assert merged["ar_speedup"] == 1.0 and merged["verified_agreement"] == 1.0
    assert 1.0 <= merged["verified_accepted_per_verify"] <= 8


def test_mode_ceiling_arithmetic():
    """The cost model by hand: a 5-token answer in blocks of 4 is 2 blocks; AR pays prefill + 4 steps."""
    from bench.mode_ceiling import ceilings

    costs = {"prefill": 2.0, "ar_step": 1.0, "denoiser_forward": 2.0, "verify_forward": 2.0, "commit_forward": 1.0}
    counts = {"ar": [(5, 0, 5)], "diffusion": [(5, 3, 2)], "verified": [(5, 3, 3)]}
    out = ceilings(costs, counts, block=4)
    assert out["mean_blocks"] == 2 and out["mean_answer_tokens"] == 5
    # ar 2 + 4·1 = 6; diffusion at best 2 + 2·2 + 1·1 = 7, as run 2 + 3·2 + 1·1 = 9
    assert out["diffusion"]["ceiling"] == pytest.approx(6 / 7)
    assert out["diffusion"]["predicted"] == pytest.approx(6 / 9)
    # verified at best 2 + 2·(2 + 2) = 10, as run 2 + 3·2 + 2·2 = 12
    assert out["verified"]["ceiling"] == pytest.approx(6 / 10)
    assert out["verified"]["predicted"] == pytest.approx(6 / 12)
    assert out["diffusion"]["fewest_forwards_per_answer"] == 4 and out["verified"]["fewest_forwards_per_answer"] == 5
    assert out["verified"]["forwards_per_answer"] == 6


def test_mode_ceiling_on_an_export(tmp_path, capsys):
    """bench/mode_ceiling.py end to end on a tiny export: verified (AR's output, so AR's answer
    lengths) needs at least the fewest forwards, so its predicted speedup never exceeds its ceiling."""
    from harness_fixtures import tiny_char_twotower

    from bench import mode_ceiling

    model, tok = tiny_char_twotower()
    model.save_pretrained(tmp_path / "export")
    tok.save_pretrained(tmp_path / "export")
    rows = [{"task": t, "prompt": f"{t} {i} abc"} for t in ("copy", "add") for i in range(3)]
    (tmp_path / "ex.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = mode_ceiling.main(["--model", str(tmp_path / "export"), "--examples", str(tmp_path / "ex.jsonl"),
                                "--prompts-per-task", "2", "--skip-per-task", "1", "--max-new-tokens", "6",
                                "--repeats", "1", "--rounds", "1", "--out", str(tmp_path / "r.json")])
    assert report["prompts"] == 4
    assert report["verified"]["same_as_ar"] == 1.0
    r = report["verified"]
    assert r["forwards_per_answer"] >= r["fewest_forwards_per_answer"]
    assert 0 < r["predicted"] <= r["ceiling"] + 1e-9
    assert all(report[m]["measured"] > 0 and report[m]["ceiling"] > 0 for m in mode_ceiling.MODES)
    assert json.loads((tmp_path / "r.json").read_text())["block_size"] == 4
    assert "ceiling" in capsys.readouterr().out
