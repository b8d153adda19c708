"""What one decoding forward costs on CPU: prefill, one AR step, one denoiser forward over a block.

    python bench/forward_cost.py BACKBONE_DIR            # e.g. runs/cache/pretrain_backbone/<key>/model

The speedup of diffusion decoding is (prefill + n AR steps) / (prefill + k denoiser forwards), so
the ratio `denoiser forward / AR step` printed last decides how many tokens a denoiser forward must
commit to break even. The denoiser is a fresh (zero-init) wrap of the backbone: its cost does not
depend on training. All three are timed in one process, interleaved, with torch.utils.benchmark.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python bench/forward_cost.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("backbone", help="an AutoModelForCausalLM directory")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    args = p.parse_args(argv)
    from torch.utils import benchmark
    from transformers import AutoModelForCausalLM

    from twotower import TwoTowerConfig, TwoTowerForDiffusionLM
    from twotower.block_context import DecodeContext
    from twotower.cache import TowerCache
    from twotower.walk import context_forward

    torch.set_num_threads(1)
    backbone = AutoModelForCausalLM.from_pretrained(args.backbone).eval()
    model = TwoTowerForDiffusionLM.from_backbone(backbone, TwoTowerConfig(block_size=args.block_size)).eval()
    B, walk = args.block_size, model.context_walk
    ids = torch.randint(5, backbone.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        _, cache = context_forward(walk, ids, TowerCache.empty(1, "cpu"), chunk=B)
    block = torch.full((1, B), 5)
    is_mask = torch.ones(1, B, dtype=torch.bool)
    is_mask[:, 0] = False
    positions = cache.next_pos[:, None] + torch.arange(B)
    ctx = DecodeContext(cache, model.tt_config, B)
    token, t = torch.tensor([[7]]), torch.tensor([1.0])
    calls = {
        "prefill": lambda: context_forward(walk, ids, TowerCache.empty(1, "cpu"), chunk=B),
        "ar_step": lambda: context_forward(walk, token, cache, chunk=B),
        "denoiser_forward": lambda: model.denoiser(block, is_mask, t, positions, ctx),
    }
    times: dict[str, list[float]] = {k: [] for k in calls}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, fn in calls.items():
                timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
                times[name].append(timer.blocked_autorange(min_run_time=0.5).median * 1000)
    ms = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    for k, v in ms.items():
        print(f"{k:17s} {v:7.3f} ms")
    ms["denoiser_per_ar_step"] = ms["denoiser_forward"] / ms["ar_step"]
    print(f"denoiser forward / AR step: {ms['denoiser_per_ar_step']:.2f}")
    return ms


if __name__ == "__main__":
    main()
