"""pretrain_backbone: a few real training steps of a tiny Nemotron-H with every layer kind, a
loadable saved model, resume from a checkpoint, batched greedy decoding, and config errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from stages import prepare_data, pretrain_backbone
from stages.api import StageContext
from stages.pretrain_backbone import Config

TINY = dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
            mamba_num_heads=2, mamba_head_dim=16, ssm_state_size=8, n_routed_experts=2,
            moe_intermediate_size=16, moe_shared_expert_intermediate_size=16, layer_pattern="M*E-",
            batch_size=4, eval_every=2, eval_subset=2, checkpoint_every=2, max_new_tokens=4, num_threads=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("data")
    cfg = prepare_data.Config(tasks=["copy", "add"], train_examples_per_task=30, eval_examples_per_task=3, seq_len=64)
    return prepare_data.run(cfg, {}, StageContext(name="prepare_data", out_dir=root / "out", work_dir=root / "w",
                                                  run_dir=root))


def _ctx(tmp_path: Path, work: str = "work", out: str = "out", events: list | None = None) -> StageContext:
    return StageContext(name="pretrain_backbone", out_dir=tmp_path / out, work_dir=tmp_path / work, run_dir=tmp_path,
                        report=(events.append if events is not None else lambda e: None))


def test_short_run_writes_a_loadable_model_with_every_layer_kind(tmp_path, data):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    events: list = []
    m = pretrain_backbone.run(Config(max_steps=3, **TINY), {"prepare_data": data}, _ctx(tmp_path, events=events))
    path = m["artifacts"]["model"]
    assert (Path(path) / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "nemotron_h"
    assert set(model.config.layers_block_type) == {"linear_attention", "full_attention", "moe", "mlp"}
    assert model.config.chunk_size == 16 and len(tok) == data["vocab_size"]
    assert m["layer_types"] == ["mamba", "attention", "moe", "mlp"]
    assert {f"em/{t}" for t in data["tasks"]} <= set(m["metrics"]) and m["metrics"]["steps"] == 3
    assert 0.0 <= m["metrics"]["em_min"] <= 1.0 and m["params"] == sum(p.numel() for p in model.parameters())
    assert any(e["kind"] == "metrics" and "quick_em_min" in e["metrics"] for e in events)
    assert any(e["kind"] == "progress" for e in events)
    # training changed the weights (the step is real) and the reload is exact
    ids = tok(["copy abc="], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_resume_from_checkpoint(tmp_path, data):
    first = pretrain_backbone.run(Config(max_steps=2, **TINY), {"prepare_data": data}, _ctx(tmp_path, out="a"))
    assert first["metrics"]["resumed_from_step"] == 0
    assert (tmp_path / "work" / "checkpoints" / "last.ckpt").exists()
    # a longer budget on the same work dir continues from step 2 instead of starting over
    second = pretrain_backbone.run(Config(max_steps=4, **TINY), {"prepare_data": data}, _ctx(tmp_path, out="b"))
    assert second["metrics"]["resumed_from_step"] == 2 and second["metrics"]["steps"] == 4


def test_batched_greedy_equals_one_by_one(data):
    import torch
    from transformers import AutoTokenizer, NemotronHForCausalLM

    torch.manual_seed(0)
    cfg = Config(**TINY)
    model = NemotronHForCausalLM(pretrain_backbone.build_config(cfg, data)).eval()
    tok = AutoTokenizer.from_pretrained(data["artifacts"]["tokenizer"])
    prompts = ["copy ab=", "add A1B2+A3B4C5=", "copy abcdefgh="]  # different lengths: left padding
    batched = pretrain_backbone.ar_generate(model, tok, prompts, max_new_tokens=6)
    single = [pretrain_backbone.ar_generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    # and both equal a hand-written greedy loop without cache
    ids = tok([prompts[1]], return_tensors="pt").input_ids
    for _ in range(6):
        with torch.no_grad():
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        if nxt.item() == tok.eos_token_id:
            break
        ids = torch.cat([ids, nxt], dim=1)
    assert tok.decode(ids[0], skip_special_tokens=True)[len(prompts[1]):] == single[1]


def test_lr_schedule_warms_up_then_decays():
    f = pretrain_backbone.lr_lambda(Config(max_steps=100, warmup_steps=10, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) > 0.95 and f(9) > f(5)
    assert f(50) < f(10) and f(100) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        ({"layer_pattern": "M*E"}, r"pretrain.layer_pattern 'M\*E' lacks layer kinds \['mlp'\]"),
        ({"layer_pattern": "M*E-X"}, r"pretrain.layer_pattern: unknown codes \['X'\]"),
        ({"hidden_size": 30}, r"pretrain.hidden_size"),
    ],
)
def test_config_errors(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        pretrain_backbone.validate(Config(**kw))


@pytest.mark.parametrize(("override", "allowed"), [
    ("pretrain.target_em=1.5", "(0, 1]"), ("pretrain.max_steps=-5", "[1, inf)"),
    ("pretrain.batch_size=0", "[1, inf)"), ("pretrain.lr=0", "(0, inf)"), ("pretrain.min_lr_ratio=2", "[0, 1]"),
])
def test_ranges_are_config_errors_before_anything_runs(override, allowed):
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config("recipes/tiny.yaml", [override])
    key = override.split("=")[0]
    assert [p.message for p in err.value.problems if p.key == key] == [
        f"must be in {allowed}, got {override.split('=')[1]}"], str(err.value)


def test_needs_prepare_data(tmp_path):
    with pytest.raises(ValueError, match="needs the prepare_data stage"):
        pretrain_backbone.run(Config(**TINY), {}, _ctx(tmp_path))


def test_nan_gradient_stops_pretraining_at_the_step_keeping_the_last_good_checkpoint(tmp_path, data, monkeypatch):
    from stages.training.checkpoint_io import checkpoint_problem
    from stages.training.finite_guard import FAULT_ENV, NonFiniteError
    from stages.training.optimisation import checkpoint_step

    last = tmp_path / "work" / "checkpoints" / "last.ckpt"
    monkeypatch.setenv(FAULT_ENV, "grad@3")
    with pytest.raises(NonFiniteError, match=rf"gradient norm \(nan\) at optimizer step 3; .*Last good checkpoint: "
                                             rf"{last}\. .*--resume RUN_DIR pretrain\.lr="):
        pretrain_backbone.run(Config(max_steps=4, **TINY), {"prepare_data": data}, _ctx(tmp_path))
    assert checkpoint_step(last) == 2 and checkpoint_problem(last) is None
