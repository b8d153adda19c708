"""How fast can each decoding mode be on a workload? Per-forward costs × the fewest forwards a mode needs.

    python bench/mode_ceiling.py --model EXPORT_DIR --examples eval_examples.jsonl

A mode's speedup over AR at batch 1 is a ratio of sums of forward costs. For an answer of n
tokens (EOS included) in blocks of B, with P the prefill, A an AR step, D a denoiser forward over a
block, V a verification (the block's context-tower forward, its greedy tokens and the Mamba-2
rollback to the kept length, as `generate` runs it) and C a plain block commit:

    ar          P + (n - 1)·A
    diffusion   P + k·D + (b - 1)·C       at best k = b = ceil(n / B): one denoiser step per block
    verified    P + k·D + v·V             at best k = v = b: every draft kept whole

The bench times P, A, D, V and C on the workload's own shapes (torch.utils.benchmark, interleaved
rounds, 1 thread), decodes every prompt in `ar`, `diffusion` and `verified` (interleaved, the
pipeline's speedup: summed AR time over summed mode time) and prints three figures per mode:
*predicted* (the costs × the forwards the mode actually ran: checks that the cost model explains
the measurement), *ceiling* (the costs × the fewest forwards: no denoiser, however good, beats it on
this workload at these costs; for diffusion, an answer as long as AR's: a wrong answer that ends
early may take fewer forwards) and *measured*. A target above the ceiling cannot be met by a better
denoiser or draft policy; only cheaper forwards, relative to an AR step, or longer answers
(more tokens per block) move it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python bench/mode_ceiling.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = ("diffusion", "verified")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a TwoTowerForDiffusionLM directory (an export)")
    p.add_argument("--examples", required=True, help="jsonl rows with `prompt` (and `task`): the workload")
    p.add_argument("--prompts-per-task", type=int, default=8,
                   help="prompts per task family (rows without `task` form one family)")
    p.add_argument("--skip-per-task", type=int, default=16,
                   help="rows skipped per family first (the pipeline's calibration slice)")
    p.add_argument("--gamma", type=float, default=0.9)
    p.add_argument("--draft", default="confident", help="verified's draft policy: full, confident, prefix or an int")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="timed decoding rounds per prompt (after a warm-up)")
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds of the forward timings (median)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.draft not in ("full", "confident", "prefix"):
        args.draft = int(args.draft)
    return args


def workload(path: str, tokenizer, per_task: int, skip: int) -> list[list[int]]:
    """The prompts, tokenized as the pipeline does (BOS included): `per_task` per family after the
    first `skip`."""
    if not Path(path).is_file():
        raise SystemExit(f"mode_ceiling: --examples {path}: no such file (a prepare_data eval_examples.jsonl)")
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows or "prompt" not in rows[0]:
        raise ValueError(f"{path}: expected jsonl rows with a `prompt` field")
    families: dict[str, list[dict]] = {}
    for r in rows:
        families.setdefault(r.get("task", ""), []).append(r)
    chosen = [r for rs in families.values() for r in (rs[skip:skip + per_task] or rs[:per_task])]
    return [tokenizer(r["prompt"])["input_ids"] for r in chosen]


def forward_costs(model, prompt: list[int], block: int, verify_len: int, rounds: int) -> dict[str, float]:
    """Median ms of the five decoding forwards on this prompt's shapes, timed interleaved; the
    verification keeps half its block (the rollback's cost hardly depends on where it cuts)."""
    from torch.utils import benchmark

    from twotower.block_context import DecodeContext
    from twotower.cache import TowerCache
    from twotower.walk import context_forward, rollback_states

    walk, cfg = model.context_walk, model.tt_config
    opts = model.context_options()  # what the denoiser needs every context forward to keep (AR keeps nothing)
    ids = torch.tensor([prompt])
    _, cache = context_forward(walk, ids, TowerCache.empty(1, "cpu"), chunk=block, **opts)
    tokens = torch.full((1, block), int(prompt[-1]))
    is_mask = torch.ones(1, block, dtype=torch.bool)
    is_mask[:, 0] = False
    positions = cache.next_pos[:, None] + torch.arange(block)
    t = torch.ones(1)
    head = walk.logits

    def verify():  # as `generate` verifies: the block's forward, its greedy tokens, the rollback
        rollback: dict = {}
        hidden, _ = context_forward(walk, tokens[:, :verify_len], cache, chunk=block, rollback=rollback, **opts)
        head(hidden).argmax(-1)
        rollback_states(rollback, torch.tensor([max(1, verify_len // 2)]))

    # each as `generate` runs it, the context tower's LM head included (the denoiser's is in its forward)
    calls = {
        "prefill": lambda: head(context_forward(walk, ids, TowerCache.empty(1, "cpu"), chunk=block, **opts)[0][:, -1]),
        "ar_step": lambda: head(context_forward(walk, tokens[:, :1], cache, chunk=block)[0][:, -1]),
        "denoiser_forward": lambda: model.denoiser(tokens, is_mask, t, positions, DecodeContext(cache, cfg, block)),
        "verify_forward": verify,
        "commit_forward": lambda: head(context_forward(walk, tokens, cache, chunk=block, **opts)[0][:, -1]),
    }
    times: dict[str, list[float]] = {k: [] for k in calls}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, fn in calls.items():
                timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
                times[name].append(timer.blocked_autorange(min_run_time=0.2).median * 1000)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def decode_all(model, prompts, *, gamma, draft, max_new_tokens, repeats) -> dict:
    """Every prompt at batch 1 in ar, diffusion and verified, interleaved per prompt; per mode the
    summed seconds and per prompt (tokens, denoiser forwards, context forwards)."""
    kw = {"ar": dict(mode="ar"), "diffusion": dict(mode="diffusion", gamma=gamma),
          "verified": dict(mode="verified", gamma=gamma, draft=draft)}
    seconds = {m: 0.0 for m in kw}
    counts: dict[str, list[tuple[int, int, int]]] = {m: [] for m in kw}
    same = {m: 0 for m in kw}
    with torch.inference_mode():
        for p in prompts:
            outs = {}
            for m in kw:  # warm-up, and the forward counts (deterministic)
                o = model.generate([p], max_new_tokens=max_new_tokens, **kw[m])
                outs[m] = o.generated[0].tolist()
                counts[m].append((int(o.num_generated[0]), o.num_denoiser_forwards, o.num_context_forwards))
            for m in kw:
                same[m] += outs[m] == outs["ar"]
            for _ in range(repeats):
                for m in kw:
                    t0 = time.perf_counter()
                    model.generate([p], max_new_tokens=max_new_tokens, **kw[m])
                    seconds[m] += time.perf_counter() - t0
    return {"seconds": seconds, "counts": counts, "same_as_ar": same}


def ceilings(costs: dict[str, float], counts: dict[str, list[tuple[int, int, int]]], block: int) -> dict:
    """The cost model over every prompt: AR time, each mode's predicted time (its own forward counts)
    and its fewest-forwards time; speedups are summed AR over summed mode time."""
    P, A, D = costs["prefill"], costs["ar_step"], costs["denoiser_forward"]
    V, C = costs["verify_forward"], costs["commit_forward"]
    ar = [P + (ctx - 1) * A for _, _, ctx in counts["ar"]]
    lengths = [n for n, _, _ in counts["ar"]]
    blocks = [0 if n <= 1 else math.ceil(n / block) for n in lengths]
    fewest = {"diffusion": [P + b * D + max(b - 1, 0) * C for b in blocks],
              "verified": [P + b * (D + V) for b in blocks]}
    predicted = {"diffusion": [P + den * D + (ctx - 1) * C for _, den, ctx in counts["diffusion"]],
                 "verified": [P + den * D + (ctx - 1) * V for _, den, ctx in counts["verified"]]}
    fewest_forwards = {"diffusion": [1 + b + max(b - 1, 0) for b in blocks], "verified": [1 + 2 * b for b in blocks]}
    out = {"mean_answer_tokens": sum(lengths) / len(lengths), "mean_blocks": sum(blocks) / len(blocks)}
    for m in MODES:
        out[m] = {"predicted": sum(ar) / sum(predicted[m]), "ceiling": sum(ar) / sum(fewest[m]),
                  "forwards_per_answer": sum(den + ctx for _, den, ctx in counts[m]) / len(counts[m]),
                  "fewest_forwards_per_answer": sum(fewest_forwards[m]) / len(blocks)}
    out["ar_forwards_per_answer"] = sum(ctx for _, _, ctx in counts["ar"]) / len(counts["ar"])
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from twotower import TwoTowerForDiffusionLM

    torch.set_num_threads(1)
    model = TwoTowerForDiffusionLM.from_pretrained(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    prompts = workload(args.examples, tok, args.prompts_per_task, args.skip_per_task)
    block = model.tt_config.block_size
    run = decode_all(model, prompts, gamma=args.gamma, draft=args.draft, max_new_tokens=args.max_new_tokens,
                     repeats=args.repeats)
    lengths = sorted(len(p) for p in prompts)
    answers = [n for n, _, _ in run["counts"]["ar"]]
    verify_len = min(block, round(sum(answers) / len(answers)))
    costs = forward_costs(model, prompts[[len(p) for p in prompts].index(lengths[len(lengths) // 2])],
                          block, verify_len, args.rounds)
    report = {"prompts": len(prompts), "block_size": block, "gamma": args.gamma, "draft": args.draft,
              "costs_ms": costs, **ceilings(costs, run["counts"], block)}
    for m in MODES:
        report[m]["measured"] = run["seconds"]["ar"] / run["seconds"][m]
        report[m]["same_as_ar"] = run["same_as_ar"][m] / len(prompts)
    print(f"[mode_ceiling] {len(prompts)} prompts (median {lengths[len(lengths) // 2]} tokens), B {block}, "
          f"γ {args.gamma}, draft {args.draft!r}, answers {report['mean_answer_tokens']:.2f} tokens "
          f"({report['mean_blocks']:.2f} blocks) on average")
    print("forward costs (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items())
          + f"; per AR step: denoiser {costs['denoiser_forward'] / costs['ar_step']:.2f}, "
          f"verify {costs['verify_forward'] / costs['ar_step']:.2f}, prefill {costs['prefill'] / costs['ar_step']:.2f}")
    print(f"{'mode':10s} {'forwards/answer':>15s} {'fewest':>7s} {'predicted':>10s} {'ceiling':>8s} "
          f"{'measured':>9s} {'== ar':>6s}")
    print(f"{'ar':10s} {report['ar_forwards_per_answer']:15.2f} {'':>7s} {1.0:9.2f}x {'':>8s} {1.0:8.2f}x {1.0:6.2f}")
    for m in MODES:
        r = report[m]
        print(f"{m:10s} {r['forwards_per_answer']:15.2f} {r['fewest_forwards_per_answer']:7.2f} "
              f"{r['predicted']:9.2f}x {r['ceiling']:7.2f}x {r['measured']:8.2f}x {r['same_as_ar']:6.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
