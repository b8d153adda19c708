"""One world-size truth (stages/training/world_size.py): the recipe states `train.num_workers` x
`train.gpus_per_worker` once; `plan`, `validate` and the stage read it through `world_of`.

The plan-against-run agreement on a real fit is in tests/test_stages_chain.py
(`test_plan_and_run_agree_on_the_world`); here: the shipped recipe's plan, the removed key, and the
checks against a stage's reservation and against a real (local, GPU-less) Ray cluster.
"""
from __future__ import annotations

import pytest

from pipeline.cli import main, plan_of
from pipeline.config import ConfigError, load_config
from stages.training.world_size import World, check_cluster, world_of

NANO = "recipes/nemotron_nano.yaml"


def test_nano_plan_reports_the_world_the_run_uses():
    cfg = load_config(NANO)
    world = plan_of(cfg, with_estimate=False)["world"]
    assert (world["num_workers"], world["gpus_per_worker"], world["gpus"]) == (16, 1, 16)
    assert (world["micro_batch"], world["grad_accum"], world["seq_len"]) == (1, 8, 4096)
    assert world["tokens_per_step"] == 16 * 1 * 8 * 4096  # 0.52 M tokens, as the recipe comment says


def test_nano_plan_json_keeps_the_published_counts_and_adds_the_world(capsys):
    assert main(["plan", NANO, "--json"]) == 0
    import json

    plan = json.loads(capsys.readouterr().out)
    summary = plan["estimate"]["summary"]
    assert (summary["params_per_tower_b"], summary["active_per_token_b_without_embeddings"]) == (31.58, 3.23)
    assert summary["world_size"] == summary["train_gpus"] == plan["world"]["world_size"] == 16
    assert summary["tokens_per_step"] == plan["world"]["tokens_per_step"] == 524288


def test_removed_devices_key_names_its_replacement():
    with pytest.raises(ConfigError) as err:
        load_config(NANO, ["train.devices=16"])
    text = str(err.value)
    assert "train.devices" in text and "train.num_workers" in text and "train.gpus_per_worker" in text


def test_one_gpu_process_must_reserve_its_gpu():
    with pytest.raises(ConfigError) as err:
        load_config("recipes/tiny.yaml", ["train.accelerator=gpu"])
    assert "graph.train_denoiser.resources.num_gpus=0" in str(err.value)
    load_config("recipes/tiny.yaml", ["train.accelerator=gpu", "graph.train_denoiser.resources.num_gpus=1"])


def test_a_ray_train_driver_must_not_hold_the_workers_gpus():
    with pytest.raises(ConfigError, match=r"graph.train_denoiser.resources.num_gpus=2: under train.num_workers=16"):
        load_config(NANO, ["graph.train_denoiser.resources.num_gpus=2"])


def test_gpus_per_worker_contradicting_the_accelerator_is_refused():
    with pytest.raises(ConfigError, match=r"train.gpus_per_worker=0 contradicts train.accelerator='gpu'"):
        load_config(NANO, ["train.gpus_per_worker=0"])
    with pytest.raises(ConfigError, match=r"train.gpus_per_worker"):
        load_config(NANO, ["train.gpus_per_worker=2"])  # one device per Lightning process


def test_world_arithmetic_and_cluster_check():
    class Train:
        num_workers, batch_size, grad_accum, accelerator, gpus_per_worker = 2, 4, 3, "cpu", None

    world = world_of(Train(), 64)
    assert (world.world_size, world.gpus, world.distributed, world.tokens_per_step) == (2, 0, True, 2 * 4 * 3 * 64)
    check_cluster(world, {"CPU": 2})
    with pytest.raises(ValueError, match="needs 16 GPUs; the Ray cluster has 8"):
        check_cluster(World(16, 1, 1, 8, 4096), {"GPU": 8.0})


@pytest.mark.ray
def test_validate_checks_the_world_against_a_reachable_cluster(capsys):
    """A real local Ray with no GPU: the Nano recipe's 16 x 1 GPUs cannot run there; tiny can."""
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        assert main(["validate", NANO]) == 2
        assert "needs 16 GPUs; the Ray cluster has 0" in capsys.readouterr().err
        assert main(["validate", "recipes/tiny.yaml"]) == 0
    finally:
        ray.shutdown()


def test_an_overlay_file_restates_the_world_and_errors_name_it(tmp_path, capsys):
    """`--overlay FILE` merges over the recipe, below the overrides: here the hardware of a CPU run
    (2 gloo workers, towers on cpu, no GPU reserved), which the plan then reports."""
    import json

    overlay = tmp_path / "cpu.yaml"
    overlay.write_text("train: {num_workers: 2, gpus_per_worker: 0, accelerator: cpu}\n"
                       "backbone: {context_device: cpu, denoiser_device: cpu}\n"
                       "graph:\n" + "".join(f"  {s}: {{resources: {{num_gpus: 0}}}}\n"
                                            for s in ("calibrate_gamma", "evaluate", "export")))
    assert main(["plan", NANO, "train.grad_accum=2", "--overlay", str(overlay), "--json", "--no-estimate"]) == 0
    world = json.loads(capsys.readouterr().out)["world"]
    assert (world["num_workers"], world["gpus"], world["tokens_per_step"]) == (2, 0, 2 * 1 * 2 * 4096)
    assert main(["validate", NANO, "--overlay", str(overlay)]) == 0
    overlay.write_text("train: {devices: 2}\n")
    assert main(["validate", NANO, "--overlay", str(overlay)]) == 2
    err = capsys.readouterr().err
    assert "train.devices" in err and str(overlay) in err and "train.num_workers" in err


REHEARSAL = "recipes/rehearsal/cpu.yaml"


def test_validate_refuses_a_world_this_machine_cannot_hold_before_any_stage(capsys, monkeypatch):
    """No cluster named: the run would start its own Ray here, so `validate` checks the world against
    this machine (`ray.num_cpus` pins it to 2 cores, as on CI): 3 CPU workers are refused, 2 pass."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = ["validate", NANO, "ray.num_cpus=2"]
    assert main([*args, "train.num_workers=3", "--overlay", REHEARSAL]) == 2
    err = capsys.readouterr().err
    assert "stage 'train_denoiser'" in err and "train.num_workers=3 x 1 CPU needs 3 CPUs; the Ray cluster has 2" in err
    assert main([*args, "--overlay", REHEARSAL]) == 0
    assert main(["validate", NANO]) == 2  # the shipped 16 x 1 GPU world on a machine without them
    assert "needs 16 GPUs" in capsys.readouterr().err


@pytest.mark.ray
def test_run_refuses_the_world_before_the_first_stage(tmp_path, monkeypatch):
    """The same world through `run`: the engine's check against the Ray it started stops it before
    any stage runs (no stage of the run has a status)."""
    import json

    from pipeline.runner import run_pipeline
    from pipeline.state import PipelineError

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(NANO, [f"run.root={tmp_path}/runs", "ray.num_cpus=2", "train.num_workers=3"],
                      overlays=[REHEARSAL])
    with pytest.raises(PipelineError, match="needs 3 CPUs"):
        run_pipeline(cfg, runner="ray", display=False, tracking=False)
    assert not (tmp_path / "runs" / "cache").exists() or not any((tmp_path / "runs" / "cache").iterdir())
    summaries = list((tmp_path / "runs").glob("*/summary.json"))
    for s in summaries:
        assert not any(st.get("status") in ("done", "running") for st in json.loads(s.read_text())["stages"].values())
