"""Stage `train_denoiser`: train the denoiser tower with Lightning (section `train`).

The stage reads the data's token files, lays them out as training rows (`stages.data.rows`), builds the
two-tower model from the backbone reference and the `twotower` section that `attach_conditioning`
verified (`stages.backbones.loading.TwoTowerFactory`), fits `stages.training.denoiser_module.DenoiserModule` in this
process or on Ray Train workers (`stages.training.denoiser_fit`), and saves the denoiser tower only
(`denoiser.safetensors`): the context tower is the backbone, bit for bit, so `load_trained(manifest)`
rebuilds it from the backbone reference. `export` writes both towers once.

Training: fp32 on CPU / bf16-mixed on GPU, gradient accumulation, linear warmup then cosine decay
over the step budget (or an opt-in time budget, whichever ends first; the summary says when time
ended it), checkpoints every N steps in `ctx.work_dir`
with resume from the last one, a validation loss plus the ELBO (1/t weighting) on the eval split.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

from stages.api import Range, StageContext
from stages.attach_conditioning import check_block_size
from stages.backbones.loading import BackboneRef, TwoTowerFactory, save_denoiser
from stages.data.rows import Layout, NoiseOn, RowLoaders, ShardLoaders, ShardRows, build_rows
from stages.training.optimisation import Optimisation, load_tokens
from stages.training.world_size import REMOVED_TRAIN_KEYS, check_stage_resources, world_of
from stages.training.world_size import check_cluster as check_world_on_cluster

SECTION = "train"
REQUIRES = ("prepare_data", "attach_conditioning")


@dataclass
class Config(Optimisation):
    """The `train` section: optimisation of the denoiser tower (the shared fields of
    `stages.training.optimisation.Optimisation`, then the denoiser's own)."""

    REMOVED_KEYS = REMOVED_TRAIN_KEYS  # not a field: keys a recipe may still set, and their replacement

    max_minutes: Annotated[float, Range(0, low_open=True)] | None = None
    """Opt-in wall-clock budget in minutes across resumes; null (the default, and every shipped
    recipe): `max_steps` alone ends training, so the same recipe gives the same model on a loaded
    laptop and an idle server. Set, it ends training at whichever comes first and the LR schedule
    follows it; the model then depends on the machine's speed and load, and the summary says so
    (`metrics.budget`)."""
    grad_accum: Annotated[int, Range(1)] = 1
    """Micro-batches accumulated per optimizer step."""
    val_every: Annotated[int, Range(0)] = 100
    """Validate every this many micro-batches (loss, ELBO, masked accuracy on the eval split);
    0: once per epoch."""
    val_batches: Annotated[int, Range(0)] = 4
    """Eval micro-batches per validation (0: no validation)."""
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    """Lightning accelerator."""
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """Lightning strategy; under `num_workers > 1`, `auto` is FSDP on GPU and DDP on CPU."""
    num_workers: Annotated[int, Range(1)] = 1
    """Training processes. Above 1 the fit runs on Ray Train workers through
    `stages.training.train_distributed.fit_distributed` (FSDP on GPU, DDP over gloo on CPU; checkpoints in
    the stage's work dir on shared storage, resumed after a restart). The world size is this times
    `gpus_per_worker` GPUs (`stages.training.world_size`)."""
    gpus_per_worker: Annotated[int, Range(0, 1)] | None = None
    """GPUs each process reserves: 0 (CPU, gloo) or 1; null: 1 when `accelerator` is gpu/cuda."""
    max_failures: Annotated[int, Range(0)] = 0
    """`num_workers > 1`: times Ray Train restarts the worker group after a worker dies (its
    `FailureConfig`); each restart resumes from the last checkpoint on `run.root`, the row order at
    the exact batch (`stages.data.row_sampler`). Set it on preemptible nodes."""
    progress_bar: bool = True
    """Show Lightning's progress bar."""
    layout: Layout = "auto"
    """Row layout: `block_aligned` re-lays each prompt/answer example as `[pads][prompt][answer]`
    with the answer starting on a block boundary, as decoding sees it (`twotower.data`);
    `packed` keeps prepare_data's packed rows; `auto`: block_aligned when the data has answers."""
    noise_on: NoiseOn = "answers"
    """Which tokens may be masked and scored: `answers` (the data's `loss_mask`: answer + EOS) or
    `all` (every non-pad token)."""
    fill_after_eos: bool = True
    """block_aligned layout: fill the rest of each answer's last block with EOS, real and scored, so
    the denoiser learns where the answer ends (decoding denoises all B positions of a block; see
    `twotower.data.block_aligned_batch`). False leaves pads there (the answer length is then
    visible to the denoiser in training but not when decoding)."""


def validate(cfg: Config) -> None:
    """Config-only checks: `gpus_per_worker` against `accelerator` (ValueError naming the keys)."""
    world_of(cfg, 1)


def budget_note(cfg: Config, steps: int) -> str:
    """What ended training, for the summary: `steps` (the recipe's step budget: the same model on
    any machine), or the opt-in time budget, which makes the model depend on the machine's load."""
    if not cfg.max_minutes:
        return "steps"
    if steps < cfg.max_steps:
        return (f"time: train.max_minutes={cfg.max_minutes:g} ended training at step {steps} of {cfg.max_steps}; "
                "the model depends on this machine's speed and load")
    return "steps (train.max_minutes was set, but train.max_steps came first)"


def check_teacher_vocabulary(twotower: dict, data_tokenizer: str | None, backbone: BackboneRef) -> None:
    """`twotower.targets` other than `data` trains on the context tower's predictions over the
    data's token ids: the data must be tokenized with the backbone's own vocabulary, or every
    target would name a different string. ValueError naming both keys when they differ."""
    targets = twotower.get("targets", "data")
    if targets == "data" or not data_tokenizer:
        return
    from transformers import AutoTokenizer

    mine = AutoTokenizer.from_pretrained(data_tokenizer).get_vocab()
    theirs = AutoTokenizer.from_pretrained(backbone.tokenizer).get_vocab()
    if mine != theirs:
        differ = sorted(set(mine.items()) ^ set(theirs.items()), key=str)[:3]
        raise ValueError(f"twotower.targets={targets!r}: the data's tokenizer ({data_tokenizer}, {len(mine)} "
                         f"tokens; data.tokenizer) is not the backbone's ({backbone.tokenizer}, {len(theirs)} "
                         f"tokens), e.g. {differ}: the context tower's predictions would not be the data's "
                         "ids; tokenize the data with the backbone's tokenizer or use twotower.targets=data")


def check_resources(cfg: Config, sections: dict, resources, stage: str) -> None:
    """The engine's config-time hook: the world size against this stage's own Ray task
    (`resources`: its `graph.<stage>.resources`)."""
    seq_len = int((sections.get("data") or {}).get("seq_len", 1))
    check_stage_resources(world_of(cfg, seq_len), stage, float(resources.num_gpus))


def check_cluster(cfg: Config, cluster: dict[str, float]) -> None:
    """The engine's hook before any stage runs: the training world against the Ray cluster's totals
    (a world it cannot hold fails here, not after four stages)."""
    check_world_on_cluster(world_of(cfg, 1), cluster)


def run(cfg: Config, inputs: dict[str, dict], ctx: StageContext) -> dict:
    """Train the denoiser; write `denoiser.safetensors`; return losses, ELBO and throughput."""
    from stages.data.token_shards import TokenShards, is_shard_dir
    from stages.training.denoiser_fit import fit, fit_on_workers, memory_loaders

    data, attach = inputs["prepare_data"], inputs["attach_conditioning"]
    backbone = BackboneRef.of(attach, "attach_conditioning")
    tt = dict(attach["twotower"])
    check_teacher_vocabulary(tt, (data.get("artifacts") or {}).get("tokenizer"), backbone)
    block_size = int(tt["block_size"])
    pad_id = int(data.get("pad_token_id", 0) or 0)
    train_path, val_path = data["artifacts"]["train_tokens"], data["artifacts"]["eval_tokens"]
    lazy = is_shard_dir(train_path) and (
        cfg.layout == "packed" or (cfg.layout == "auto" and not data.get("verifiable", True)))
    if lazy:  # a text corpus: rows read from the memory-mapped shards, each worker its own
        train = ShardRows(TokenShards(train_path, "prepare_data.artifacts.train_tokens"), cfg.noise_on, pad_id)
        val = ShardRows(TokenShards(val_path, "prepare_data.artifacts.eval_tokens"), cfg.noise_on, pad_id)
        n_rows, row_len = len(train), train.shards.seq_len
        check_block_size(block_size, row_len)
        loaders = ShardLoaders(train, val, block_size, cfg.batch_size, ctx.seed)
    else:  # prompt/answer examples (small by construction), re-laid in memory
        train_ids = load_tokens(train_path, "prepare_data.artifacts.train_tokens")
        val_ids = load_tokens(val_path, "prepare_data.artifacts.eval_tokens")
        check_block_size(block_size, int(train_ids[0].shape[1]))
        fill_id = data.get("eos_token_id") if cfg.fill_after_eos else None
        train_ids = build_rows(train_ids, cfg.layout, cfg.noise_on, block_size, pad_id, fill_id)
        val_ids = build_rows(val_ids, cfg.layout, cfg.noise_on, block_size, pad_id, fill_id)
        n_rows, row_len = int(train_ids[0].shape[0]), int(train_ids[0].shape[1])
        loaders = RowLoaders(train_ids, val_ids, block_size, cfg.batch_size)
    factory = TwoTowerFactory.of(backbone, tt)
    world = world_of(cfg, int(data.get("seq_len") or row_len))
    if world.distributed:
        module, logged, seconds = fit_on_workers(cfg, factory, block_size, loaders, ctx)
        steps = int(logged.pop("step", cfg.max_steps))
        timing = {"train_minutes": seconds / 60.0, "num_workers": cfg.num_workers,
                  **{k: logged.pop(k) for k in ("restarts", "resumed_from_step", "restart_resumed_from_steps")}}
    else:
        local = loaders() if lazy else memory_loaders(train_ids, val_ids, block_size, cfg.batch_size, ctx.seed)
        module, trainer, seconds = fit(cfg, factory, block_size, local, ctx)
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        steps = int(trainer.global_step)
        timing = {"resumed_from_step": module.resumed_from_step,
                  **({"resumed_lr_was": module.resumed_lr} if module.resumed_lr is not None else {}),
                  "train_minutes": module.elapsed() / 60.0,
                  "train_cpu_minutes": module.cpu_seconds / 60.0}
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_denoiser(module.model, out / "denoiser.safetensors")
    tokens = steps * cfg.batch_size * cfg.grad_accum * row_len * world.num_workers
    metrics_layout = {"train_rows": n_rows, "row_len": row_len}
    from twotower.sizing import params_read_per_forward

    den, context = module.model.denoiser, module.model.context_tower
    embedding = context.get_input_embeddings()
    sizes = {"denoiser_layers": len(module.model.denoiser_layers),
             "denoiser_params": sum(p.numel() for p in den.parameters()),
             "denoiser_trainable_params": sum(p.numel() for p in den.parameters() if p.requires_grad),
             # weights one denoiser forward reads, over one context-tower forward's: the depth's cost
             # per forward where decoding is bound by weight traffic (batch 1)
             "denoiser_forward_weights_vs_context": params_read_per_forward(den, den.backbone.get_input_embeddings())
             / max(1, params_read_per_forward(context, embedding))}
    metrics = {"steps": steps, "budget": budget_note(cfg, steps), **timing, **sizes, "world_size": world.world_size,
               "gpus": world.gpus,
               "micro_batch": world.micro_batch, "tokens_per_step": world.tokens_per_step,
               "tokens_per_second": tokens / max(seconds, 1e-9),
               **metrics_layout, **{k.replace("/", "_"): float(v) for k, v in logged.items()
                                    if isinstance(v, (int, float))}}
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=1))
    return {"metrics": metrics,
            "artifacts": {"denoiser": ctx.artifact_path("denoiser.safetensors")},
            "backbone": backbone.as_manifest(), "twotower": tt, "train_config": asdict(cfg)}
