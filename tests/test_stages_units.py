"""Fast unit tests of the stages' pure parts: γ choice, config validation, schedule, summaries.

No model is built here; the stage chain on a real tiny backbone is in test_stages_chain.py.
"""
from __future__ import annotations

import json

import pytest

from stages import calibrate_gamma as C
from stages import export as E
from stages.attach_conditioning import check_block_size
from stages.evaluation import decoding_eval as de
from stages.evaluation.confidence import paired_bootstrap
from stages.training.optimisation import lr_factor


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
    assert de.losers(s["per_task"]) == ["add"]  # copy does not lose (relative quality 1)
    assert s["relative_quality_low"] <= s["relative_quality"] <= s["relative_quality_high"]
    assert s["per_task"]["copy"]["relative_quality_low"] == s["per_task"]["copy"]["relative_quality_high"] == 1.0


def test_bootstrap_of_known_data_gives_expected_interval():
    # AR right on all 20 prompts, diffusion on 15: the ratio is the diffusion accuracy of the
    # resample, a binomial(20, 0.75)/20, whose central 95% lies within about 0.55..0.95.
    ar, dif = [1.0] * 20, [1.0] * 15 + [0.0] * 5
    lo, hi = paired_bootstrap(ar, dif)
    assert 0.5 <= lo <= 0.6 and 0.9 <= hi <= 0.95
    assert lo < 0.75 < hi
    assert paired_bootstrap(ar, dif) == (lo, hi)  # fixed seed: deterministic


def test_bootstrap_is_paired():
    # diffusion wins exactly where AR does: every resample has the ratio 1, however few the prompts
    ar = [1.0, 0.0, 1.0, 0.0, 1.0]
    assert paired_bootstrap(ar, ar) == (1.0, 1.0)
    assert paired_bootstrap([0.0] * 4, [0.0] * 4) == (1.0, 1.0)  # both 0: ratio 1, as decoding_eval.relative


def test_bootstrap_interval_narrows_with_more_prompts():
    few = paired_bootstrap([1.0] * 8, [1.0] * 6 + [0.0] * 2)
    many = paired_bootstrap([1.0] * 128, [1.0] * 96 + [0.0] * 32)
    assert many[1] - many[0] < few[1] - few[0]
    with pytest.raises(ValueError, match="paired_bootstrap"):
        paired_bootstrap([1.0], [1.0, 0.0])


def test_choose_uses_lower_bound_not_point_estimate():
    lucky = {**_pt(0.7, 0.99, 2.5), "relative_quality_low": 0.93, "relative_quality_high": 1.0}
    sure = {**_pt(0.9, 0.995, 1.5), "relative_quality_low": 0.988, "relative_quality_high": 1.0}
    chosen, met = C.choose([lucky, sure], 0.987)
    assert met and chosen["gamma"] == 0.9  # γ 0.7's point estimate meets 0.987, its lower bound does not
    chosen, met = C.choose([lucky], 0.987)
    assert not met and chosen["gamma"] == 0.7  # none meets it by lower bound: best available, flagged
    worse_low = {**_pt(0.9, 0.999, 1.5), "relative_quality_low": 0.90, "relative_quality_high": 1.0}
    chosen, met = C.choose([lucky, worse_low], 0.987)
    assert not met and chosen["gamma"] == 0.7  # fallback ranks by lower bound, not point estimate


def test_slice_size_from_interval_width():
    assert C.slice_size(16, 0.10, 0.10, 64) == 16  # already narrow enough
    assert C.slice_size(16, 0.20, 0.10, 64) == 64  # width halves at 4x the prompts
    assert C.slice_size(16, 0.40, 0.10, 64) == 64  # capped
    assert C.slice_size(16, 0.11, 0.10, 64) == 20  # ceil(16 * 1.21) = 20
    assert C.slice_size(64, 0.40, 0.10, 64) == 64
    assert C.Config(max_interval_width=0.05).max_interval_width == 0.05


def test_card_lists_only_families_that_lose():
    per_task = {"add": {"kind": "ltr", "ar_quality": 1.0, "diffusion_quality": 0.8, "relative_quality": 0.8,
                        "relative_quality_low": 0.6, "relative_quality_high": 0.95, "speedup": 2.0},
                "copy": {"kind": "global", "ar_quality": 1.0, "diffusion_quality": 1.0, "relative_quality": 1.0,
                         "relative_quality_low": 1.0, "relative_quality_high": 1.0, "speedup": 3.0},
                "sort": {"kind": "global", "ar_quality": 0.5, "diffusion_quality": 0.6, "relative_quality": 1.2,
                         "relative_quality_low": 1.0, "relative_quality_high": 1.5, "speedup": 3.0}}
    ev = {"metrics": {"relative_quality": 0.95, "relative_quality_low": 0.9, "relative_quality_high": 1.0,
                      "per_task": per_task},
          "worst_tasks": ["add", "copy", "sort"]}  # an old manifest that listed every family
    assert E.families_losing(ev) == ["add"]
    card = E.model_card(ev, {"metrics": {"target_met": 1.0, "relative_quality": 0.99,
                                         "relative_quality_low": 0.988, "relative_quality_high": 1.0}},
                        {}, {"block_size": 4, "gamma": 0.9}, [])
    assert "Families that lose most to parallel decoding: add." in card
    assert "0.950 [0.900, 1.000]" in card and "0.800 [0.600, 0.950]" in card
    assert "[0.988, 1.000]" in card
    ev["worst_tasks"] = ["copy", "sort"]
    assert "lose most" not in E.model_card(ev, {}, {}, {"block_size": 4, "gamma": 0.9}, [])


def test_card_says_how_the_denoiser_reads_the_context():
    train = {"metrics": {"steps": 300}, "twotower": {"denoiser_layers": 4, "targets": "context_greedy"}}
    lines = "\n".join(E.denoiser_lines(train))
    assert "| depth | 4 layers, evenly spaced |" in lines and "layer-aligned: each layer reads" in lines
    train["twotower"].update(attention_conditioning="fused_kv", fused_layers=[0, 29])
    assert "gated fused feature of context layers [0, 29] (`fused_kv`)" in "\n".join(E.denoiser_lines(train))


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
    points = [_pt(0.5, 0.9, 3.0), {**_pt(0.9, 1.0, 1.5), "relative_quality_low": 0.95, "relative_quality_high": 1.0}]
    C.pareto_plot(points, 0.987, points[1], tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_block_aligned_rows_put_answers_on_block_boundaries():
    import torch

    from stages.data.rows import build_rows, split_examples

    pad = 0
    # two packed examples: [bos p p | a a eos] [bos p | a eos] then pads
    ids = torch.tensor([[1, 7, 8, 9, 9, 2, 1, 7, 9, 2, 0, 0]])
    lm = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0]]).bool()
    prompts, answers = split_examples(ids, lm, pad)
    assert prompts == [[1, 7, 8], [1, 7]] and answers == [[9, 9, 2], [9, 2]]
    x, attn, loss = build_rows((ids, lm), "auto", "answers", 4, pad)
    assert x.shape[1] % 4 == 0
    for row, row_loss in zip(x, loss):
        first = int(row_loss.nonzero()[0])
        assert first % 4 == 0 and row[first] == 9  # the answer starts a block
    x2, attn2, loss2 = build_rows((ids, lm), "packed", "all", 4, pad)
    assert torch.equal(x2, ids) and attn2.sum() == 10 and torch.equal(loss2, attn2)


def test_bucketed_batches_group_alike_rows_and_trim_pad_blocks():
    import torch

    from stages.data.rows import BucketSampler, trim_blocks

    attn = torch.zeros(6, 8, dtype=torch.bool)
    attn[:3, :4] = True  # rows 0-2 use block 0 and 1 (B=2)... of 4 blocks
    attn[3:, :6] = True  # rows 3-5 use blocks 0-2
    sampler = BucketSampler(attn, 2, 2, seed=0)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(6)) and len(sampler) == len(batches)
    assert all(len({i < 3 for i in b}) == 1 for b in batches)  # never mixes the two patterns
    ids = torch.arange(48).view(6, 8)
    x, a, loss = trim_blocks(2)([(ids[i], attn[i], attn[i]) for i in (0, 1)])
    assert x.shape == (2, 4) and bool(a.all())
    x, a, loss = trim_blocks(2)([(ids[i], attn[i], attn[i]) for i in (0, 4)])
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


def _sweep_row(batch: int, ar: float, diffusion: float, verified: float) -> dict:
    """A batch-sweep row with made-up seconds (for the pure decision rule only)."""
    return {"batch": batch, "ar_seconds": ar, "diffusion_seconds": diffusion, "verified_seconds": verified}


def test_batch_sweep_picks_the_fastest_mode_meeting_the_target():
    from stages.evaluation.batch_sweep import decide

    rows = [_sweep_row(1, 1.0, 0.3, 0.4), _sweep_row(4, 1.0, 0.6, 0.5), _sweep_row(16, 1.0, 1.4, 1.2)]
    assert decide(rows, diffusion_low=0.99, target=0.987) == {1: "diffusion", 4: "verified", 16: "ar"}
    # diffusion's lower bound misses the target: it is never picked, however fast
    assert decide(rows, diffusion_low=0.95, target=0.987) == {1: "verified", 4: "verified", 16: "ar"}
    # a tie goes to the exact modes, AR first
    assert decide([_sweep_row(2, 1.0, 1.0, 1.0)], diffusion_low=1.0, target=0.9) == {2: "ar"}
    assert decide([_sweep_row(2, 1.0, 0.5, 0.5)], diffusion_low=1.0, target=0.9) == {2: "verified"}


def test_batch_sweep_batches_mix_families_and_cycle():
    from stages.evaluation.batch_sweep import batch_prompts

    ex = [{"task": "a", "prompt": "a1"}, {"task": "a", "prompt": "a2"}, {"task": "b", "prompt": "b1"}]
    assert batch_prompts(ex, 1) == ["a1"]
    assert batch_prompts(ex, 2) == ["a1", "b1"]
    assert batch_prompts(ex, 5) == ["a1", "b1", "a2", "b1", "a1"]


def test_calibrate_rejects_bad_batch_sizes():
    with pytest.raises(ValueError, match="calibrate.batch_sizes"):
        C.Config(batch_sizes=[1, 1])
    with pytest.raises(ValueError, match="calibrate.batch_sizes"):
        C.Config(batch_sizes=[0, 4])


def test_evaluate_rejects_bad_mode_batches():
    from stages import evaluate as EV

    with pytest.raises(ValueError, match="evaluate.mode_batches"):
        EV.Config(mode_batches=[8, 8])
    assert EV.Config(mode_batches=[]).mode_batches == []
