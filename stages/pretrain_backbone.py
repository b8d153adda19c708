"""Stage `pretrain_backbone` (config section `pretrain`): train the tiny Nemotron-H of the offline recipe.

The default recipe has no hub checkpoint to convert, so it first trains its own backbone: a
~0.5 M-parameter `NemotronHForCausalLM` with every layer kind (Mamba-2, attention, MoE, MLP), on the
`prepare_data` token files, with Lightning (fp32 on CPU, bf16-mixed on GPU), until plain AR greedy
decoding solves every task family of the held-out split at exact match >= `target_em`.

Why the defaults look the way they do (measured on 2 CPU cores, see docs/data.md):
- `mamba_chunk_size` 16: the torch fallback of the Mamba-2 scan pads every sequence to a multiple
  of the chunk size and costs O(chunk^2) per chunk; 16 (the block size) is ~10x cheaper than 128.
- the loss covers answer tokens only (`loss_mask` of the token files): prompts are random digits
  and letters, predicting them teaches nothing and dilutes the gradient.
- a short warmup, a high peak learning rate and a cosine decay to `min_lr_ratio`: the model is
  tiny and the budget is a few minutes.

Checkpoints go to `ctx.work_dir/checkpoints` every `checkpoint_every` steps; a rerun after a crash
resumes from the last one. Output: `artifacts.model`, a directory loadable with
`AutoModelForCausalLM.from_pretrained` with the tokenizer saved beside the weights (safetensors).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from stages.api import Range, StageContext
from stages.training.optimisation import Optimisation, checkpoint_step, load_tokens, lr_factor, resolve_precision

SECTION = "pretrain"
REQUIRES = ("prepare_data",)
LAYER_CODES = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
ADAMW_BETAS = (0.9, 0.98)
"""β2 = 0.98: the tuned runs of docs/data.md (a shorter second-moment memory than torch's 0.999
for a few-minute run)."""
PROGRESS_EVERY = 10
"""Optimizer steps between progress events to the live display."""


@dataclass
class Config(Optimisation):
    """The `pretrain` section: the shared optimisation fields (`stages.training.optimisation.Optimisation`; the
    tuned values are in recipes/tiny.yaml), then the model's shape and the stop rule."""

    layer_pattern: str = "M*E*-"
    """Layer kinds in order, one character each: M Mamba-2, * attention, E MoE, - MLP
    (Nemotron-H's `hybrid_override_pattern`). Every kind must appear. One Mamba layer is enough
    here (it gives the attention layers previous-token features through its causal conv) and
    is most of the CPU cost of a step (the torch fallback scan)."""
    hidden_size: Annotated[int, Range(1)] = 128
    """Model width (embeddings and the residual stream); a multiple of `num_attention_heads`, which
    sets head_dim = hidden_size / heads."""
    num_attention_heads: Annotated[int, Range(1)] = 4
    """Query heads of the attention layers (head_dim = hidden_size / heads)."""
    num_key_value_heads: Annotated[int, Range(1)] = 2
    """Key/value heads of the attention layers (grouped-query attention, as Nemotron-H uses); they
    divide `num_attention_heads` and size the context tower's KV cache."""
    intermediate_size: Annotated[int, Range(1)] = 256
    """Hidden size of the MLP layers."""
    mamba_num_heads: Annotated[int, Range(1)] = 8
    """Mamba-2 heads."""
    mamba_head_dim: Annotated[int, Range(1)] = 32
    """Mamba-2 head dimension (inner size = heads x head_dim = 256, twice the width, the usual
    Mamba-2 expansion)."""
    ssm_state_size: Annotated[int, Range(1)] = 16
    """Mamba-2 state size per head."""
    mamba_chunk_size: Annotated[int, Range(1)] = 16
    """Mamba-2 scan chunk; keep near the block size on CPU (the torch fallback pads to it)."""
    n_routed_experts: Annotated[int, Range(2)] = 4
    """Routed experts per MoE layer; at least 2, or there is nothing to route (a MoE layer with
    one expert is an MLP)."""
    num_experts_per_tok: Annotated[int, Range(1)] = 2
    """Experts each token is routed to."""
    moe_intermediate_size: Annotated[int, Range(1)] = 128
    """Hidden size of each routed expert."""
    moe_shared_expert_intermediate_size: Annotated[int, Range(1)] = 128
    """Hidden size of the MoE layer's shared expert (every token goes through it, beside its
    routed experts)."""
    initializer_range: Annotated[float, Range(0, low_open=True)] = 0.06
    """Std of the normal init of linear and embedding weights. Larger than HF's 0.02: at 0.02 the
    tiny model sits for hundreds of steps on the plateau before attention learns to copy (measured:
    copy alone still at chance after 200 steps with 0.02, loss 0.13 after 250 with 0.06)."""
    eval_every: Annotated[int, Range(1)] = 100
    """Steps between quick AR exact-match checks on `eval_subset` prompts per family."""
    eval_subset: Annotated[int, Range(1)] = 32
    """Prompts per family in the quick checks (the final evaluation uses the whole eval split)."""
    target_em: Annotated[float, Range(0, 1, low_open=True)] = 0.9
    """AR greedy exact match every family must reach."""
    stop_at_target: bool = True
    """Stop once a quick check has every family at >= target_em + stop_margin."""
    stop_margin: Annotated[float, Range(0, 1)] = 0.05
    """Safety margin of the early stop (the quick check sees only `eval_subset` prompts)."""
    max_new_tokens: Annotated[int, Range(1)] = 16
    """Generation budget per answer in evaluation (synthetic answers are at most 14 characters + EOS)."""
    eval_batch_size: Annotated[int, Range(1)] = 128
    """Prompts per batched greedy generation."""
    seed: Annotated[int, Range(0)] = 0
    """Initialisation and data-order seed, added to the run seed."""


def validate(cfg: Config) -> None:
    """Config-only checks, a ValueError naming the key."""
    bad = sorted(set(cfg.layer_pattern) - set(LAYER_CODES))
    if bad:
        raise ValueError(f"pretrain.layer_pattern: unknown codes {bad}; use {LAYER_CODES}")
    missing = [kind for code, kind in LAYER_CODES.items() if code not in cfg.layer_pattern]
    if missing:
        raise ValueError(f"pretrain.layer_pattern {cfg.layer_pattern!r} lacks layer kinds {missing}: "
                         "every kind must appear")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"pretrain.hidden_size ({cfg.hidden_size}) is not a multiple of num_attention_heads")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError("pretrain.num_attention_heads must be a multiple of num_key_value_heads")
    if cfg.n_routed_experts < 2 or cfg.num_experts_per_tok > cfg.n_routed_experts:
        raise ValueError("pretrain.n_routed_experts must be >= 2 and >= num_experts_per_tok")


def build_config(cfg: Config, data: dict[str, Any]) -> Any:
    """The `NemotronHConfig` of the tiny backbone, with the token ids of the data manifest."""
    from transformers import NemotronHConfig

    return NemotronHConfig(
        vocab_size=int(data["vocab_size"]),
        hidden_size=cfg.hidden_size,
        hybrid_override_pattern=cfg.layer_pattern,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        mamba_num_heads=cfg.mamba_num_heads,
        mamba_head_dim=cfg.mamba_head_dim,
        ssm_state_size=cfg.ssm_state_size,
        n_groups=1,
        chunk_size=cfg.mamba_chunk_size,
        n_routed_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        moe_intermediate_size=cfg.moe_intermediate_size,
        moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
        max_position_embeddings=max(4096, int(data["seq_len"])),
        tie_word_embeddings=False,
        initializer_range=cfg.initializer_range,
        pad_token_id=int(data["pad_token_id"]),
        bos_token_id=data.get("bos_token_id"),
        eos_token_id=int(data["eos_token_id"]),
    )


def read_examples(path: str) -> list[dict[str, str]]:
    import json

    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def subset_per_task(examples: list[dict[str, str]], n: int) -> list[dict[str, str]]:
    """The first `n` examples of each task, in file order."""
    seen: dict[str, int] = {}
    out = []
    for e in examples:
        if seen.get(e["task"], 0) < n:
            seen[e["task"]] = seen.get(e["task"], 0) + 1
            out.append(e)
    return out


def ar_generate(model: Any, tok: Any, prompts: list[str], *, max_new_tokens: int, batch_size: int = 128) -> list[str]:
    """Plain greedy decoding of the HF model (cached, left-padded batches); returns the decoded
    continuations, cut at EOS."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = []
    # Batch prompts of similar length together: less padding, fewer wasted Mamba steps.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: dict[int, str] = {}
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            )
            decoded = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            texts.update(zip(idx, decoded))
    if was_training:
        model.train()
    out = [texts[i] for i in range(len(prompts))]
    return out


def ar_exact_match(model: Any, tok: Any, examples: list[dict[str, str]], *, max_new_tokens: int,
                   batch_size: int = 128) -> dict[str, float]:
    """Per-task AR greedy exact match of `examples` (rows with `task`, `prompt`, `answer`)."""
    from stages.data.tasks import exact_match

    examples = [e for e in examples if e.get("answer")]  # plain-text rows ("" answer) are not verifiable
    if not examples:
        return {}
    preds = ar_generate(model, tok, [e["prompt"] for e in examples], max_new_tokens=max_new_tokens,
                        batch_size=batch_size)
    hits: dict[str, list[bool]] = {}
    for e, p in zip(examples, preds):
        hits.setdefault(e["task"], []).append(exact_match(p, e["answer"]))
    return {task: sum(h) / len(h) for task, h in hits.items()}


def lr_lambda(cfg: Config):
    """Linear warmup then cosine decay from 1 to `min_lr_ratio` at `max_steps` (steps only)."""
    return lambda step: lr_factor(step, cfg.warmup_steps, step / max(1, cfg.max_steps), cfg.min_lr_ratio)


def make_module(cfg: Config, model_config: Any) -> Any:
    """The LightningModule: the HF model, masked next-token loss, AdamW + warmup/cosine."""
    import pytorch_lightning as pl
    import torch
    from transformers import NemotronHForCausalLM

    class TinyBackboneModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = NemotronHForCausalLM(model_config)

        def training_step(self, batch: tuple[Any, Any], batch_idx: int) -> Any:
            input_ids, labels = batch
            loss = self.model(input_ids=input_ids, labels=labels, use_cache=False).loss
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self) -> Any:
            decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2]
            no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2]
            opt = torch.optim.AdamW(
                [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                lr=cfg.lr, betas=ADAMW_BETAS,
            )
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return TinyBackboneModule()


def make_eval_callback(cfg: Config, tok: Any, examples: list[dict[str, str]], ctx: StageContext) -> Any:
    """Every `eval_every` steps: report progress, run the quick AR check, log it, and stop the
    trainer once every family clears `target_em + stop_margin`."""
    import pytorch_lightning as pl

    class QuickEval(pl.Callback):
        def __init__(self) -> None:
            self.history: list[dict[str, float]] = []

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            step = trainer.global_step
            loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
            if step % PROGRESS_EVERY == 0:
                ctx.progress(step, cfg.max_steps, f"loss {loss:.3f}")
            if step % cfg.eval_every and step != cfg.max_steps:
                return
            em = ar_exact_match(module.model, tok, examples, max_new_tokens=cfg.max_new_tokens,
                                batch_size=cfg.eval_batch_size)
            metrics = {f"quick_em/{k}": v for k, v in em.items()}
            metrics.update({"quick_em_min": min(em.values()), "train_loss": loss})
            ctx.log_metrics(metrics, step=step)
            self.history.append({"step": step, **metrics})
            ctx.progress(step, cfg.max_steps, f"loss {loss:.3f} min EM {min(em.values()):.2f}")
            if cfg.stop_at_target and min(em.values()) >= min(1.0, cfg.target_em + cfg.stop_margin):
                trainer.should_stop = True

    return QuickEval()


def train(cfg: Config, data: dict[str, Any], ctx: StageContext) -> tuple[Any, dict[str, Any]]:
    """Train (or resume) the backbone; returns (the HF model, training stats)."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint
    from transformers import AutoTokenizer

    from stages.training.checkpoint_io import make_checkpoint_io, usable_checkpoint
    from stages.training.finite_guard import make_finite_guard

    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    pl.seed_everything(cfg.seed + ctx.seed, workers=True, verbose=False)
    tok = AutoTokenizer.from_pretrained(data["artifacts"]["tokenizer"])
    ids, loss_mask = load_tokens(data["artifacts"]["train_tokens"], "prepare_data.artifacts.train_tokens")
    labels = ids.clone()
    labels[~loss_mask] = -100  # the loss covers answer tokens only
    if ids.shape[1] != int(data["seq_len"]):
        raise ValueError(f"{data['artifacts']['train_tokens']}: rows of {ids.shape[1]} tokens, "
                         f"manifest says seq_len={data['seq_len']}")
    examples = subset_per_task(read_examples(data["artifacts"]["eval_examples"]), cfg.eval_subset)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(ids, labels), batch_size=cfg.batch_size, shuffle=True, drop_last=True,
        generator=torch.Generator().manual_seed(cfg.seed + ctx.seed),
    )
    module = make_module(cfg, build_config(cfg, data))
    ckpt_dir = Path(ctx.work_dir) / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    quick = make_eval_callback(cfg, tok, examples, ctx)
    gpu = torch.cuda.is_available()
    precision = resolve_precision(cfg.precision, gpu)
    trainer = pl.Trainer(
        max_steps=cfg.max_steps, accelerator="gpu" if gpu else "cpu", devices=1, precision=precision,
        gradient_clip_val=cfg.grad_clip, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[quick, make_finite_guard(ckpt_dir, section="pretrain"),
                   ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=cfg.checkpoint_every,
                                   save_last=True, save_top_k=0, enable_version_counter=False)],  # see denoiser_fit
        default_root_dir=str(ctx.work_dir), num_sanity_val_steps=0, plugins=[make_checkpoint_io()],
    )
    resume = usable_checkpoint(last, ctx.warn)  # None: absent, or corrupt (moved aside)
    resumed_from = checkpoint_step(resume) if resume else 0
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader, ckpt_path=str(resume) if resume else None)
    stats = {"train_time_s": time.perf_counter() - t0, "steps": int(trainer.global_step),
             "resumed_from_step": resumed_from, "history": quick.history}
    return module.model, stats


def run(cfg: Config, inputs: dict[str, dict], ctx: StageContext) -> dict:
    """Train, evaluate every family on the whole eval split, save model + tokenizer."""
    from transformers import AutoTokenizer

    validate(cfg)
    if "prepare_data" not in inputs:
        raise ValueError("pretrain_backbone needs the prepare_data stage (graph: needs: [prepare_data])")
    data = inputs["prepare_data"]
    model, stats = train(cfg, data, ctx)
    tok = AutoTokenizer.from_pretrained(data["artifacts"]["tokenizer"])
    t0 = time.perf_counter()
    em = ar_exact_match(model, tok, read_examples(data["artifacts"]["eval_examples"]),
                        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size)
    eval_time = time.perf_counter() - t0
    out = Path(ctx.out_dir) / "model"
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    n_params = sum(p.numel() for p in model.parameters())
    target_met = min(em.values()) >= cfg.target_em
    if not target_met:
        worst = min(em, key=em.get)
        ctx.warn(f"AR exact match below pretrain.target_em={cfg.target_em} "
                 f"(worst family {worst}: {em[worst]:.3f}); raise pretrain.max_steps")
    metrics: dict[str, float] = {f"em/{k}": v for k, v in em.items()}
    metrics.update({
        "em_min": min(em.values()), "em_mean": sum(em.values()) / len(em), "target_met": float(target_met),
        "params": float(n_params), "steps": float(stats["steps"]), "train_time_s": stats["train_time_s"],
        "eval_time_s": eval_time, "resumed_from_step": float(stats["resumed_from_step"]),
    })
    ctx.log_metrics(metrics)
    return {
        "metrics": metrics,
        "artifacts": {"model": ctx.artifact_path("model"), "tokenizer": ctx.artifact_path("model")},
        "layer_types": [LAYER_CODES[c] for c in cfg.layer_pattern],
        "params": n_params,
        "target_met": target_met,
        "quick_eval_history": stats["history"],
    }
