"""Stage `fidelity`: does the two-tower model still *contain* the backbone, on its real weights?

A conversion of a real checkpoint is only trustworthy when the frozen context tower reproduces the
backbone that transformers itself runs. This stage measures that, and what training bought
(section `fidelity`):

- **parity**: max |Δ logits| between our layer walk of the context tower (`twotower.walk`) and the
  backbone's own HF forward, on real held-out rows;
- **`ar` == transformers' greedy `generate`**, token for token up to the first EOS, on
  `n_prompts` held-out prompts (the count of prompts that match, and which do not);
- **`mock_ar` == `ar`** on the same prompts (invariant 5 on the real weights);
- **masked accuracy before and after training**: the denoiser at its zero-init (a copy of the
  backbone with the new modules silent) and the trained one, on the same held-out rows with the same
  noise draw, so the difference is what training bought (the training loss on those rows beside it).

It needs `prepare_data` (held-out rows and prompts) and `train_denoiser` (the trained denoiser and
the backbone path). Nothing here is timed: wall-clock figures come from `evaluate`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from stages.api import Range, StageContext

SECTION = "fidelity"
REQUIRES = ("prepare_data", "train_denoiser")


@dataclass
class Config:
    """The `fidelity` section."""

    n_prompts: Annotated[int, Range(1)] = 20
    """Held-out prompts on which `ar` is compared with transformers' greedy `generate` (and
    `mock_ar` with `ar`)."""
    max_new_tokens: Annotated[int, Range(1)] = 32
    """Tokens generated per prompt in those comparisons."""
    parity_rows: Annotated[int, Range(1)] = 4
    """Held-out token rows whose logits are compared (our walk vs the HF forward)."""
    accuracy_rows: Annotated[int, Range(1)] = 64
    """Held-out token rows for the masked accuracy before and after training."""
    batch_size: Annotated[int, Range(1)] = 8
    """Rows per forward for the masked accuracy."""
    max_parity_delta: Annotated[float, Range(0)] = 1e-3
    """Fail the stage when parity is worse than this (float32 weights; a broken adapter is off by
    whole logits, rounding by ~1e-5)."""
    fail_on_mismatch: bool = False
    """Raise when `ar` differs from transformers' greedy output or `mock_ar` from `ar`. Off by
    default: a near-tie in float32 may flip one greedy token; the counts are reported either way."""
    num_threads: Annotated[int, Range(0)] = 0
    """torch intra-op threads; 0 leaves torch's default."""

    def __post_init__(self) -> None:
        if self.n_prompts < 1 or self.max_new_tokens < 1 or self.parity_rows < 1 or self.accuracy_rows < 1:
            raise ValueError("fidelity.n_prompts, max_new_tokens, parity_rows and accuracy_rows must be >= 1")


def until_eos(ids: list[int], eos: int | None) -> list[int]:
    """The ids up to and including the first EOS (the rest is padding in either implementation)."""
    if eos is not None and eos in ids:
        return ids[: ids.index(eos) + 1]
    return ids


def parity(model, rows) -> float:
    """Max |Δ logits| between our context walk and the HF forward of the context tower."""
    import torch

    from twotower.cache import TowerCache
    from twotower.walk import context_forward

    worst = 0.0
    with torch.inference_mode():
        for row in rows:
            ids = row[None]
            ref = model.context_tower(ids).logits.float()
            hidden, _ = context_forward(model.context_walk, ids, TowerCache.empty(1, ids.device),
                                        chunk=model.block_size)
            worst = max(worst, float((model.context_walk.logits(hidden) - ref).abs().max()))
    return worst


def greedy_agreement(model, prompts: list[list[int]], max_new_tokens: int, eos: int | None, pad: int) -> dict[str, Any]:
    """Per prompt: does `ar` equal transformers' greedy `generate`, and `mock_ar` equal `ar`?"""
    import torch

    out: dict[str, Any] = {"ar_equals_hf": [], "mock_ar_equals_ar": [], "first_mismatch": []}
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            n = ids.shape[1]
            hf = model.context_tower.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                              do_sample=False, eos_token_id=eos, pad_token_id=pad)
            hf_new = until_eos(hf[0, n:].tolist(), eos)
            ar = until_eos(model.generate(ids, mode="ar", max_new_tokens=max_new_tokens,
                                          eos_token_id=eos).sequences[0, n:].tolist(), eos)
            mock = until_eos(model.generate(ids, mode="mock_ar", max_new_tokens=max_new_tokens,
                                            eos_token_id=eos).sequences[0, n:].tolist(), eos)
            out["ar_equals_hf"].append(ar == hf_new)
            out["mock_ar_equals_ar"].append(mock == ar)
            diff = next((i for i, (a, b) in enumerate(zip(ar, hf_new)) if a != b), None)
            out["first_mismatch"].append(diff if diff is not None or len(ar) == len(hf_new)
                                         else min(len(ar), len(hf_new)))
    return out


def masked_scores(model, rows, attn, loss_mask, batch_size: int, seed: int) -> tuple[float, float]:
    """(argmax accuracy over masked positions, training loss), the noise drawn from `seed` per
    batch: the same draw for every model evaluated with the same seed and rows."""
    import torch

    hits = total = loss = 0.0
    with torch.inference_mode():
        for i in range(0, rows.shape[0], batch_size):
            g = torch.Generator().manual_seed(seed + i)
            out = model(rows[i: i + batch_size], attention_mask=attn[i: i + batch_size],
                        loss_mask=loss_mask[i: i + batch_size], generator=g)
            count = float(out.noise_mask.sum())
            hits += float(out.masked_accuracy) * count
            loss += float(out.loss) * count
            total += count
    return hits / max(total, 1.0), loss / max(total, 1.0)


def run(cfg: Config, inputs: dict[str, dict], ctx: StageContext) -> dict:
    """Parity, greedy agreement and masked accuracy before/after training, on held-out data."""
    import torch

    from stages.backbones.loading import BackboneRef, TwoTowerFactory, load_trained
    from stages.data.rows import build_rows
    from stages.evaluation import decoding_eval as de
    from stages.training.optimisation import load_tokens

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    data, train = inputs["prepare_data"], inputs["train_denoiser"]
    backbone = BackboneRef.of(train, "train_denoiser")
    model, tokenizer = load_trained(train)
    eos, pad = data.get("eos_token_id"), int(data.get("pad_token_id") or 0)
    ids, lm = load_tokens(data["artifacts"]["eval_tokens"], "prepare_data.artifacts.eval_tokens")
    delta = parity(model, ids[: cfg.parity_rows])
    if not delta <= cfg.max_parity_delta:
        raise ValueError(f"fidelity: our layer walk differs from the HF forward of {backbone.model} "
                         f"by max |Δ logits| = {delta:.3g} > fidelity.max_parity_delta={cfg.max_parity_delta:g}")
    examples = de.load_examples(data["artifacts"]["eval_examples"])[: cfg.n_prompts]
    prompts = [tokenizer(e["prompt"])["input_ids"] for e in examples]
    greedy = greedy_agreement(model, prompts, cfg.max_new_tokens, eos, pad)
    train_cfg = train.get("train_config", {})
    block_size = model.block_size
    rows, attn, loss = build_rows((ids[: cfg.accuracy_rows], lm[: cfg.accuracy_rows]), train_cfg.get("layout", "auto"),
                                  train_cfg.get("noise_on", "answers"), block_size, pad,
                                  eos if train_cfg.get("fill_after_eos", True) else None)
    acc_after, loss_after = masked_scores(model, rows, attn, loss, cfg.batch_size, ctx.seed)
    del model
    untrained = TwoTowerFactory.of(backbone, train["twotower"])().eval()
    acc_before, loss_before = masked_scores(untrained, rows, attn, loss, cfg.batch_size, ctx.seed)
    n = len(prompts)
    metrics = {"parity_max_abs_logit_diff": delta, "n_prompts": n,
               "ar_equals_hf_prompts": sum(greedy["ar_equals_hf"]),
               "ar_equals_hf": float(all(greedy["ar_equals_hf"])),
               "mock_ar_equals_ar_prompts": sum(greedy["mock_ar_equals_ar"]),
               "mock_ar_equals_ar": float(all(greedy["mock_ar_equals_ar"])),
               "masked_accuracy_before": acc_before, "masked_accuracy_after": acc_after,
               "masked_loss_before": loss_before, "masked_loss_after": loss_after,
               "accuracy_rows": int(rows.shape[0])}
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    detail = {**metrics,
              "prompts": [{"prompt": e["prompt"], "ar_equals_hf": a, "mock_ar_equals_ar": m, "first_mismatch": f}
                          for e, a, m, f in zip(examples, greedy["ar_equals_hf"], greedy["mock_ar_equals_ar"],
                                                greedy["first_mismatch"])]}
    (out / "fidelity.json").write_text(json.dumps(detail, indent=1))
    ctx.log_metrics({k: float(v) for k, v in metrics.items()})
    ctx.log_artifact(out / "fidelity.json")
    bad = not (metrics["ar_equals_hf"] and metrics["mock_ar_equals_ar"])
    if bad and cfg.fail_on_mismatch:
        raise ValueError(f"fidelity: ar == HF on {metrics['ar_equals_hf_prompts']}/{n} prompts, mock_ar == ar on "
                         f"{metrics['mock_ar_equals_ar_prompts']}/{n} (details in {out / 'fidelity.json'})")
    return {"metrics": metrics, "artifacts": {"fidelity": ctx.artifact_path("fidelity.json")}}
