"""`verified`'s draft policies side by side on an export: the same prompts, one process, interleaved.

    python bench/draft_policy.py --model EXPORT_DIR --examples eval_examples.jsonl \
        --policies confident prefix 1 --gamma 0.7 --ar-threads 1 --threads 2

Per prompt, AR and `verified` under every policy decode in turn (the order rotated per repeat, each
prompt's median kept). Every run of `verified` must equal AR token for token (checked). Printed per
policy: speedup (summed AR seconds / summed policy seconds), tokens kept per verification, tokens
verified per verification (the verification forward's width: what "prefix" shortens) and denoiser
forwards per block. AR runs at `--ar-threads`, the policies at `--threads` (each at its own best).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--examples", required=True)
    p.add_argument("--prompts", type=int, default=12, help="first N prompts of the examples file")
    p.add_argument("--policies", nargs="+", default=["confident", "prefix"])
    p.add_argument("--gamma", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ar-threads", type=int, default=1)
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    import twotower.decoding as td
    from twotower import TwoTowerForDiffusionLM

    policies = [int(x) if x.isdigit() else x for x in args.policies]
    model = TwoTowerForDiffusionLM.from_pretrained(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    rows = [json.loads(line) for line in Path(args.examples).read_text().splitlines() if line.strip()]
    prompts = [tok(r["prompt"])["input_ids"] for r in rows[: args.prompts]]
    widths: dict = {}
    real_verify = td.verify_block

    def counting(model_, block, *a, **k):  # the verification forward's width, per policy
        widths.setdefault(current, []).append(block.shape[1])
        return real_verify(model_, block, *a, **k)

    td.verify_block = counting
    runs = [("ar", None)] + [("verified", d) for d in policies]
    secs = {r: [] for r in runs}
    stats = {r: {"accepted": 0, "verifies": 0, "den": 0, "blocks": 0} for r in runs}
    with torch.inference_mode():
        for ids in prompts:
            per = {r: [] for r in runs}
            ref = None
            for rep in range(args.repeats + 1):  # the first round is a warm-up
                order = runs[rep % len(runs):] + runs[: rep % len(runs)]
                for mode, draft in order:
                    current = draft
                    torch.set_num_threads(args.ar_threads if mode == "ar" else args.threads)
                    kw = {"mode": mode, "gamma": args.gamma, "max_new_tokens": args.max_new_tokens}
                    if draft is not None:
                        kw["draft"] = draft
                    t0 = time.perf_counter()
                    out = model.generate([ids], **kw)
                    dt = time.perf_counter() - t0
                    if rep:
                        per[(mode, draft)].append(dt)
                    if mode == "ar":
                        ref = out.sequences
                    elif ref is not None and not torch.equal(out.sequences, ref):
                        raise SystemExit(f"verified ({draft}) differs from ar: a bug")
                    if rep == 1:
                        s = stats[(mode, draft)]
                        s["accepted"] += out.num_accepted
                        s["verifies"] += out.num_verify_rows
                        s["den"] += out.num_denoiser_forwards
            for r in runs:
                secs[r].append(statistics.median(per[r]))
    td.verify_block = real_verify
    ar = sum(secs[("ar", None)])
    print(f"{len(prompts)} prompts, γ {args.gamma}, AR {args.ar_threads} thread(s), verified {args.threads}")
    for mode, draft in runs[1:]:
        s = stats[(mode, draft)]
        w = widths.get(draft, [])
        print(f"{draft!s:>10}: {ar / sum(secs[(mode, draft)]):.2f}x AR | tokens kept / verification "
              f"{s['accepted'] / max(1, s['verifies']):.2f} | tokens verified / verification "
              f"{statistics.mean(w) if w else float('nan'):.2f} | denoiser forwards / verification "
              f"{s['den'] / max(1, s['verifies']):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
