"""The distributed training path (Ray Train + Lightning) on the Nemotron-3-Nano layer pattern.

The model is `TwoTowerForDiffusionLM` over the real 52-layer Nano pattern (23 Mamba-2, 23 MoE,
6 attention) at a tiny width. Two CPU workers (DDP over gloo) under a local Ray each take half of
the global batch; the first step's loss, and the loss after one optimizer step, must equal a
single-process run on the whole batch. Then a second `fit_distributed` with the same name resumes
from the checkpoint on storage. The sharded path (FSDP2) runs the same on 2 CPU workers over gloo,
with a sharded checkpoint and its resume; on two GPUs too when present.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from planning.estimate import SHIPPED_BACKBONES

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SEQ, BATCH, LR = 16, 4, 0.05


def tiny_nano_config():
    """The shipped Nano config, every width shrunk, the 52-layer hybrid pattern kept."""
    from transformers import AutoConfig

    data = {k: v for k, v in json.loads((SHIPPED_BACKBONES / "nemotron-3-nano-30b-a3b.json").read_text()).items()
            if not k.startswith("_")}
    data.update(hidden_size=16, vocab_size=64, n_routed_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=8, moe_shared_expert_intermediate_size=8, intermediate_size=8,
                mamba_num_heads=2, mamba_head_dim=8, ssm_state_size=4, n_groups=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, chunk_size=16,
                max_position_embeddings=64)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def make_data(per_worker: int = BATCH // 2):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(tokens()), batch_size=per_worker, shuffle=False)


@pytest.fixture(scope="module")
def local_ray():
    import sys

    import ray
    import ray.cloudpickle

    # tests/ is not importable on the workers: ship this module's factories by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def test_tiny_config_keeps_the_nano_pattern():
    from twotower.sizing import build_on_meta, family_facts, layer_kinds

    config = tiny_nano_config()
    assert config.num_hidden_layers == 52
    assert layer_kinds(family_facts(build_on_meta(config))) == {"attention": 6, "mamba": 23, "moe": 23, "mlp": 0}


def test_bad_config_names_the_key():
    from stages.training.train_distributed import DistributedConfig

    with pytest.raises(ValueError, match="train.strategy"):
        DistributedConfig(storage_path="/tmp/x", strategy="zero3")


BLOCK = 8


def fixed_noise(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same mask and times for every row: each half of the batch masks as many positions,
    so the mean over masked positions of the whole batch is the mean of the two halves' means."""
    g = torch.Generator().manual_seed(2)
    n = SEQ // BLOCK
    mask = torch.rand(1, SEQ, generator=g) < 0.5
    mask.view(1, n, BLOCK)[..., 0] = False  # position 0 of a block is the AR token: never masked
    mask.view(1, n, BLOCK)[..., 1] = True  # at least one per block
    t = torch.rand(1, n, generator=g) * 0.9 + 0.1
    return mask.expand(batch, SEQ), t.expand(batch, n)


def make_twotower_module():
    import pytorch_lightning as pl
    from transformers import AutoModelForCausalLM

    from twotower import TwoTowerConfig, TwoTowerForDiffusionLM

    class TwoTowerLM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            backbone = AutoModelForCausalLM.from_config(tiny_nano_config(), dtype=torch.float32)
            self.model = TwoTowerForDiffusionLM.from_backbone(backbone, TwoTowerConfig(block_size=BLOCK))

        def training_step(self, batch, batch_idx):
            (x,) = batch
            mask, t = fixed_noise(x.shape[0])
            loss = self.model(x, noise_mask=mask.to(x.device), t=t.to(x.device)).loss
            self.log("loss", loss, sync_dist=True, on_step=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=LR)

    return TwoTowerLM()


def single_process_twotower_losses(steps: int) -> list[float]:
    module = make_twotower_module()
    opt = module.configure_optimizers()
    x = tokens()
    mask, t = fixed_noise(BATCH)
    out = []
    for _ in range(steps):
        loss = module.model(x, noise_mask=mask, t=t).loss
        out.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return out


def test_two_workers_match_single_process_and_resume(local_ray, tmp_path):
    """2 CPU workers (DDP over gloo), each on half the batch: the two-tower training loss of step 1,
    and of step 2 after one optimizer step, equal the single-process run on the whole batch. A
    second fit under the same name resumes from the checkpoint on storage and does step 3."""
    from stages.training.train_distributed import DistributedConfig, fit_distributed

    expected = single_process_twotower_losses(3)
    cfg = DistributedConfig(storage_path=str(tmp_path), name="nano-tiny", num_workers=2, strategy="ddp",
                            max_steps=2, report_every=1, checkpoint_every=2)
    live: list[dict] = []
    first = fit_distributed(make_twotower_module, make_data, cfg, on_report=live.append)
    assert [r["step"] for r in first.history] == [1, 2]  # step-based reports
    assert live == first.history  # followed live by the driver, e.g. for ctx.progress
    assert [r["loss"] for r in first.history] == pytest.approx(expected[:2], abs=1e-5)
    assert first.checkpoint_path is not None and first.checkpoint_path.startswith(str(tmp_path))

    more = DistributedConfig(**{**cfg.__dict__, "max_steps": 3})
    second = fit_distributed(make_twotower_module, make_data, more)
    assert [r["step"] for r in second.history] == [1, 2, 3]  # resumed at 2, one more step
    assert second.history[-1]["loss"] == pytest.approx(expected[2], abs=1e-5)
    state = second.load_state_dict()
    assert any(k.startswith("model.denoiser.") for k in state)


def test_fsdp2_on_two_cpu_workers_matches_single_process_and_resumes_from_shards(local_ray, tmp_path):
    """The sharded path the Nano recipe uses (FSDP2: `fully_shard` on the MoE/MLP units and the
    root), on 2 CPU workers over gloo: the losses equal the single-process run, the checkpoint on
    storage is sharded (one file per rank), a second fit resumes from it (weights and optimizer
    state) and does step 3 as the single process does, and the shards gather into one state dict."""
    from stages.training.train_distributed import DistributedConfig, fit_distributed

    expected = single_process_twotower_losses(3)
    cfg = DistributedConfig(storage_path=str(tmp_path), name="nano-fsdp2", num_workers=2, strategy="fsdp",
                            max_steps=2, report_every=1, checkpoint_every=2)
    first = fit_distributed(make_twotower_module, make_data, cfg)
    assert [r["loss"] for r in first.history] == pytest.approx(expected[:2], abs=1e-5)
    shards = sorted(p.name for p in (Path(first.checkpoint_path) / "checkpoint.ckpt").iterdir())
    assert [s for s in shards if s.endswith(".distcp")] == ["__0_0.distcp", "__1_0.distcp"], shards
    more = DistributedConfig(**{**cfg.__dict__, "max_steps": 3})
    second = fit_distributed(make_twotower_module, make_data, more)
    assert [r["step"] for r in second.history] == [1, 2, 3]
    assert second.history[-1]["loss"] == pytest.approx(expected[2], abs=1e-5)
    state = second.load_state_dict()
    reference = make_twotower_module().state_dict()
    assert set(state) >= {k for k in reference if k.startswith("model.denoiser.")}
    assert all(state[k].shape == reference[k].shape for k in reference if k in state)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two GPUs (FSDP2 over NCCL; the CPU test above covers gloo)")
def test_fsdp_two_gpus_match_single_process(tmp_path):
    import ray

    from stages.training.train_distributed import DistributedConfig, fit_distributed

    expected = single_process_twotower_losses(2)
    cfg = DistributedConfig(storage_path=str(tmp_path), name="twotower-fsdp", num_workers=2, use_gpu=True,
                            strategy="fsdp", precision="32-true", max_steps=2, report_every=1, checkpoint_every=2)
    try:
        result = fit_distributed(make_twotower_module, make_data, cfg)
    finally:
        ray.shutdown()
    assert [r["loss"] for r in result.history] == pytest.approx(expected, abs=1e-4)


def test_lazy_factory_and_train_section_mapping():
    import pickle

    from stages.training.train_distributed import LazyFactory, config_from_train

    make = pickle.loads(pickle.dumps(LazyFactory("planning.training:TrainShape", (8,), {"seq_len": 32})))
    assert make().num_gpus == 8 and make().seq_len == 32
    with pytest.raises(ValueError, match="package.module:attribute"):
        LazyFactory("twotower.sizing")()

    class Train:  # the fields of train_denoiser's `train` section that the runner reads
        num_workers, accelerator, strategy, precision = 16, "gpu", "fsdp", "bf16-mixed"
        max_steps, grad_accum, grad_clip, checkpoint_every = 2000, 8, 1.0, 500

    cfg = config_from_train(Train(), storage_path="/shared/runs", name="nano")
    assert (cfg.num_workers, cfg.use_gpu, cfg.strategy, cfg.max_steps, cfg.grad_accum) == (16, True, "fsdp", 2000, 8)
    Train.accelerator, Train.strategy = "cpu", "auto"
    assert config_from_train(Train(), storage_path="/tmp", name="x", num_workers=2).strategy == "ddp"


def tiny_twotower():
    from transformers import AutoModelForCausalLM

    from twotower import TwoTowerConfig, TwoTowerForDiffusionLM

    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(tiny_nano_config(), dtype=torch.float32)
    return TwoTowerForDiffusionLM.from_backbone(backbone, TwoTowerConfig(block_size=BLOCK))


def denoiser_rows():
    from torch.utils.data import DataLoader, TensorDataset

    x = tokens()
    ones = torch.ones_like(x, dtype=torch.bool)
    return DataLoader(TensorDataset(x, ones, ones), batch_size=BATCH // 2, shuffle=False)


def test_train_denoiser_module_under_the_runner(local_ray, tmp_path):
    """`train_denoiser`'s own DenoiserModule, built on each worker through LazyFactory."""
    from stages.train_denoiser import Config as TrainConfig
    from stages.training.train_distributed import LazyFactory, config_from_train, fit_distributed

    train = TrainConfig(max_steps=2, batch_size=BATCH // 2, checkpoint_every=2, accelerator="cpu",
                        warmup_steps=1, progress_bar=False)
    cfg = config_from_train(train, storage_path=str(tmp_path), name="denoiser", num_workers=2)
    make_module = LazyFactory("stages.training.denoiser_module:DenoiserModule", (tiny_twotower, train, BLOCK))
    result = fit_distributed(make_module, denoiser_rows, cfg)
    assert result.history[-1]["step"] == 2  # report_every = min(10, checkpoint_every)
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in result.history)
    state = result.load_state_dict()
    assert any(k.startswith("model.denoiser.") for k in state)
    assert not any(k.startswith("model.context_tower.") for k in state)  # the frozen tower is not saved


def test_fsdp_units_are_modules_whose_forward_is_called():
    """The two-tower walk calls MoE mixers as modules but Mamba/attention projections piecewise:
    only the former can be FSDP units. A plain HF model's units are its decoder layers."""
    from transformers import AutoModelForCausalLM

    from stages.training.train_distributed import layer_classes

    assert {c.__name__ for c in layer_classes(tiny_twotower())} == {"NemotronHMoE"}
    plain = AutoModelForCausalLM.from_config(tiny_nano_config())
    assert {c.__name__ for c in layer_classes(plain)} == {"NemotronHBlock"}
    assert {c.__name__ for c in layer_classes(plain, ("NemotronHMoE",))} == {"NemotronHMoE"}
    with pytest.raises(ValueError, match="wrap_layer_classes"):
        layer_classes(plain, ("NoSuchLayer",))


def test_report_tail_follows_new_complete_lines(tmp_path):
    import time

    from stages.training.train_distributed import REPORTS_FILE, _ReportTail

    path = tmp_path / REPORTS_FILE
    path.write_text(json.dumps({"step": 0}) + "\n")  # from an earlier session: not replayed
    got: list[dict] = []
    with _ReportTail(str(tmp_path), got.append, interval_s=0.02):
        with open(path, "a") as f:
            f.write('{"step": 1}\n{"step":')  # a line still being written is not read
            f.flush()
            time.sleep(0.1)
            assert got == [{"step": 1}]
            f.write(" 2}\n")
    assert got == [{"step": 1}, {"step": 2}]
