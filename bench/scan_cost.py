"""The Mamba-scan cuts of the decode path, each timed against the path it replaced, interleaved.

    python bench/scan_cost.py BACKBONE_DIR          # e.g. runs/cache/pretrain_backbone/<key>/model

1. The denoiser's scan of one block (`ssd_scan(want_states=False)`): the state after a denoised
   block is never read (blocks are seeded from the context tower), so its work is skipped.
2. A short prefill as one scan chunk (`walk.ONE_CHUNK_MAX`) against chunks of B (the old path,
   obtained by setting ONE_CHUNK_MAX to 0).
3. Verified decoding's rollback of a block: the verification forward keeping the Mamba-2 state
   after every position (`record`, chunk 1), against the plain verification forward followed by a
   rescan of the accepted prefix (here half the block) from the old cache.
4. Those every-position states from the one-chunk quadratic form (`ops.EVERY_POSITION_MAX`)
   against a scan with chunks of one token (EVERY_POSITION_MAX = 0).
5. The rollback `generate` runs since `c5a04bb`: the verification forward keeping the scan's
   ingredients (`rollback`) and the states at the accepted length (`walk.rollback_states`, here half
   the block), against pair 3's every-position states.

Shapes come from the backbone's first Mamba layer; 1 torch thread; each pair is timed alternately
`--rounds` times with torch.utils.benchmark and the minimum and median are printed, with the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python bench/scan_cost.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _pair(name: str, fns: dict, rounds: int, out: dict) -> None:
    from torch.utils import benchmark

    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for label, fn in fns.items():
            t = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2)
            times[label].append(t.median * 1e6)
    (old, new) = fns
    for label in fns:
        out[f"{name}/{label}_us"] = min(times[label])
        print(f"{name:16s} {label:12s} min {min(times[label]):9.1f} µs  "
              f"median {statistics.median(times[label]):9.1f} µs")
    out[f"{name}/ratio"] = out[f"{name}/{new}_us"] / out[f"{name}/{old}_us"]
    print(f"{name:16s} {new} / {old} (min): {out[f'{name}/ratio']:.2f}")


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("backbone", help="an AutoModelForCausalLM directory with a Mamba-2 layer")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM

    import twotower.ops as ops_mod
    import twotower.walk as walk_mod
    from twotower import TwoTowerConfig, TwoTowerForDiffusionLM
    from twotower.cache import TowerCache
    from twotower.ops import ssd_scan

    torch.set_num_threads(1)
    backbone = AutoModelForCausalLM.from_pretrained(args.backbone).eval()
    model = TwoTowerForDiffusionLM.from_backbone(backbone, TwoTowerConfig(block_size=args.block_size)).eval()
    walk = model.context_walk
    mamba = next((walk.mamba(s) for s in walk.subs if s.kind == "mamba"), None)
    if mamba is None:
        raise SystemExit(f"{args.backbone}: no Mamba-2 layer to time")
    g = torch.Generator().manual_seed(0)
    B, H, P, G, S = args.block_size, mamba.num_heads, mamba.head_dim, mamba.n_groups, mamba.state_size
    scan = (torch.randn(1, B, H, P, generator=g), torch.rand(1, B, H, generator=g) + 0.1,
            -torch.rand(H, generator=g) - 0.5, torch.randn(1, B, G, S, generator=g),
            torch.randn(1, B, G, S, generator=g), torch.randn(H, generator=g), torch.randn(1, H, P, S, generator=g))
    ids = torch.randint(5, backbone.config.vocab_size, (1, args.prompt_len), generator=g)
    one_chunk = walk_mod.ONE_CHUNK_MAX

    def prefill(limit: int):
        def run():
            walk_mod.ONE_CHUNK_MAX = limit
            try:
                walk_mod.context_forward(walk, ids, TowerCache.empty(1, "cpu"), chunk=B)
            finally:
                walk_mod.ONE_CHUNK_MAX = one_chunk
        return run

    _, cache = walk_mod.context_forward(walk, ids, TowerCache.empty(1, "cpu"), chunk=B)
    block = torch.randint(5, backbone.config.vocab_size, (1, B), generator=g)

    def rescan():
        walk_mod.context_forward(walk, block, cache, chunk=B)
        walk_mod.context_forward(walk, block[:, : B // 2], cache, chunk=B)

    def every_position():
        walk_mod.context_forward(walk, block, cache, chunk=1, record={})

    def state_at():
        rollback: dict = {}
        walk_mod.context_forward(walk, block, cache, chunk=B, rollback=rollback)
        walk_mod.rollback_states(rollback, torch.tensor([B // 2]))

    def states_scan(limit: int):
        def run():
            ops_mod.EVERY_POSITION_MAX = limit
            try:
                ssd_scan(*scan, 1)
            finally:
                ops_mod.EVERY_POSITION_MAX = every
        return run

    every = ops_mod.EVERY_POSITION_MAX
    out: dict[str, float] = {}
    with torch.inference_mode():
        _pair("rollback", {"rescan_prefix": rescan, "every_position": every_position}, args.rounds, out)
        _pair("rollback now", {"every_position": every_position, "state_at": state_at}, args.rounds, out)
        _pair("every-pos scan", {"token_chunks": states_scan(0), "one_chunk": states_scan(every)}, args.rounds, out)
        _pair("block scan", {"with_states": lambda: ssd_scan(*scan, B),
                             "no_states": lambda: ssd_scan(*scan, B, want_states=False)}, args.rounds, out)
        _pair(f"prefill {args.prompt_len} tok", {"chunks_of_B": prefill(0), "one_chunk": prefill(one_chunk)},
              args.rounds, out)
    return out


if __name__ == "__main__":
    main()
