"""How good a drafter is, measured on many held-out blocks rather than a few timed prompts.

    python bench/draft_quality.py RUN_DIR [RUN_DIR ...] [--rows 96] [--out table.md]

`evaluate` times a handful of prompts (SmolLM2's recipe: 4 completions of 16 tokens), too few to
tell two drafters apart. This reads each finished run's trained denoiser and its prepared held-out
rows (`prepare_data`'s eval split, the same rows for every run of one data cache) and scores the
*first denoiser step of a draft*, exactly what `verified` with `draft=1` proposes: every position
1..B-1 of a block masked (t = 1), position 0 clean, one forward. Per position j the draft is the
argmax; the target is the context tower's greedy token there given the clean prefix (teacher
forcing). Reported: accuracy at j = 1, 2, 3 and over all positions, and the *teacher-forced
acceptance*, 1 + the number of leading correct drafts per block: the tokens one verification would
keep if the context tower's greedy continuation were the data (a proxy for verified's tokens per
verification that needs no timing and no decoding loop). Blocks are scored only where all of the
block's positions are real answer tokens (`noise_on: answers` rows), and block 0 of a row is
skipped when it has no context.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def score(model, rows, attn, loss_mask) -> dict:
    """Draft scores of `model` on `rows` `[N, L]` (L a multiple of the block size)."""
    import torch

    from twotower.cache import TowerCache
    from twotower.positions import prediction_logits
    from twotower.walk import context_forward

    B = model.block_size
    n, L = rows.shape
    blocks = L // B
    real = attn.bool()
    full = (real & loss_mask.bool()).view(n, blocks, B)[:, :, 1:].all(-1)  # every drafted position a real answer token
    full &= real.view(n, blocks, B)[:, :, 0]
    full[:, 0] &= False  # block 0 has no context before it
    mask = torch.zeros(n, blocks, B, dtype=torch.bool)
    mask[:, :, 1:] = full[..., None]
    t = torch.ones(n, blocks)
    with torch.inference_mode():
        hidden, _ = context_forward(model.context_walk, rows, TowerCache.empty(n, "cpu"), valid=real, chunk=B)
        greedy = model.context_walk.logits(hidden).argmax(-1)  # [n, L]: the context tower's token after each position
        target = torch.cat([rows[:, :1], greedy[:, :-1]], dim=1).view(n, blocks, B)
        out = model(rows, noise_mask=mask.view(n, L), t=t, attention_mask=attn)
        V = out.logits.shape[-1]
        pred = prediction_logits(out.logits.reshape(-1, B, V), True).argmax(-1).view(n, blocks, B)
    right = (pred == target)[full][:, 1:]  # [blocks scored, B-1]
    accepted = 1 + right.long().cumprod(1).sum(1)
    return {"blocks": int(right.shape[0]), "acc_pos1": right[:, 0].float().mean().item(),
            "acc_pos2": right[:, 1].float().mean().item(), "acc_pos3": right[:, 2].float().mean().item(),
            "acc_all": right.float().mean().item(), "teacher_forced_acceptance": accepted.float().mean().item()}


def run_scores(run_dir: Path, n_rows: int) -> dict:
    from stages.backbones.loading import load_trained
    from stages.data.rows import build_rows
    from stages.training.optimisation import load_tokens

    stages = run_dir / "stages"
    data = json.loads((stages / "prepare_data.json").read_text())
    train = json.loads((stages / "train_denoiser.json").read_text())
    model, _ = load_trained(train, "cpu", "cpu")
    ids, lm = load_tokens(data["artifacts"]["eval_tokens"], "prepare_data.artifacts.eval_tokens")
    pad = int(data.get("pad_token_id") or 0)
    eos = data.get("eos_token_id")
    cfg = train.get("train_config", {})
    rows, attn, loss = build_rows((ids[:n_rows], lm[:n_rows]), cfg.get("layout", "auto"),
                                  cfg.get("noise_on", "answers"),
                                  model.block_size, pad, eos if cfg.get("fill_after_eos", True) else None)
    tt = train["twotower"]
    return {"run": run_dir.name, "conditioning": tt.get("attention_conditioning"),
            "fused_layers": tt.get("fused_layers") if tt.get("attention_conditioning") == "fused_kv" else None,
            "depth": tt.get("denoiser_layers"), "targets": tt.get("targets"),
            "steps": train.get("metrics", {}).get("steps"), **score(model, rows, attn, loss)}


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished run directories (ROOT/<run id>)")
    ap.add_argument("--rows", type=int, default=96, help="held-out rows scored per run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [run_scores(r, args.rows) for r in args.runs]
    cols = ["run", "conditioning", "fused_layers", "depth", "targets", "steps", "blocks", "acc_pos1", "acc_pos2",
            "acc_pos3", "acc_all", "teacher_forced_acceptance"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        lines.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    table = "\n".join(lines)
    print(table)
    print(json.dumps(results))
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
