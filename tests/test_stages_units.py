"""Fast unit tests of the stages' pure parts: γ choice, config validation, schedule, summaries.

No model is built here; the stage chain on a real tiny backbone is in test_stages_chain.py.
"""
from __future__ import annotations

import json
import math

import pytest

from stages import calibrate_gamma as C
from stages import decoding_eval as de
from stages.attach_conditioning import check_block_size
from stages.training import lr_factor


def _pt(gamma, rq, speed):
    return {"gamma": gamma, "block_size": None, "relative_quality": rq, "speedup": speed}


def test_choose_picks_smallest_gamma_meeting_target():
    points = [_pt(0.5, 0.90, 3.0), _pt(0.7, 0.99, 2.5), _pt(0.9, 1.0, 1.5), _pt(0.6, 0.95, 2.8)]
    chosen, met = C.choose(points, 0.987)
    assert met and chosen["gamma"] == 0.7


def test_choose_falls_back_to_best_and_says_so():
    points = [_pt(0.5, 0.80, 3.0), _pt(0.9, 0.93, 1.5), _pt(0.95, 0.93, 1.2)]
    chosen, met = C.choose(points, 0.987)
    assert not met and chosen["gamma"] == 0.9  # best quality; ties broken by speed


@pytest.mark.parametrize("target", [0.0, -0.1, 1.01, 2.0])
def test_calibration_target_outside_unit_interval_is_rejected(target):
    with pytest.raises(ValueError, match="calibrate.target_relative_quality"):
        C.Config(target_relative_quality=target)


def test_calibration_gammas_validated():
    with pytest.raises(ValueError, match="calibrate.gammas"):
        C.Config(gammas=[0.5, 1.5])
    C.Config(target_relative_quality=1.0)  # the closed end is allowed


@pytest.mark.parametrize("block,seq", [(16, 120), (12, 128), (1, 16), (32, 16)])
def test_block_size_that_does_not_fit_is_rejected(block, seq):
    with pytest.raises(ValueError, match="block_size"):
        check_block_size(block, seq)


def test_lr_schedule_warms_up_then_decays_to_min():
    assert lr_factor(0, 10, 0.0, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 0.0, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 10, 0.5, 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert lr_factor(100, 10, 2.0, 0.1) == pytest.approx(0.1)  # past the budget: stays at the floor


def _row(task, setting, correct, secs, den=1, new=4, kind="global"):
    return de.Row(task=task, kind=kind, setting=setting, text="", correct=correct, new_tokens=new,
                  denoiser_forwards=den, context_forwards=1, seconds=secs)


def test_summarise_quality_speed_and_per_task():
    rows = [_row("copy", "ar", 1.0, 1.0, den=0), _row("copy", "g0.9", 1.0, 0.25, den=2),
            _row("add", "ar", 1.0, 1.0, den=0, kind="ltr"), _row("add", "g0.9", 0.0, 0.25, den=4, kind="ltr")]
    s = de.summarise(rows, "g0.9")
    assert s["ar_quality"] == 1.0 and s["diffusion_quality"] == 0.5
    assert s["relative_quality"] == 0.5 and s["speedup"] == pytest.approx(4.0)
    assert s["tokens_per_forward"] == pytest.approx(8 / 6)
    assert s["per_task"]["add"]["relative_quality"] == 0.0 and s["per_task"]["add"]["kind"] == "ltr"
    assert de.losers(s["per_task"]) == ["add", "copy"]


def test_relative_quality_when_ar_scores_zero():
    assert de.relative(0.0, 0.0) == 1.0


def test_load_examples_slices_per_task(tmp_path):
    f = tmp_path / "ex.jsonl"
    rows = [{"task": t, "kind": "global", "prompt": f"{t}{i}", "answer": str(i)} for i in range(5) for t in "ab"]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    first = de.load_examples(str(f), 2)
    rest = de.load_examples(str(f), 2, offset=2)
    assert [r["prompt"] for r in first] == ["a0", "b0", "a1", "b1"]
    assert [r["prompt"] for r in rest] == ["a2", "b2", "a3", "b3"]
    with pytest.raises(ValueError, match="no examples"):
        de.load_examples(str(f), 2, offset=5)
    with pytest.raises(ValueError, match="does not exist"):
        de.load_examples(str(tmp_path / "missing.jsonl"))


def test_pareto_plot_is_written(tmp_path):
    points = [_pt(0.5, 0.9, 3.0), _pt(0.9, 1.0, 1.5)]
    C.pareto_plot(points, 0.987, points[1], tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_block_aligned_rows_put_answers_on_block_boundaries():
    import torch

    from stages.rows import build_rows, split_examples

    pad = 0
    # two packed examples: [bos p p | a a eos] [bos p | a eos] then pads
    ids = torch.tensor([[1, 7, 8, 9, 9, 2, 1, 7, 9, 2, 0, 0]])
    lm = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0]]).bool()
    prompts, answers = split_examples(ids, lm, pad)
    assert prompts == [[1, 7, 8], [1, 7]] and answers == [[9, 9, 2], [9, 2]]
    x, attn, loss = build_rows((ids, lm), "auto", "answers", 4, pad)
    assert x.shape[1] % 4 == 0
    for row, l in zip(x, loss):
        first = int(l.nonzero()[0])
        assert first % 4 == 0 and row[first] == 9  # the answer starts a block
    x2, attn2, loss2 = build_rows((ids, lm), "packed", "all", 4, pad)
    assert torch.equal(x2, ids) and attn2.sum() == 10 and torch.equal(loss2, attn2)


def test_bucketed_batches_group_alike_rows_and_trim_pad_blocks():
    import torch

    from stages.rows import BucketSampler, trim_blocks

    attn = torch.zeros(6, 8, dtype=torch.bool)
    attn[:3, :4] = True  # rows 0-2 use block 0 and 1 (B=2)... of 4 blocks
    attn[3:, :6] = True  # rows 3-5 use blocks 0-2
    sampler = BucketSampler(attn, 2, 2, seed=0)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(6)) and len(sampler) == len(batches)
    assert all(len({i < 3 for i in b}) == 1 for b in batches)  # never mixes the two patterns
    ids = torch.arange(48).view(6, 8)
    x, a, l = trim_blocks(2)([(ids[i], attn[i], attn[i]) for i in (0, 1)])
    assert x.shape == (2, 4) and bool(a.all())
    x, a, l = trim_blocks(2)([(ids[i], attn[i], attn[i]) for i in (0, 4)])
    assert x.shape == (2, 6)


def test_cross_section_block_size_check():
    from stages.attach_conditioning import check

    check({"twotower": {"block_size": 16}, "data": {"seq_len": 128, "block_size": 16}})
    with pytest.raises(ValueError, match="does not fit data.seq_len"):
        check({"twotower": {"block_size": 12}, "data": {"seq_len": 128}})
    with pytest.raises(ValueError, match="differs from data.block_size"):
        check({"twotower": {"block_size": 8}, "data": {"seq_len": 128, "block_size": 16}})


def test_peak_memory_window_forgets_an_earlier_peak():
    """evaluate reports its own peak even in a Ray worker an earlier stage (training) used."""
    import torch

    big = torch.ones(200 * 2**20 // 4)  # 200 MB resident
    before = de.peak_memory_mb()["peak_rss_mb"]
    del big
    if not de.reset_peak_memory():
        pytest.skip("no /proc/self/clear_refs here: the peak is the process's")
    after = de.peak_memory_mb()["peak_rss_mb"]
    assert after < before - 150
