"""Training budgets that do not depend on the machine's load, and AR timed at its own best threads.

Every shipped recipe bounds denoiser training by steps (the same model on a loaded laptop and an
idle server); a time budget is opt-in and the summary says what ended training. Decoding timings
run AR at the threads a recipe names for a batch size (`ar_threads`), every other mode at the
stage's own.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from twotower_fixtures import tiny_twotower

from stages.backbones.loading import BackboneRef
from stages.evaluation import batch_sweep
from stages.train_denoiser import Config, budget_note, check_teacher_vocabulary

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").rglob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_train_on_a_step_budget(recipe):
    train = (yaml.safe_load(recipe.read_text()) or {}).get("train") or {}
    assert train.get("max_minutes") is None, f"{recipe.name}: train.max_minutes makes the model depend on load"


def test_budget_note_says_what_ended_training():
    assert budget_note(Config(max_steps=100), 100) == "steps"
    timed = budget_note(Config(max_steps=100, max_minutes=2.0), 40)
    assert "max_minutes=2" in timed and "step 40 of 100" in timed and "load" in timed
    assert budget_note(Config(max_steps=100, max_minutes=2.0), 100).startswith("steps")


class Recording:
    """A real two-tower model whose generate records the torch threads it ran with."""

    def __init__(self):
        self.model = tiny_twotower("llama")
        self.seen: list[tuple[str, int]] = []

    def parameters(self):
        return self.model.parameters()

    def generate(self, prompts, **kwargs):
        self.seen.append((kwargs["mode"], torch.get_num_threads()))
        return self.model.generate(prompts, **kwargs)


def test_ar_is_timed_at_its_own_threads_per_batch_size():
    rec = Recording()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    batch_sweep.AR_THREADS.clear()
    batch_sweep.AR_THREADS.update({1: 1})
    try:
        one, four = [[3, 4, 5]], [[3, 4, 5]] * 4
        for prompts in (one, four):
            for mode in ("ar", "verified"):
                batch_sweep.timed_generate(rec, prompts, mode=mode, max_new_tokens=4)
        batch_sweep.timed_generate(rec, torch.tensor([3, 4, 5]), mode="ar", max_new_tokens=4)
        assert rec.seen == [("ar", 1), ("verified", 2), ("ar", 2), ("verified", 2), ("ar", 1)]
        assert torch.get_num_threads() == 2  # restored after each call
    finally:
        batch_sweep.AR_THREADS.clear()
        torch.set_num_threads(before)


def test_context_targets_need_the_backbones_tokenizer(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from stages.data.tokenizer import build_char_tokenizer

    char = build_char_tokenizer()
    char.save_pretrained(tmp_path / "data_tok")
    vocab = dict(char.get_vocab())
    other = PreTrainedTokenizerFast(tokenizer_object=char.backend_tokenizer)
    other.add_tokens(["<extra_token>"])
    other.save_pretrained(tmp_path / "backbone_tok")
    ref = BackboneRef(model=str(tmp_path / "m"), tokenizer=str(tmp_path / "backbone_tok"))
    check_teacher_vocabulary({"targets": "data"}, str(tmp_path / "data_tok"), ref)  # no teacher: no check
    with pytest.raises(ValueError, match=r"twotower.targets='context_greedy'.*data.tokenizer.*not the backbone's"):
        check_teacher_vocabulary({"targets": "context_greedy"}, str(tmp_path / "data_tok"), ref)
    same = BackboneRef(model=str(tmp_path / "m"), tokenizer=str(tmp_path / "data_tok"))
    check_teacher_vocabulary({"targets": "context_kl"}, str(tmp_path / "data_tok"), same)
    assert len(vocab) + 1 == len(other.get_vocab())


def test_full_depth_variant_overlays_the_smollm2_recipe():
    """The shipped full-depth comparison is an overlay of the SmolLM2 recipe: same data and
    evaluation, the paper's full-depth tower, a step budget (no time budget)."""
    from pipeline.config import load_config

    repo = Path(__file__).resolve().parents[1]
    shallow = load_config(repo / "recipes/smollm2_135m.yaml").resolved
    full = load_config(repo / "recipes/smollm2_135m.yaml",
                       overlays=[repo / "recipes/variants/smollm2_full_depth.yaml"]).resolved
    assert shallow["twotower"]["denoiser_layers"] == 4 and shallow["twotower"]["targets"] == "context_greedy"
    assert full["twotower"]["denoiser_layers"] is None and not full["twotower"]["share_embeddings"]
    assert full["data"] == shallow["data"] and full["evaluate"] == shallow["evaluate"]
    assert full["train"]["max_steps"] < shallow["train"]["max_steps"] and full["train"].get("max_minutes") is None


def test_depth_targets_table_reads_the_pipelines_own_figures():
    import importlib.util

    spec = importlib.util.spec_from_file_location("depth_targets",
                                                  Path(__file__).resolve().parents[1] / "bench/depth_targets.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.cell_overrides("full", "data", None) == ["twotower.denoiser_layers=null", "twotower.targets=data"]
    assert bench.cell_overrides("4", "context_greedy", 300)[-1] == "train.max_steps=300"
    assert bench.cell_overrides("1,3", "data", None)[0] == "twotower.denoiser_layers=[1,3]"
    summary = {"stages": {
        "train_denoiser": {"metrics": {"steps": 300, "tokens_per_second": 512.0, "train_minutes": 4.5,
                                       "denoiser_params": 42e6}},
        "evaluate": {"metrics": {"gamma": 0.7, "tokens_per_forward": 2.5, "relative_quality": 0.91,
                                 "relative_quality_low": 0.85, "relative_quality_high": 0.97, "speedup": 1.6,
                                 "modes": {"1": {"verified": {"speedup": 1.2, "accepted_per_verify": 3.5,
                                                              "relative_quality": 1.0},
                                                 "diffusion": {"speedup": 1.7}},
                                           "4": {"verified": {"speedup": 1.1, "accepted_per_verify": 3.1,
                                                              "relative_quality": 1.0}}}}}}}
    row = {"depth": "4", "targets": "context_greedy", **bench.figures(summary)}
    assert (row["verified_accepted_b1"] == 3.5 and row["verified_speedup_b4"] == 1.1
            and row["diffusion_speedup_b1"] == 1.7)
    table = bench.markdown([row], ["1", "4"])
    assert "| 4 | context_greedy | 300 | 512 | 42.0 | 0.70 | 2.50 | 0.910 [0.850, 0.970] |" in table
    assert table.splitlines()[-1].endswith("| 3.50 | 3.10 | 1.20 | 1.10 |")


def test_auto_ar_threads_are_measured_and_applied():
    """`ar_threads: auto` times AR at every thread count up to the current one and keeps a batch
    size's fastest where it is not the current count; the table it fills is what AR runs at."""
    import time as _time

    rec = Recording()
    tok = type("Tok", (), {"__call__": lambda self, text: {"input_ids": [3, 4, 5]}})()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    real_generate = rec.generate

    def slow_on_two(prompts, **kwargs):  # batch 1 clearly fastest on 1 thread, batch 4 on 2
        if (torch.get_num_threads(), len(prompts)) in ((2, 1), (1, 4)):
            _time.sleep(0.05)
        return real_generate(prompts, **kwargs)

    rec.generate = slow_on_two
    try:
        table = batch_sweep.set_ar_threads("auto", rec, tok, [{"prompt": "x"}] * 4, [1, 4], max_new_tokens=3)
        assert table == {1: 1} and batch_sweep.AR_THREADS == {1: 1}
        assert torch.get_num_threads() == 2
        assert batch_sweep.set_ar_threads({"4": 1}, rec, tok, [], [1], 3) == {4: 1}
    finally:
        batch_sweep.AR_THREADS.clear()
        torch.set_num_threads(before)
