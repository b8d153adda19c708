"""Denoiser depth x training targets, side by side: one pipeline run per cell on one machine.

    python bench/depth_targets.py --recipe recipes/smollm2_135m.yaml --root /tmp/dt \
        --depths full 4 2 --targets data context_greedy --full-steps 400 \
        --set evaluate.suites=[] '~graph.fidelity' --out /tmp/dt/table.md

Each cell is `python -m pipeline run RECIPE run.root=ROOT twotower.denoiser_layers=D
twotower.targets=T [train.max_steps=...] [--set ...]` in a subprocess, one after the other (the
cells share the root's cache: data, backbone and, for the tiny recipe, the pretrained backbone are
built once). The figures come from each run's `summary.json`, i.e. from the pipeline's own
`train_denoiser` and `evaluate` stages on the same held-out prompts: training tokens/s and steps;
verified's acceptance length (tokens kept per verification) and speed vs AR at each of
`evaluate.mode_batches`; diffusion's tokens per denoiser forward, relative quality with its 95%
interval and speed vs AR at the calibrated γ. Run it on an idle machine: the cells' wall-clock
ratios are measured side by side inside each run, but a busy neighbour slows training and so the
cell's tokens/s.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cell_overrides(depth: str, targets: str, steps: int | None) -> list[str]:
    """The `key=value` overrides of one cell (depth `full`, a layer count k, or layers `a,b,c`)."""
    layers = "null" if depth == "full" else (f"[{depth}]" if "," in depth else str(int(depth)))
    out = [f"twotower.denoiser_layers={layers}", f"twotower.targets={targets}"]
    return out + ([f"train.max_steps={steps}"] if steps else [])


def figures(summary: dict) -> dict:
    """The table's figures from a finished run's `summary.json`."""
    stages = summary.get("stages", {})
    train = stages.get("train_denoiser", {}).get("metrics", {})
    ev = stages.get("evaluate", {}).get("metrics", {})
    row = {"steps": train.get("steps"), "train_tokens_per_s": train.get("tokens_per_second"),
           "train_minutes": train.get("train_minutes"), "denoiser_params_m": (train.get("denoiser_params") or 0) / 1e6,
           "gamma": ev.get("gamma"), "tokens_per_denoiser_forward": ev.get("tokens_per_forward"),
           "relative_quality": ev.get("relative_quality"), "relative_quality_low": ev.get("relative_quality_low"),
           "relative_quality_high": ev.get("relative_quality_high"), "diffusion_speedup_b1": ev.get("speedup")}
    for b, per_mode in (ev.get("modes") or {}).items():
        for mode in ("diffusion", "verified"):
            v = per_mode.get(mode) or {}
            row[f"{mode}_speedup_b{b}"] = v.get("speedup")
            if mode == "verified":
                row[f"verified_accepted_b{b}"] = v.get("accepted_per_verify")
                row[f"verified_relative_quality_b{b}"] = v.get("relative_quality")
    return row


def _f(v, digits: int = 2) -> str:
    return "–" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def markdown(rows: list[dict], batches: list[str]) -> str:
    """The side-by-side table (one line per cell)."""
    head = ["depth", "targets", "steps", "train tok/s", "denoiser M params", "γ", "diffusion tok/den. fwd",
            "diffusion rel. quality [95% CI]", *[f"diffusion × AR b{b}" for b in batches],
            *[f"verified tok/verif. b{b}" for b in batches], *[f"verified × AR b{b}" for b in batches]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rel = (f"{_f(r.get('relative_quality'), 3)} "
               f"[{_f(r.get('relative_quality_low'), 3)}, {_f(r.get('relative_quality_high'), 3)}]")
        cells = [r["depth"], r["targets"], _f(r.get("steps")), _f(r.get("train_tokens_per_s"), 0),
                 _f(r.get("denoiser_params_m"), 1), _f(r.get("gamma")), _f(r.get("tokens_per_denoiser_forward")), rel,
                 *[_f(r.get(f"diffusion_speedup_b{b}")) for b in batches],
                 *[_f(r.get(f"verified_accepted_b{b}")) for b in batches],
                 *[_f(r.get(f"verified_speedup_b{b}")) for b in batches]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--root", required=True, help="run.root shared by the cells (its cache is reused)")
    ap.add_argument("--depths", nargs="+", default=["full", "4", "2"],
                    help="`full`, a layer count k, or a comma-separated list of layer indices")
    ap.add_argument("--targets", nargs="+", default=["data", "context_greedy"])
    ap.add_argument("--steps", type=int, default=None, help="train.max_steps of every cell (default: the recipe's)")
    ap.add_argument("--full-steps", type=int, default=None, help="train.max_steps of the full-depth cells")
    ap.add_argument("--set", nargs="*", default=[], help="further overrides for every cell")
    ap.add_argument("--overlay", default=None)
    ap.add_argument("--out", default=None, help="write the markdown table (and a .json beside it) here")
    args = ap.parse_args(argv)
    for depth in args.depths:
        if depth != "full" and not all(part.isdigit() for part in depth.split(",")):
            ap.error(f"--depths: {depth!r} is neither `full`, a layer count nor a list of layer indices")
    rows = []
    for depth in args.depths:
        for targets in args.targets:
            steps = args.full_steps if depth == "full" and args.full_steps else args.steps
            cmd = [sys.executable, "-m", "pipeline", "run", args.recipe, f"run.root={args.root}",
                   *cell_overrides(depth, targets, steps), *args.set]
            if args.overlay:
                cmd += ["--overlay", args.overlay]
            print(f"[cell] depth={depth} targets={targets}: {' '.join(cmd[3:])}", flush=True)
            started = time.monotonic()
            done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"cell depth={depth} targets={targets} failed (exit {done.returncode})")
            summary = json.loads((Path(args.root) / "latest" / "summary.json").read_text())
            row = {"depth": depth, "targets": targets, "wall_minutes": (time.monotonic() - started) / 60,
                   "run": summary.get("run"), **figures(summary)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    batches = sorted({k.rsplit("_b", 1)[1] for r in rows for k in r if k.startswith("verified_speedup_b")}, key=int)
    table = markdown(rows, batches)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
