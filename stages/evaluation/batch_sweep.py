"""Batch-size sweep of `calibrate_gamma`: which decoding mode is fastest at each batch size (issue 13).

Diffusion's speedup over AR shrinks as the batch grows (a batched block waits for its slowest row),
so no one mode is best everywhere. `generate(mode="auto")` reads a table `auto_modes` (batch size
-> mode) from the export's generation_config.json; this module measures it:

- `measure` decodes the same prompts with `ar`, `diffusion` (at the calibrated γ) and `verified`
  at each batch size, in this process, interleaved: every round times each (batch size, mode)
  once, the order of the modes rotated from round to round, so load on a shared machine hits all
  modes alike; each figure is the median of the rounds. Every batch size decodes the same
  `max(batch_sizes)` prompts (mixed over the task families), cut into batches of that size: batch
  1 is then timed on sixteen prompts, not on the first one alone, whose answer length and
  acceptance would decide the table's batch-1 entry by chance;
- `decide` (pure, so its rule is unit-tested on made-up timings) picks per batch size the fastest
  mode that meets the recipe's quality target: `ar` and `verified` always do (verified's output is
  AR's, token for token), `diffusion` only when the lower 95% confidence bound of its relative
  quality at the calibrated γ meets the target. Rows decode independently in every mode, so that
  quality, measured at batch 1, holds at every batch size; only speed depends on the batch.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

SWEPT_MODES = ("ar", "diffusion", "verified")
"""The modes the sweep times (`auto` picks among them)."""
ALWAYS_EXACT = ("ar", "verified")
"""Modes whose output is AR's by construction: they meet any quality target."""


def batch_prompts(examples: list[dict], size: int) -> list[str]:
    """`size` prompts taken round-robin over the task families (a batch mixes families, as real
    traffic does), cycling when there are fewer examples than `size`."""
    by_task: dict[str, list[str]] = {}
    for ex in examples:
        by_task.setdefault(ex.get("task", "text"), []).append(ex["prompt"])
    mixed = [p for group in zip(*[g * (size // len(g) + 1) for g in by_task.values()]) for p in group]
    return mixed[:size]


AR_THREADS: dict[int, int] = {}
"""Batch size -> torch intra-op threads AR decoding is timed with, where they differ from the
stage's `num_threads` (`calibrate.ar_threads`, `evaluate.ar_threads`; the stage sets this table
for its own process). Every mode is timed at its own best settings: on 2 CPU cores a batch-1 AR
step of a 135 M model is faster on one thread than on two (thread sync costs more than it splits),
while a 16-token block forward gains from both; a speedup measured against AR held at two threads
would be against a handicapped baseline."""


def set_ar_threads(setting, model, tokenizer, examples: list[dict], batch_sizes: list[int],
                   max_new_tokens: int) -> dict[int, int]:
    """Fill `AR_THREADS` from a stage's `ar_threads`: a `{batch size: threads}` table as given, or
    `"auto"`: AR timed at every thread count up to the stage's on the first prompts at each batch
    size, the fastest kept (`tune_ar_threads`). Returns the table (for the stage's metrics)."""
    AR_THREADS.clear()
    if setting == "auto":
        prompts = [tokenizer(ex["prompt"])["input_ids"] for ex in examples[: max(batch_sizes)]]
        AR_THREADS.update(tune_ar_threads(model, prompts, sorted(set(batch_sizes)), max_new_tokens))
    else:
        AR_THREADS.update({int(b): int(n) for b, n in (setting or {}).items()})
    return dict(AR_THREADS)


def tune_ar_threads(model, prompts: list[list[int]], batch_sizes: list[int], max_new_tokens: int,
                    rounds: int = 3) -> dict[int, int]:
    """`{batch size: threads}` where AR decoding of the first `batch size` prompts is fastest at
    fewer threads than torch's current count (the median of `rounds` timed runs after a warm-up
    at each count, 1..current). Sizes where the current count is fastest are left out."""
    import torch

    top = torch.get_num_threads()
    out: dict[int, int] = {}
    try:
        for b in batch_sizes:
            batch = (prompts * b)[:b]
            best = (float("inf"), top)
            for n in range(1, top + 1):
                torch.set_num_threads(n)
                with torch.inference_mode():
                    times = [timed_generate(model, batch, mode="ar", max_new_tokens=max_new_tokens)[1]
                             for _ in range(rounds + 1)][1:]
                best = min(best, (statistics.median(times), -n))  # ties: more threads
            if -best[1] != top:
                out[b] = -best[1]
    finally:
        torch.set_num_threads(top)
    return out


def timed_generate(model, prompts, **kwargs) -> tuple[Any, float]:
    """`model.generate(prompts, **kwargs)` and its wall-clock seconds, every GPU the towers sit on
    synchronised (the towers may be placed on different devices: twotower/devices.py); AR at the
    threads `AR_THREADS` names for this batch size."""
    import torch

    gpus = {p.device for p in model.parameters() if p.device.type == "cuda"}
    batch = len(prompts) if not isinstance(prompts, torch.Tensor) or prompts.dim() > 1 else 1
    threads = AR_THREADS.get(batch) if kwargs.get("mode") == "ar" else None
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for d in gpus:
            torch.cuda.synchronize(d)
        t0 = time.perf_counter()
        out = model.generate(prompts, **kwargs)
        for d in gpus:
            torch.cuda.synchronize(d)
        return out, time.perf_counter() - t0
    finally:
        if threads:
            torch.set_num_threads(before)


def measure(model, tokenizer, examples: list[dict], batch_sizes: list[int], *, gamma: float,
            block_size: int | None, rounds: int, max_new_tokens: int, progress=None) -> list[dict[str, Any]]:
    """Time every mode at every batch size, interleaved; one row per batch size with, per mode `m`,
    `{m}_seconds` (median of `rounds`, summed over the batches of the shared prompts),
    `{m}_tokens` (generated, EOS included), `{m}_tokens_per_s` and `{m}_speedup` (AR seconds / its
    seconds on the same prompts)."""
    import torch

    if not examples:
        raise ValueError("batch sweep: no calibration examples to decode")
    kwargs: dict[str, Any] = {"gamma": gamma, "max_new_tokens": max_new_tokens}
    if block_size:
        kwargs["block_size"] = block_size
    ids = [tokenizer(p)["input_ids"] for p in batch_prompts(examples, max(batch_sizes))]
    batches = {b: [ids[i:i + b] for i in range(0, len(ids), b)] for b in batch_sizes}
    times: dict[tuple[int, str], list[float]] = {(b, m): [] for b in batch_sizes for m in SWEPT_MODES}
    tokens: dict[tuple[int, str], int] = {}
    with torch.inference_mode():
        for m in SWEPT_MODES:  # warm-up, untimed: first calls pay for allocations
            model.generate(batches[min(batch_sizes)][0], mode=m, **kwargs)
        done, total = 0, rounds * len(batch_sizes)
        for r in range(rounds):
            for b in batch_sizes:
                shift = (r + b) % len(SWEPT_MODES)
                for m in SWEPT_MODES[shift:] + SWEPT_MODES[:shift]:
                    secs, n_tokens = 0.0, 0
                    for batch in batches[b]:
                        out, batch_secs = timed_generate(model, batch, mode=m, **kwargs)
                        secs, n_tokens = secs + batch_secs, n_tokens + int(out.num_generated.sum())
                    times[(b, m)].append(secs)
                    tokens[(b, m)] = n_tokens
                done += 1
                if progress is not None:
                    progress(done, total)
    rows = []
    for b in batch_sizes:
        row: dict[str, Any] = {"batch": b}
        for m in SWEPT_MODES:
            secs = statistics.median(times[(b, m)])
            row.update({f"{m}_seconds": secs, f"{m}_tokens": tokens[(b, m)],
                        f"{m}_tokens_per_s": tokens[(b, m)] / max(1e-12, secs)})
        for m in SWEPT_MODES:
            row[f"{m}_speedup"] = row["ar_seconds"] / max(1e-12, row[f"{m}_seconds"])
        rows.append(row)
    return rows


def decide(rows: list[dict[str, Any]], diffusion_low: float, target: float) -> dict[int, str]:
    """Per batch size, the fastest mode (least seconds for the same prompts) that meets `target`:
    `ar` and `verified` always, `diffusion` when `diffusion_low` (the lower confidence bound of its
    relative quality at the calibrated γ) reaches `target`. Ties go to the exact modes, AR first."""
    allowed = [m for m in ("ar", "verified", "diffusion") if m in ALWAYS_EXACT or diffusion_low >= target]
    return {int(r["batch"]): min(allowed, key=lambda m: r[f"{m}_seconds"]) for r in rows}


def auto_speedup(row: dict[str, Any], mode: str) -> float:
    """`auto`'s speedup at a swept batch size: that of the mode the table picked there."""
    return float(row[f"{mode}_speedup"])
