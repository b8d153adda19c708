"""CPU decode benchmark: AR, diffusion and verified side by side, in one process, at several γ and batch sizes.

    python bench/decode_cpu.py                         # trains a small Nemotron-H on a copy task (~2-3 min)
    python bench/decode_cpu.py --model EXPORT_DIR --examples eval_examples.jsonl   # an exported model
    python bench/decode_cpu.py --quick                 # seconds: untrained tiny model (plumbing only)
    python bench/decode_cpu.py --save DIR              # keep the trained copy-task model ...
    python bench/decode_cpu.py --model DIR             # ... and bench it again on copy-task prompts

All modes decode the same prompts in the same process, interleaved (each repeat times every mode
once), so the ratios are measured under the same load; with `--examples`, every batch size decodes
the same rows (the first `--shared-prompts`, cut into batches), so batch 1 is not one prompt's luck;
every figure is the mean of `--repeats`
timed runs after a warm-up. The table gives per mode tokens/s, the speedup over AR, generated
tokens per model forward a row took part in, the fraction of tokens equal to AR greedy's, and for
verified the tokens kept per verification.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python bench/decode_cpu.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    DECODE_MODES,
    SIZES,
    auto_table,
    copy_task_batch,
    decode_batches_side_by_side,
    format_decode_table,
    nemotron_h_config,  # noqa: E402
    train_steps,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a TwoTowerForDiffusionLM directory (save_pretrained/export)")
    p.add_argument("--examples", default=None,
                   help="with --model: jsonl rows with a `prompt` field (default: copy-task prompts)")
    p.add_argument("--save", default=None, help="save the built-in trained model here (save_pretrained)")
    p.add_argument("--quick", action="store_true", help="untrained tiny model, few tokens: plumbing only")
    p.add_argument("--steps", type=int, default=300, help="AR and denoiser training steps each (built-in model)")
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--gammas", type=float, nargs="+", default=[0.9, 0.8, 0.6])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--modes", nargs="+", default=list(DECODE_MODES), choices=list(DECODE_MODES),
                   help="modes timed against AR (ar is always included)")
    p.add_argument("--auto-agreement", type=float, default=0.987,
                   help="auto: diffusion qualifies where it agrees with AR on at least this share of tokens "
                        "(ar and verified always do); after the table, ar and auto are timed again side by side")
    p.add_argument("--draft", default="confident",
                   help="verified's draft policy: full, confident, or an int k (at most k denoiser steps)")
    p.add_argument("--shared-prompts", type=int, default=None,
                   help="with --examples: every batch size decodes the same first N rows, cut into batches "
                        "(default: the largest batch size; a larger batch repeats them)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared: keep 1-2)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    return p.parse_args(argv)


def trained_copy_model(args: argparse.Namespace):
    """A small Nemotron-H-pattern two-tower model trained on the copy task, and a prompt maker."""
    from transformers import AutoModelForCausalLM

    from twotower import TwoTowerConfig, TwoTowerForDiffusionLM

    size = SIZES["tiny" if args.quick else "small"]
    config = nemotron_h_config(size)
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    steps = 2 if args.quick else args.steps
    cpu = torch.device("cpu")

    def ar_step(_: int):
        x = copy_task_batch(16, 64, config.vocab_size, g, period=(4, 12))
        return backbone(input_ids=x, labels=x).loss

    ar = train_steps(ar_step, list(backbone.parameters()), steps=steps, warmup=1, tokens_per_step=16 * 64,
                     lr=3e-3, device=cpu, bf16=False)
    backbone.eval()
    model = TwoTowerForDiffusionLM.from_backbone(backbone, TwoTowerConfig(block_size=args.block_size))

    def den_step(_: int):
        return model(copy_task_batch(16, 64, config.vocab_size, g, period=(4, 12))).loss

    model.train()
    den = train_steps(den_step, [p for p in model.denoiser.parameters() if p.requires_grad], steps=steps,
                      warmup=1, tokens_per_step=16 * 64, lr=3e-3, device=cpu, bf16=False)
    model.eval()
    print(f"[decode_cpu] trained: AR loss {ar['first_loss']:.2f} -> {ar['last_loss']:.2f}, "
          f"denoiser loss {den['first_loss']:.2f} -> {den['last_loss']:.2f}", flush=True)

    def prompts(batch: int) -> list[torch.Tensor]:
        return [copy_task_batch(batch, args.prompt_len, config.vocab_size, torch.Generator().manual_seed(batch),
                                period=(4, 12))]

    return model, prompts


def exported_model(args: argparse.Namespace):
    """An exported model and prompts from a jsonl of examples (its tokenizer sits beside it)."""
    from transformers import AutoTokenizer

    from twotower import TwoTowerForDiffusionLM

    model = TwoTowerForDiffusionLM.from_pretrained(args.model).eval()
    if not args.examples:  # a model saved by --save: the copy task it was trained on
        vocab = model.backbone_config.vocab_size

        def copy_prompts(batch: int) -> list[torch.Tensor]:
            return [copy_task_batch(batch, args.prompt_len, vocab, torch.Generator().manual_seed(batch),
                                    period=(4, 12))]

        return model, copy_prompts
    tok = AutoTokenizer.from_pretrained(args.model)
    rows = [json.loads(line) for line in Path(args.examples).read_text().splitlines() if line.strip()]
    if not rows or "prompt" not in rows[0]:
        raise ValueError(f"{args.examples}: expected jsonl rows with a `prompt` field")

    shared = max(args.batches) if args.shared_prompts is None else args.shared_prompts
    # as the pipeline tokenizes its prompts (stages/evaluation/decoding_eval.py): BOS included
    ids = [tok(rows[i % len(rows)]["prompt"])["input_ids"] for i in range(shared)]

    def prompts(batch: int) -> list[list[list[int]]]:
        """The same `shared` prompts at every batch size, cut into batches of `batch`."""
        return [ids[i:i + batch] for i in range(0, max(shared, batch), batch)] if batch <= shared else \
            [[ids[i % shared] for i in range(batch)]]

    return model, prompts


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    model, prompts = exported_model(args) if args.model else trained_copy_model(args)
    if args.save and not args.model:
        model.save_pretrained(args.save)
    new_tokens = 8 if args.quick else args.max_new_tokens
    rows = []
    for gamma in args.gammas:
        table = []
        for batch in args.batches:
            modes = tuple(dict.fromkeys(["ar", *args.modes]))
            row = decode_batches_side_by_side(model, prompts(batch), gamma=gamma, max_new_tokens=new_tokens,
                                      device=torch.device("cpu"), bf16=False, repeats=args.repeats, modes=modes,
                                      draft=int(args.draft) if args.draft.isdigit() else args.draft)
            table.append({**row, "gamma": gamma})
        print(f"[decode_cpu] gamma {gamma:.2f}, B {model.block_size}, {new_tokens} new tokens, "
              f"{args.threads} thread(s):\n{format_decode_table(table)}", flush=True)
        rows += table
        picks = auto_table(table, args.auto_agreement)
        autos = [{**decode_batches_side_by_side(model, prompts(batch), gamma=gamma, max_new_tokens=new_tokens,
                                        device=torch.device("cpu"), bf16=False, repeats=args.repeats,
                                        modes=("ar", "auto"),
                                        draft=int(args.draft) if args.draft.isdigit() else args.draft,
                                        auto_modes=picks),
                  "gamma": gamma} for batch in args.batches]
        print(f"[decode_cpu] auto (table {picks}), timed again beside ar:\n{format_decode_table(autos)}", flush=True)
        rows += autos
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return rows


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
