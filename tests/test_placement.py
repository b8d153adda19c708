"""Tower placement applied (twotower/devices.py): `backbone.context_device` / `denoiser_device`
travel in the `BackboneRef` to every decoding stage, which places the towers with
`twotower.place_towers_on_devices`; `pipeline generate` takes `--context-device/--denoiser-device`.

Both towers on `cpu` run the two-device code path (the towers are placed separately, prompts go to
the context tower's device, the export's reload check places its copy where the original is) on a
real tiny backbone through duplicate -> ... -> export. GPU indices are checked against the GPUs a
stage reserves at config time, and against the GPUs the process sees at run time.
"""
from __future__ import annotations

import pytest
import torch
from test_stages_fixtures import BLOCK, make_ctx, tiny_backbone, tiny_data

from pipeline.config import ConfigError, load_config
from stages import attach_conditioning as A
from stages import calibrate_gamma as C
from stages import duplicate_backbone as D
from stages import evaluate as E
from stages import export as X
from stages import freeze_context as F
from stages import train_denoiser as T
from stages.backbones.loading import load_trained
from twotower.devices import check_reserved, resolve_devices

NANO = "recipes/nemotron_nano.yaml"
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the error of a GPU-less process")


@pytest.fixture(scope="module")
def placed(tmp_path_factory):
    """The decoding stages on a model whose recipe places both towers on cpu explicitly."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("placed")
    bb = tiny_backbone(root / "backbone")
    m = {"prepare_data": tiny_data(root / "data", bb), "pretrain_backbone": {"artifacts": {"model": str(bb)}}}
    m["duplicate_backbone"] = D.run(D.Config(context_device="cpu", denoiser_device="cpu"), m, make_ctx(root, "dup"))
    m["freeze_context"] = F.run(F.Config(), {"duplicate_backbone": m["duplicate_backbone"]}, make_ctx(root, "fr"))
    m["attach_conditioning"] = A.run(A.Config(block_size=BLOCK), {"freeze_context": m["freeze_context"]},
                                     make_ctx(root, "attach"))
    m["train_denoiser"] = T.run(T.Config(max_steps=2, batch_size=8, val_every=0, val_batches=0, progress_bar=False,
                                         num_threads=1), m, make_ctx(root, "train"))
    m["calibrate_gamma"] = C.run(C.Config(gammas=[0.9], prompts_per_task=1, repeats=1, max_new_tokens=8),
                                 m, make_ctx(root, "calibrate"))
    m["evaluate"] = E.run(E.Config(prompts_per_task=1, repeats=1, max_new_tokens=8), m, make_ctx(root, "evaluate"))
    m["export"] = X.run(X.Config(verify_prompts=1, max_new_tokens=8), m, make_ctx(root, "export"))
    return m


def test_the_recipe_placement_reaches_every_decoding_stage(placed):
    ref = placed["train_denoiser"]["backbone"]
    assert (ref["context_device"], ref["denoiser_device"]) == ("cpu", "cpu")
    for stage in ("calibrate_gamma", "evaluate", "export"):
        assert placed[stage]["placement"] == {"context_tower": "cpu", "denoiser": "cpu"}, stage
    x = placed["export"]["metrics"]  # the reload, placed like the original, decodes and scores the same
    assert x["mock_ar_equals_ar"] == 1.0 and x["reload_max_abs_logit_diff"] == 0.0


def test_placed_towers_decode_as_the_unplaced_model(placed):
    model, tok = load_trained(placed["train_denoiser"])  # cpu / cpu from the manifest
    ids = torch.tensor([tok("copy abc=")["input_ids"]])
    placed_out = model.generate(ids, mode="diffusion", gamma=0.9, max_new_tokens=8).sequences
    plain, _ = load_trained(placed["train_denoiser"], "auto", "auto")
    assert torch.equal(placed_out, plain.generate(ids, mode="diffusion", gamma=0.9, max_new_tokens=8).sequences)


@CPU_ONLY
def test_a_gpu_the_process_lacks_is_an_error_naming_the_key(placed, capsys):
    with pytest.raises(ValueError, match=r"backbone.denoiser_device='cuda:1': this process sees 0 GPU"):
        load_trained(placed["train_denoiser"], "cpu", "cuda:1")
    from pipeline.generate import main

    path = placed["export"]["metrics"]["path"]
    assert main([path, "--prompt", "copy ab=", "--context-device", "cuda:0", "--max-new-tokens", "4"]) == 2
    assert "--context-device='cuda:0': this process sees 0 GPU" in capsys.readouterr().err
    assert main([path, "--prompt", "copy ab=", "--denoiser-device", "gpu7"]) == 2
    assert "--denoiser-device 'gpu7'" in capsys.readouterr().err


def test_generate_places_both_towers_on_cpu(placed, capsys):
    from pipeline.generate import main

    path = placed["export"]["metrics"]["path"]
    args = [path, "--prompt", "copy ab=", "--mode", "ar", "--max-new-tokens", "6"]
    assert main(args) == 0
    default = capsys.readouterr().out
    assert main(args + ["--context-device", "cpu", "--denoiser-device", "cpu"]) == 0
    assert capsys.readouterr().out == default


def test_auto_resolves_by_visible_gpus():
    assert resolve_devices("auto", "auto", 0) == ("cpu", "cpu")
    assert resolve_devices("auto", "auto", 1) == ("cuda:0", "cuda:0")
    assert resolve_devices("auto", "auto", 2) == ("cuda:0", "cuda:1")
    assert resolve_devices("cpu", "auto", 2) == ("cpu", "cuda:1")


def test_config_time_check_against_each_stages_reserved_gpus():
    load_config(NANO)  # calibrate and evaluate reserve 2 GPUs: cuda:0 and cuda:1 fit
    for stage in ("calibrate_gamma", "evaluate"):
        with pytest.raises(ConfigError) as err:
            load_config(NANO, [f"graph.{stage}.resources.num_gpus=1"])
        assert (f"backbone.denoiser_device='cuda:1' needs 2 GPU(s) but graph.{stage}.resources.num_gpus=1"
                in str(err.value))
    with pytest.raises(ConfigError, match=r"backbone.context_device='cuda:0' needs 1 GPU\(s\) but "
                                          r"graph.export.resources.num_gpus=0"):
        load_config(NANO, ["graph.export.resources.num_gpus=0"])
    load_config(NANO, ["backbone.context_device=cpu", "backbone.denoiser_device=cpu"] +
                [f"graph.{s}.resources.num_gpus=0" for s in ("calibrate_gamma", "evaluate")])
    with pytest.raises(ValueError, match="backbone.context_device='gpu'"):
        check_reserved({"context_device": "gpu"}, 2, "evaluate")
