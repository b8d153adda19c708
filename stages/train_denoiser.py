"""Stage `train_denoiser`: train the denoiser tower with Lightning (section `train`).

`DenoiserModule` wraps a `TwoTowerForDiffusionLM` built by a model factory (so a distributed runner
can build it on each worker); the stage drives it with a Trainer: fp32 on CPU / bf16-mixed on GPU,
gradient accumulation, linear warmup then cosine decay over the step *or* time budget (whichever
ends first), checkpoints every N steps in `ctx.work_dir` with resume from the last one, a validation
loss plus the ELBO (1/t weighting) on the eval split, Lightning's MLFlowLogger reattached to the
stage's MLflow run, and a progress bar plus `ctx.progress` events.

Only the denoiser tower is saved (`denoiser.safetensors`): the context tower is the backbone, bit for
bit, so `load_trained(manifest)` rebuilds it from the backbone path. `export` writes both towers once.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from stages.api import StageContext

SECTION = "train"
DEPENDS = ("twotower", "adapters", "stages.duplicate_backbone", "stages.train_denoiser")
"""Shared code this stage runs: hashed into its cache key (an edit there reruns the stage)."""



@dataclass
class Config:
    """The `train` section: optimisation of the denoiser tower."""

    max_steps: int = 300
    """Optimizer steps (after gradient accumulation). Training stops at this or `max_minutes`."""
    max_minutes: float | None = None
    """Wall-clock budget in minutes across resumes; null: steps only. The LR schedule follows it."""
    batch_size: int = 16
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `lr` at the end of the cosine decay."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clip; 0 disables."""
    val_every: int = 100
    """Validate every this many micro-batches (loss, ELBO, masked accuracy on the eval split)."""
    val_batches: int = 4
    """Eval micro-batches per validation."""
    checkpoint_every: int = 100
    """Save a resumable checkpoint every this many optimizer steps (in the stage's work dir)."""
    precision: str = "auto"
    """Lightning precision; `auto` is bf16-mixed on GPU and 32-true on CPU."""
    accelerator: str = "auto"
    """Lightning accelerator (`auto`, `cpu`, `gpu`)."""
    devices: int = 1
    """Devices for the Trainer."""
    strategy: str = "auto"
    """Lightning strategy (`auto`, `ddp`, `fsdp`)."""
    num_workers: int = 1
    """Ray Train workers. Above 1 the fit runs through `stages.train_distributed.fit_distributed`
    (one worker per GPU, FSDP on GPU, DDP over gloo on CPU; checkpoints in the stage's work dir on
    shared storage, resumed after a restart)."""
    num_threads: int = 0
    """torch intra-op threads on CPU; 0 leaves torch's default."""
    progress_bar: bool = True
    """Show Lightning's progress bar."""
    layout: str = "auto"
    """Row layout: `block_aligned` re-lays each prompt/answer example as `[pads][prompt][answer]`
    with the answer starting on a block boundary, as decoding sees it (`twotower.data`);
    `packed` keeps prepare_data's packed rows; `auto`: block_aligned when the data has answers."""
    noise_on: str = "answers"
    """Which tokens may be masked and scored: `answers` (the data's `loss_mask`: answer + EOS) or
    `all` (every non-pad token)."""
    fill_after_eos: bool = True
    """block_aligned layout: fill the rest of each answer's last block with EOS, real and scored, so
    the denoiser learns where the answer ends (decoding denoises all B positions of a block; see
    `twotower.data.block_aligned_batch`). False leaves pads there (the answer length is then
    visible to the denoiser in training but not when decoding)."""


@dataclass
class TwoTowerFactory:
    """A picklable recipe for the model: the backbone path + the `TwoTowerConfig` fields.

    Calling it loads the backbone and wraps it with `TwoTowerForDiffusionLM.from_backbone`.
    """

    backbone_path: str
    """Directory of the backbone (AutoModelForCausalLM)."""
    twotower: dict[str, Any]
    """Keyword arguments of `TwoTowerConfig`."""
    dtype: str = "float32"
    """Dtype the backbone is loaded in."""

    def __call__(self):
        from twotower import TwoTowerConfig, TwoTowerForDiffusionLM

        from stages.duplicate_backbone import load_backbone

        backbone, _ = load_backbone(self.backbone_path, self.dtype)
        return TwoTowerForDiffusionLM.from_backbone(backbone, TwoTowerConfig(**self.twotower))


def lr_factor(step: int, warmup_steps: int, progress: float, min_ratio: float) -> float:
    """LR multiplier: linear warmup over `warmup_steps` optimizer steps, times a cosine decay from 1
    to `min_ratio` over `progress` in [0, 1] of the budget (steps or time, whichever is further)."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    cos = min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    return warm * cos


def _module_class():
    """Build the LightningModule class lazily: Lightning takes ~4 s to import."""
    import pytorch_lightning as pl
    import torch

    class DenoiserModule(pl.LightningModule):
        """Lightning wrapper around `TwoTowerForDiffusionLM`.

        Args:
            model_factory: zero-argument callable returning the model (e.g. `TwoTowerFactory`);
                called once in `__init__`, on each worker under a distributed runner.
            cfg: the `train` section (LR, warmup, schedule, budget).
            block_size: the model's block size.
        Only the denoiser's parameters are optimised and checkpointed; the context tower is frozen
        and rebuilt from the backbone on resume.
        """

        def __init__(self, model_factory: Callable[[], Any], cfg: Config, block_size: int):
            super().__init__()
            self.model = model_factory()
            self.cfg = cfg
            self.block_size = block_size
            self.strict_loading = False  # checkpoints omit the frozen context tower
            self.elapsed_before = 0.0  # seconds trained in earlier sessions (resume)
            self.started = time.monotonic()

        # budget and schedule ------------------------------------------------------------------
        def elapsed(self) -> float:
            return self.elapsed_before + time.monotonic() - self.started

        def progress_fraction(self) -> float:
            p = self.global_step / max(1, self.cfg.max_steps)
            if self.cfg.max_minutes:
                p = max(p, self.elapsed() / (60.0 * self.cfg.max_minutes))
            return min(1.0, p)

        def configure_optimizers(self):
            params = [p for p in self.model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                                    betas=(0.9, 0.95))
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: lr_factor(step, self.cfg.warmup_steps, self.progress_fraction(),
                                            self.cfg.min_lr_ratio))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        # steps --------------------------------------------------------------------------------
        def _forward(self, batch, generator=None):
            """Training forward on a (ids, attention_mask, loss_mask) batch; pads are no-ops."""
            x, attn, loss_mask = batch
            return self.model(x, attention_mask=attn, loss_mask=loss_mask, generator=generator)

        def training_step(self, batch, batch_idx):
            out = self._forward(batch)
            self.log("train/loss", out.loss, prog_bar=True)
            if getattr(out, "masked_accuracy", None) is not None:
                self.log("train/masked_acc", out.masked_accuracy)
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
            if self.cfg.max_minutes and self.elapsed() >= 60.0 * self.cfg.max_minutes:
                self.trainer.should_stop = True
            return out.loss

        def validation_step(self, batch, batch_idx):
            x = batch[0]
            out = self._forward(batch, torch.Generator().manual_seed(batch_idx))  # same noise each time
            self.log("val/loss", out.loss, prog_bar=True, batch_size=x.shape[0])
            if getattr(out, "masked_accuracy", None) is not None:
                self.log("val/masked_acc", out.masked_accuracy, batch_size=x.shape[0])
            self.log("val/elbo", out.elbo, batch_size=x.shape[0])  # 1/t-weighted, per maskable token

        # checkpoints: denoiser only ----------------------------------------------------------
        def on_save_checkpoint(self, checkpoint):
            sd = checkpoint["state_dict"]
            for k in [k for k in sd if k.startswith("model.context_tower.")]:
                del sd[k]
            checkpoint["elapsed_seconds"] = self.elapsed()

        def on_load_checkpoint(self, checkpoint):
            self.elapsed_before = float(checkpoint.get("elapsed_seconds", 0.0))
            self.started = time.monotonic()

    return DenoiserModule


_CLASS: type | None = None


def __getattr__(name: str):
    # `stages.train_denoiser.DenoiserModule` resolves lazily (PEP 562) to keep imports light.
    global _CLASS
    if name == "DenoiserModule":
        if _CLASS is None:
            _CLASS = _module_class()
        return _CLASS
    raise AttributeError(name)


def _progress_callback(ctx: StageContext, total: int):
    import pytorch_lightning as pl

    class _Progress(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step % 5 == 0 or step == total:
                ctx.progress(step, total, f"loss {float(outputs['loss']):.3f}")

    return _Progress()


def load_tokens(path: str, key_name: str) -> tuple[Any, Any]:
    """(`input_ids` [N, L], `loss_mask` [N, L]) of a prepare_data token file; clear error when empty.

    A file without `loss_mask` gets an all-ones one (every token may be noised)."""
    import torch
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise ValueError(f"{key_name}: token file {path} does not exist")
    tensors = load_file(path)
    ids = tensors.get("input_ids")
    if ids is None:
        raise ValueError(f"{key_name}: {path} has no `input_ids` tensor")
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise ValueError(f"{key_name}: {path} is empty (shape {tuple(ids.shape)})")
    mask = tensors.get("loss_mask")
    return ids.long(), (torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool())


def right_pad_mask(ids, pad_id: int):
    """[N, L] bool: everything up to each row's last non-pad token (pad may equal EOS)."""
    return (ids != pad_id).flip(1).cumsum(1).flip(1) > 0


def split_examples(ids, loss_mask, pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Packed rows -> (prompts, answers): each example is a run of prompt tokens (loss_mask 0,
    not pad) followed by its answer run (loss_mask 1, EOS included)."""
    prompts, answers = [], []
    for row, lm in zip(ids.tolist(), loss_mask.tolist()):
        i, n = 0, len(row)
        while i < n:
            j = i
            while j < n and not lm[j] and row[j] != pad_id:
                j += 1
            k = j
            while k < n and lm[k]:
                k += 1
            if k > j and j > i:
                prompts.append(row[i:j])
                answers.append(row[j:k])
            i = max(k, i + 1)
    return prompts, answers


def build_rows(tokens: tuple[Any, Any], layout: str, noise_on: str, block_size: int, pad_id: int,
               fill_id: int | None = None):
    """(ids, attention_mask, loss_mask) tensors for training, in the configured layout
    (`fill_id`: block_aligned rows complete each answer's last block with it)."""
    from twotower.data import block_aligned_batch

    ids, lm = tokens
    real = right_pad_mask(ids, pad_id)
    has_answers = bool((real & ~lm).any())
    if layout == "auto":
        layout = "block_aligned" if has_answers else "packed"
    if layout == "block_aligned":
        prompts, answers = split_examples(ids, lm, pad_id)
        if not prompts:
            raise ValueError("train.layout=block_aligned: the token file has no prompt/answer examples "
                             "(loss_mask marks no answers); use train.layout=packed")
        rows = block_aligned_batch(prompts, answers, block_size, pad_id, fill_id=fill_id)
        attn = rows["attention_mask"].bool()
        loss = rows["loss_mask"].bool() if noise_on == "answers" else attn
        return rows["input_ids"], attn, loss
    return ids, real, (lm & real) if noise_on == "answers" else real


def check_block_size(block_size: int, seq_len: int) -> None:
    """A block size must divide the packed sequence length (and leave room for a denoised token)."""
    if block_size < 2:
        raise ValueError(f"twotower.block_size={block_size}: must be at least 2")
    if seq_len % block_size or seq_len < block_size:
        raise ValueError(f"twotower.block_size={block_size} does not fit data.seq_len={seq_len}: "
                         "the sequence length must be a multiple of the block size")


def bucket_batches(attn, block_size: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Row indices grouped into batches of rows with the same real-block pattern, shuffled.

    Block-aligned rows differ in how many prompt/answer blocks they use; batching alike rows lets
    `trim_blocks` drop the all-pad blocks, so no step computes on padding blocks."""
    import torch

    n_rows, length = attn.shape
    sig = attn.view(n_rows, length // block_size, block_size).any(-1)
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(map(tuple, sig.tolist())):
        groups.setdefault(key, []).append(i)
    batches = []
    for rows in groups.values():
        order = [rows[j] for j in torch.randperm(len(rows), generator=g).tolist()]
        batches += [order[k: k + batch_size] for k in range(0, len(order), batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]


class BucketSampler:
    """A batch sampler over `bucket_batches`, reshuffled every epoch (deterministic in the seed)."""

    def __init__(self, attn, block_size: int, batch_size: int, seed: int):
        self.attn, self.block_size, self.batch_size, self.seed, self.epoch = attn, block_size, batch_size, seed, 0
        self.n = len(bucket_batches(attn, block_size, batch_size, seed, 0))

    def __iter__(self):
        batches = bucket_batches(self.attn, self.block_size, self.batch_size, self.seed, self.epoch)
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        return self.n


def trim_blocks(block_size: int):
    """A collate function stacking (ids, attn, loss) rows and dropping blocks that are padding in
    every row of the batch (pads are exact no-ops, so the result is unchanged, only cheaper)."""
    import torch

    def collate(items):
        ids, attn, loss = (torch.stack(t) for t in zip(*items))
        b, length = ids.shape
        keep = attn.view(b, length // block_size, block_size).any(-1).any(0)  # [n_blocks]
        cols = keep.repeat_interleave(block_size)
        return ids[:, cols], attn[:, cols], loss[:, cols]

    return collate


def _logger(ctx: StageContext):
    if ctx.tracking_uri and ctx.mlflow_run_id:
        from pytorch_lightning.loggers import MLFlowLogger

        return MLFlowLogger(tracking_uri=ctx.tracking_uri, run_id=ctx.mlflow_run_id)
    from pytorch_lightning.loggers import CSVLogger

    return CSVLogger(str(Path(ctx.work_dir) / "logs"), name="train_denoiser")


def fit(cfg: Config, factory: TwoTowerFactory, block_size: int, train_ids, val_ids,
        ctx: StageContext):
    """Train with resume from `ctx.work_dir/checkpoints/last.ckpt`; return (module, trainer, secs)."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
    from torch.utils.data import DataLoader, TensorDataset

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    pl.seed_everything(ctx.seed, workers=True, verbose=False)
    gpu = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16-mixed" if gpu else "32-true")
    module = __getattr__("DenoiserModule")(factory, cfg, block_size)
    # (ids, attn, loss) rows; alike rows batched together and all-pad blocks trimmed per batch
    collate = trim_blocks(block_size)
    train_dl = DataLoader(TensorDataset(*train_ids), collate_fn=collate,
                          batch_sampler=BucketSampler(train_ids[1], block_size, cfg.batch_size, ctx.seed))
    val_dl = DataLoader(TensorDataset(*val_ids), batch_size=cfg.batch_size, collate_fn=collate)
    ckpt_dir = Path(ctx.work_dir) / "checkpoints"
    callbacks = [ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=cfg.checkpoint_every,
                                 save_last=True, save_top_k=1, save_on_exception=False)
                 if _accepts_save_on_exception() else
                 ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=cfg.checkpoint_every,
                                 save_last=True, save_top_k=1),
                 _progress_callback(ctx, cfg.max_steps)]
    if cfg.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, cfg.max_steps // 50)))
    n_train_batches = max(1, len(train_dl))
    trainer = pl.Trainer(
        max_steps=cfg.max_steps, max_epochs=-1, accelerator=cfg.accelerator, devices=cfg.devices,
        strategy=cfg.strategy, precision=precision, accumulate_grad_batches=cfg.grad_accum,
        gradient_clip_val=cfg.grad_clip or None, logger=_logger(ctx), callbacks=callbacks,
        val_check_interval=min(cfg.val_every, n_train_batches) if cfg.val_every else None,
        check_val_every_n_epoch=None if cfg.val_every else 1,
        limit_val_batches=cfg.val_batches, num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(10, cfg.max_steps // 10)),
        enable_progress_bar=cfg.progress_bar, enable_model_summary=False,
        default_root_dir=str(ctx.work_dir))
    last = ckpt_dir / "last.ckpt"
    module.resumed_from_step = _checkpoint_step(last)
    t0, cpu0 = time.monotonic(), time.process_time()
    trainer.fit(module, train_dl, val_dl, ckpt_path=str(last) if last.exists() else None)
    seconds = time.monotonic() - t0
    module.cpu_seconds = time.process_time() - cpu0  # all threads: a contention-free cost estimate
    if cfg.val_every:  # a final validation on the finished model
        trainer.validate(module, val_dl, verbose=False)
    return module, trainer, seconds


@dataclass
class RowLoaders:
    """Picklable `(train, val)` loader factory for Ray Train workers (Lightning adds the
    DistributedSampler that shards the rows across workers)."""

    train_ids: tuple
    val_ids: tuple
    block_size: int
    batch_size: int

    def __call__(self):
        from torch.utils.data import DataLoader, TensorDataset

        collate = trim_blocks(self.block_size)
        return (DataLoader(TensorDataset(*self.train_ids), batch_size=self.batch_size, shuffle=True,
                           collate_fn=collate, drop_last=True),
                DataLoader(TensorDataset(*self.val_ids), batch_size=self.batch_size, collate_fn=collate))


def fit_on_workers(cfg: Config, factory: TwoTowerFactory, block_size: int, train_ids, val_ids,
                   ctx: StageContext):
    """`fit` across `cfg.num_workers` Ray Train workers; returns (module with the trained weights
    loaded, metrics of the last step report, seconds)."""
    from stages.train_distributed import LazyFactory, config_from_train, fit_distributed

    dist = config_from_train(cfg, storage_path=str(Path(ctx.work_dir).resolve()), name="distributed",
                             seed=ctx.seed)
    make_module = LazyFactory("stages.train_denoiser:DenoiserModule", (factory, cfg, block_size))

    def on_report(report: dict) -> None:
        ctx.progress(report.get("step", 0), cfg.max_steps, "distributed")
        ctx.log_metrics({k.replace("/", "_"): float(v) for k, v in report.items() if k != "step"},
                        step=int(report.get("step", 0)))

    t0 = time.monotonic()
    result = fit_distributed(make_module, RowLoaders(train_ids, val_ids, block_size, cfg.batch_size),
                             dist, on_report=on_report)
    seconds = time.monotonic() - t0
    module = make_module()
    module.load_state_dict(result.load_state_dict(), strict=False)  # the frozen tower is not saved
    return module, dict(result.metrics), seconds


def _checkpoint_step(path: Path) -> int:
    """The optimizer step a resumable checkpoint was written at (0 when there is none)."""
    if not path.exists():
        return 0
    import torch

    return int(torch.load(str(path), map_location="cpu", weights_only=False).get("global_step", 0))


def _accepts_save_on_exception() -> bool:
    import inspect

    from pytorch_lightning.callbacks import ModelCheckpoint

    return "save_on_exception" in inspect.signature(ModelCheckpoint.__init__).parameters


def save_denoiser(model, path: Path) -> None:
    """Write the denoiser tower's state dict (shared tensors cloned apart) as safetensors."""
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.denoiser.state_dict().items()}
    save_file(sd, str(path))


def load_trained(train_manifest: dict, device: str = "cpu"):
    """Rebuild the trained model from a train_denoiser manifest: (model, tokenizer), eval mode."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    art = train_manifest["artifacts"]
    factory = TwoTowerFactory(art["model"], train_manifest["twotower"], train_manifest.get("dtype", "float32"))
    model = factory()
    missing, unexpected = model.denoiser.load_state_dict(load_file(art["denoiser"]), strict=False)
    if missing or unexpected:
        raise ValueError(f"{art['denoiser']}: does not match the denoiser "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.to(device).eval()
    return model, AutoTokenizer.from_pretrained(art["tokenizer"])


def run(cfg: Config, inputs: dict[str, dict], ctx: StageContext) -> dict:
    """Train the denoiser; write `denoiser.safetensors`; return losses, ELBO and throughput."""
    data, attach = inputs["prepare_data"], inputs["attach_conditioning"]
    tt = dict(attach["twotower"])
    block_size = int(tt.get("block_size", 16))
    train_ids = load_tokens(data["artifacts"]["train_tokens"], "prepare_data.artifacts.train_tokens")
    val_ids = load_tokens(data["artifacts"]["eval_tokens"], "prepare_data.artifacts.eval_tokens")
    check_block_size(block_size, int(train_ids[0].shape[1]))
    if cfg.max_steps < 1:
        raise ValueError(f"train.max_steps={cfg.max_steps}: must be at least 1")
    if cfg.noise_on not in ("all", "answers"):
        raise ValueError(f"train.noise_on={cfg.noise_on!r}: expected 'all' or 'answers'")
    if cfg.layout not in ("auto", "packed", "block_aligned"):
        raise ValueError(f"train.layout={cfg.layout!r}: expected 'auto', 'packed' or 'block_aligned'")
    pad_id = int(data.get("pad_token_id", 0) or 0)
    fill_id = data.get("eos_token_id") if cfg.fill_after_eos else None
    train_ids = build_rows(train_ids, cfg.layout, cfg.noise_on, block_size, pad_id, fill_id)
    val_ids = build_rows(val_ids, cfg.layout, cfg.noise_on, block_size, pad_id, fill_id)
    factory = TwoTowerFactory(attach["artifacts"]["model"], tt, attach.get("dtype", "float32"))
    if cfg.num_workers > 1:
        module, logged, seconds = fit_on_workers(cfg, factory, block_size, train_ids, val_ids, ctx)
        steps = int(logged.pop("step", cfg.max_steps))
        timing = {"train_minutes": seconds / 60.0, "num_workers": cfg.num_workers}
    else:
        module, trainer, seconds = fit(cfg, factory, block_size, train_ids, val_ids, ctx)
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        steps = int(trainer.global_step)
        timing = {"resumed_from_step": module.resumed_from_step, "train_minutes": module.elapsed() / 60.0,
                  "train_cpu_minutes": module.cpu_seconds / 60.0}
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_denoiser(module.model, out / "denoiser.safetensors")
    tokens = steps * cfg.batch_size * cfg.grad_accum * int(train_ids[0].shape[1]) * cfg.num_workers
    metrics_layout = {"train_rows": int(train_ids[0].shape[0]), "row_len": int(train_ids[0].shape[1])}
    metrics = {"steps": steps, **timing, "tokens_per_second": tokens / max(seconds, 1e-9),
               **metrics_layout, **{k.replace("/", "_"): float(v) for k, v in logged.items()
                                    if isinstance(v, (int, float))}}
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=1))
    return {"metrics": metrics,
            "artifacts": {"denoiser": ctx.artifact_path("denoiser.safetensors"),
                          "model": attach["artifacts"]["model"],
                          "tokenizer": attach["artifacts"].get("tokenizer", data["artifacts"]["tokenizer"])},
            "twotower": tt, "dtype": attach.get("dtype", "float32"), "train_config": asdict(cfg)}
