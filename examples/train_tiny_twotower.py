"""Train a tiny Nemotron-H backbone on generated tasks, then its two-tower denoiser, and compare
AR, diffusion and verified decoding side by side (exact match per task, tokens per denoiser forward,
wall-clock ms per token) for several confidence thresholds gamma, then `auto` (the per-batch-size table
calibrate_gamma's rule gives) against AR at batch 1, 4 and 16. CPU, one thread.

    .venv/bin/python examples/train_tiny_twotower.py              # first run pretrains and caches the backbone
    .venv/bin/python examples/train_tiny_twotower.py              # later runs reuse it: ~7 minutes
    .venv/bin/python examples/train_tiny_twotower.py --pretrain-s 60 --denoise-s 60 --eval-n 25 --backbone-dir /tmp/bb

The backbone is cached in `--backbone-dir` (default `runs/examples/tiny_nemotron_h`, git-ignored)
with `save_pretrained`; delete it to pretrain again.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, NemotronHConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages.data.tasks import generate  # noqa: E402  (the pipeline's own task families)
from stages.data.tokenizer import vocabulary  # noqa: E402
from stages.evaluation.batch_sweep import decide  # noqa: E402  (auto's rule, as calibrate_gamma applies it)
from twotower import TwoTowerConfig, TwoTowerForDiffusionLM  # noqa: E402
from twotower.data import block_aligned_batch  # noqa: E402

BLOCK = 16
TASKS = ("add", "sort", "copy", "reverse", "facts")
"""Families of `stages/data/tasks.py` the example trains and evaluates on (one generator for the project)."""
VOCAB_MAP = vocabulary()  # the pipeline's character tokenizer, ids only (no tokenizer object needed)
VOCAB = len(VOCAB_MAP)
PAD, BOS, EOS = VOCAB_MAP["<pad>"], VOCAB_MAP["<bos>"], VOCAB_MAP["<eos>"]


def encode(text: str) -> list[int]:
    return [VOCAB_MAP[c] for c in text]


def sample(n: int, seed: int, tasks=TASKS) -> list[tuple[str, list[int], list[int]]]:
    """n examples round-robin over `tasks`: (task, BOS + prompt ids, answer ids + EOS)."""
    rows = generate(list(tasks), -(-n // len(tasks)), seed)[:n]
    return [(r["task"], [BOS] + encode(r["prompt"]), encode(r["answer"]) + [EOS]) for r in rows]


def backbone_config() -> NemotronHConfig:
    """~0.4M parameters, every Nemotron-H layer kind."""
    return NemotronHConfig(
        vocab_size=VOCAB, hidden_size=96, layers_block_type=["mamba", "attention", "mlp", "mamba", "attention", "moe"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, intermediate_size=288,
        mamba_num_heads=6, mamba_head_dim=32, ssm_state_size=16, n_groups=1, conv_kernel=4, chunk_size=BLOCK,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, moe_shared_expert_intermediate_size=128,
        max_position_embeddings=256, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False,
    )


def ar_batch(examples):
    """Right-padded [BOS prompt answer EOS] rows; labels only on the answer (next-token)."""
    length = max(len(p) + len(a) for _, p, a in examples)
    ids = torch.full((len(examples), length), PAD)
    labels = torch.full((len(examples), length), -100)
    for i, (_, p, a) in enumerate(examples):
        row = p + a
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, len(p) - 1: len(row) - 1] = torch.tensor(a)
    return ids, labels


def lr_at(step_frac: float, peak: float) -> float:
    warm = 0.05
    if step_frac < warm:
        return peak * step_frac / warm
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step_frac - warm) / (1 - warm))))


def pretrain(model, seconds: float, batch: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0, betas=(0.9, 0.98))
    start, step = time.time(), 0
    while (elapsed := time.time() - start) < seconds:
        for g in opt.param_groups:
            g["lr"] = lr_at(elapsed / seconds, 3e-3)
        ids, labels = ar_batch(sample(batch, seed=10_000 + step))
        logits = model(ids).logits
        loss = F.cross_entropy(logits.view(-1, VOCAB), labels.view(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            print(f"  pretrain step {step:5d}  {elapsed:6.0f}s  loss {loss.item():.4f}", flush=True)
        step += 1
    print(f"  pretrain: {step} steps in {time.time() - start:.0f}s")


def train_denoiser(model, seconds: float, batch: int) -> None:
    params = [p for p in model.denoiser.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.98))
    model.train()
    start, step = time.time(), 0
    while (elapsed := time.time() - start) < seconds:
        for g in opt.param_groups:
            g["lr"] = lr_at(elapsed / seconds, 1e-3)
        ex = sample(batch, seed=20_000_000 + step)
        # each answer's last block filled with EOS, as the pipeline trains (train.fill_after_eos): decoding
        # denoises all B positions of a block, so the denoiser must learn what follows the answer
        rows = block_aligned_batch([p for _, p, _ in ex], [a for _, _, a in ex], BLOCK, PAD, fill_id=EOS)
        out = model(rows["input_ids"], attention_mask=rows["attention_mask"], loss_mask=rows["loss_mask"])
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"  denoiser step {step:5d}  {elapsed:6.0f}s  loss {out.loss.item():.4f}  "
                  f"masked acc {out.masked_accuracy.item():.3f}", flush=True)
        step += 1
    model.eval()
    print(f"  denoiser: {step} steps in {time.time() - start:.0f}s")


def evaluate(model, examples, settings: list[tuple[str, float]]) -> list[dict]:
    """Batch-1 decoding of every example under every (mode, gamma), interleaved prompt by prompt
    (order alternating) so machine-load drift hits all settings alike: exact match per task,
    forwards, wall clock."""
    stats = [{"hits": defaultdict(int), "counts": defaultdict(int), "tokens": 0, "den": 0, "ctx": 0, "wall": 0.0}
             for _ in settings]
    for n, (task, prompt, answer) in enumerate(examples):
        order = list(enumerate(settings))
        for i, (mode, gamma) in (order if n % 2 == 0 else order[::-1]):
            st = stats[i]
            t0 = time.perf_counter()
            gen = model.generate([prompt], mode=mode, gamma=gamma, max_new_tokens=32)
            st["wall"] += time.perf_counter() - t0
            k = int(gen.num_generated[0])
            st["hits"][task] += int(gen.generated[0, :k].tolist() == answer)
            st["counts"][task] += 1
            st["tokens"] += k
            st["den"] += gen.num_denoiser_forwards
            st["ctx"] += gen.num_context_forwards
    return [{"exact": sum(st["hits"].values()) / len(examples),
             "per_task": {t: st["hits"][t] / st["counts"][t] for t in st["counts"]},
             "ms_per_token": 1000 * st["wall"] / st["tokens"],
             "tokens_per_den_forward": st["tokens"] / st["den"] if st["den"] else float("nan")} for st in stats]


BATCH_MODES = ("ar", "diffusion", "verified")


AUTO_TARGET = 0.987
"""`auto` may pick diffusion where its relative quality (batch 1, γ 0.8) is at least this (the paper's
98.7 %); ar and verified always qualify (stages/evaluation/batch_sweep.py's rule, without the interval)."""


def batched_speed(model, examples, gamma: float, batch: int, modes=BATCH_MODES, **kwargs) -> dict[str, float]:
    """ms per generated token per mode decoding `batch` prompts at once, interleaved; `kwargs` go to
    `generate` (e.g. `auto_modes`)."""
    tokens, wall = dict.fromkeys(modes, 0), dict.fromkeys(modes, 0.0)
    for i in range(0, len(examples), batch):
        prompts = [p for _, p, _ in examples[i:i + batch]]
        for mode in modes:
            t0 = time.perf_counter()
            gen = model.generate(prompts, mode=mode, gamma=gamma, max_new_tokens=32, **kwargs)
            wall[mode] += time.perf_counter() - t0
            tokens[mode] += int(gen.num_generated.sum())
    return {mode: 1000 * wall[mode] / tokens[mode] for mode in modes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain-s", type=float, default=600, help="backbone pretraining budget (s)")
    ap.add_argument("--denoise-s", type=float, default=420, help="denoiser training budget (s)")
    ap.add_argument("--eval-n", type=int, default=100, help="held-out prompts (round-robin over tasks)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--gammas", default="0.5,0.7,0.8,0.9")
    ap.add_argument("--backbone-dir", default="runs/examples/tiny_nemotron_h", help="pretrained backbone cache")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    cache = Path(args.backbone_dir)
    if (cache / "config.json").exists():
        backbone = AutoModelForCausalLM.from_pretrained(cache)
        print(f"backbone: loaded from {cache}")
    else:
        backbone = AutoModelForCausalLM.from_config(backbone_config())
        pretrain(backbone.train(), args.pretrain_s, args.batch)
        backbone.save_pretrained(cache)
    backbone.eval()
    print(f"backbone: Nemotron-H, {sum(p.numel() for p in backbone.parameters()) / 1e6:.2f}M parameters, "
          f"layers {backbone.config.layers_block_type}")

    model = TwoTowerForDiffusionLM.from_backbone(backbone, TwoTowerConfig(block_size=BLOCK))
    new_params = sum(p.numel() for n, p in model.named_parameters() if n in model.new_parameter_names())
    print(f"denoiser new parameters: {new_params / 1e6:.3f}M")
    examples = sample(args.eval_n, seed=999_999_999)  # held out: seeds never used in training
    with torch.inference_mode():
        ar = evaluate(model, examples, [("ar", 1.0)])[0]
    print(f"AR exact match after pretraining: {ar['exact']:.3f}  {ar['per_task']}")
    train_denoiser(model, args.denoise_s, args.batch)

    gammas = [float(g) for g in args.gammas.split(",")]
    with torch.inference_mode():
        model.generate([examples[0][1]], mode="diffusion", max_new_tokens=8)  # warm-up, untimed
        settings = [("ar", 1.0)] + [("diffusion", g) for g in gammas] + [("verified", g) for g in gammas]
        results = evaluate(model, examples, settings)
    ar = results[0]
    rows = [("ar", None, ar)] + [(mode, g, r) for (mode, g), r in zip(settings[1:], results[1:])]
    print(f"\n{args.eval_n} held-out prompts, batch 1, block {BLOCK}, 1 CPU thread, settings interleaved per prompt")
    head = ("mode        gamma  exact  rel.q  " + "  ".join(f"{t:>7s}" for t in TASKS)
            + "   tok/den-fwd  ms/token  speedup")
    print(head)
    for mode, gamma, r in rows:
        rel = r["exact"] / ar["exact"] if ar["exact"] else float("nan")
        tasks = "  ".join(f"{r['per_task'].get(t, 0):7.2f}" for t in TASKS)
        g = "   - " if gamma is None else f"{gamma:5.2f}"
        print(f"{mode:10s} {g}  {r['exact']:5.3f}  {rel:5.3f}  {tasks}   {r['tokens_per_den_forward']:11.2f}  "
              f"{r['ms_per_token']:8.2f}  {ar['ms_per_token'] / r['ms_per_token']:6.2f}x")
    rel08 = next((r["exact"] / ar["exact"] for (mode, g), r in zip(settings, results)
                  if mode == "diffusion" and g == 0.8 and ar["exact"]), 0.0)
    speeds = {}
    with torch.inference_mode():
        for batch in (1, 4, 16):
            ms = speeds[batch] = batched_speed(model, examples, 0.8, batch)
            fastest = min(("ar", "verified"), key=ms.get)  # the modes exact by construction
            print(f"batch {batch:2d}: ms/token (γ 0.8) " + "  ".join(f"{m} {ms[m]:6.2f} {ms['ar'] / ms[m]:4.2f}x"
                                                                      for m in BATCH_MODES)
                  + f"  fastest exact mode: {fastest}")
        # auto: the table calibrate_gamma's rule would store, then timed again beside AR
        table = decide([{"batch": b, **{f"{m}_seconds": ms[m] for m in BATCH_MODES}} for b, ms in speeds.items()],
                       rel08, AUTO_TARGET)
        print(f"auto table (diffusion qualifies when its relative quality {rel08:.3f} >= {AUTO_TARGET}): {table}")
        for batch in (1, 4, 16):
            ms = batched_speed(model, examples, 0.8, batch, modes=("ar", "auto"), auto_modes=table)
            print(f"batch {batch:2d}: ms/token ar {ms['ar']:6.2f}  auto {ms['auto']:6.2f} "
                  f"{ms['ar'] / ms['auto']:4.2f}x  (ran {table[batch]})")


if __name__ == "__main__":
    main()
