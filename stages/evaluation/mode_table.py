"""Every decoding mode side by side at a few batch sizes: `evaluate`'s mode table (issue 13).

`evaluate`'s contract figures compare AR and diffusion one prompt at a time. Users also choose
between `verified` (AR's output, faster when drafts are accepted) and `auto` (calibrate_gamma's
per-batch-size pick), and the answer depends on the batch size, so this measures all four modes
on the same held-out prompts at each of `evaluate.mode_batches`:

- the prompts are cut into consecutive batches of b; each batch is decoded by every mode, in this
  process, interleaved (the order of the modes rotated per repeat), and each batch's median over
  the repeats is kept. A row is charged 1/b of its batch's seconds, so speedup = Σ AR seconds /
  Σ mode seconds over the same prompts;
- quality per prompt as in `stages.evaluation.decoding_eval` (exact match, else agreement with AR at the same
  batch size), relative quality with its paired-bootstrap interval (`decoding_eval.summarise`);
- tokens per denoiser forward and per model forward count, for each row, the forwards that row took
  part in (`GenerateOutput.row_denoiser_forwards` / `row_forwards`), so a batch's finished rows
  are not charged for their neighbours' forwards. A mode without denoiser forwards (`ar`, or
  `auto` when it picks `ar`) has no tokens per denoiser forward (None).
"""
from __future__ import annotations

import statistics
from typing import Any

MODES = ("ar", "diffusion", "verified", "auto")
"""The modes of the table, AR (the reference) first."""
FIGURES = ("relative_quality", "relative_quality_low", "relative_quality_high", "speedup",
           "tokens_per_denoiser_forward", "tokens_per_model_forward", "accepted_per_verify")
"""The figures reported per batch size and mode."""


def measure(model, tokenizer, examples: list[dict], batch_sizes: list[int], *, gamma: float,
            block_size: int | None, auto_modes: dict[int, str] | None, repeats: int, max_new_tokens: int,
            progress=None) -> list:
    """`decoding_eval.Row`s, one per (batch size, mode, prompt); `setting` is `"<mode>@<batch>"`
    (`"ar@<b>"` for AR). `auto` is left out when there is no `auto_modes` table."""
    import torch

    from stages.data.tasks import exact_match
    from stages.evaluation import decoding_eval as de
    from stages.evaluation.batch_sweep import timed_generate

    modes = [m for m in MODES if m != "auto" or auto_modes]
    kwargs: dict[str, dict[str, Any]] = {m: {"mode": m, "gamma": gamma, "max_new_tokens": max_new_tokens}
                                         for m in modes}
    if block_size:
        for kw in kwargs.values():
            kw["block_size"] = block_size
    if "auto" in kwargs:
        kwargs["auto"]["auto_modes"] = auto_modes
    eos = tokenizer.eos_token_id
    ids = [tokenizer(ex["prompt"])["input_ids"] for ex in examples]
    chunks = [(b, s) for b in batch_sizes for s in range(0, len(examples), b)]
    rows: list = []
    with torch.inference_mode():
        for m in modes:  # warm-up, untimed
            model.generate(ids[:1], **kwargs[m])
        for n, (b, start) in enumerate(chunks):
            batch = ids[start:start + b]
            times: dict[str, list[float]] = {m: [] for m in modes}
            outs: dict[str, Any] = {}
            for r in range(max(1, repeats)):
                shift = r % len(modes)
                for m in modes[shift:] + modes[:shift]:
                    outs[m], secs = timed_generate(model, batch, **kwargs[m])
                    times[m].append(secs)
            ar_ids: list[list[int]] = []
            for m in modes:
                out, secs = outs[m], statistics.median(times[m])
                for i, ex in enumerate(examples[start:start + b]):
                    generated = out.generated[i, : int(out.num_generated[i])].tolist()
                    text, new = de.answer_text(tokenizer, generated)
                    if m == "ar":
                        ar_ids.append(new)
                    answer = ex.get("answer")
                    den = int(out.row_denoiser_forwards[i])
                    rows.append(de.Row(
                        task=ex["task"], kind=ex.get("kind", "global"), setting=f"{m}@{b}", text=text,
                        correct=None if answer in (None, "") else float(exact_match(text, answer)),
                        new_tokens=len(generated) if eos in generated else len(new),
                        denoiser_forwards=den, context_forwards=int(out.row_forwards[i]) - den,
                        seconds=secs / len(batch), agreement=de._agreement(ar_ids[i], new), ids=new,
                        verifies=out.num_verify_rows / len(batch), accepted=out.num_accepted / len(batch)))
            if progress is not None:
                progress(n + 1, len(chunks))
    return rows


def summarise(rows: list, batch_sizes: list[int]) -> dict[str, dict[str, dict[str, Any]]]:
    """`{"<b>": {mode: {figure: value}}}` for every batch size and measured mode (FIGURES, plus
    `quality`)."""
    from stages.evaluation import decoding_eval as de

    table: dict[str, dict[str, dict[str, Any]]] = {}
    for b in batch_sizes:
        at_b = [r for r in rows if r.setting.endswith(f"@{b}")]
        ar = [r for r in at_b if r.setting == f"ar@{b}"]
        per_mode = {}
        for m in MODES:
            mine = [r for r in at_b if r.setting == f"{m}@{b}"]
            if not mine:
                continue
            # decoding_eval.summarise compares setting "ar" with another: relabel AR at this batch size
            summ = de.summarise([de.Row(**{**vars(r), "setting": de.AR}) for r in ar] + mine, f"{m}@{b}")
            den = sum(r.denoiser_forwards for r in mine)
            per_mode[m] = {"quality": summ["diffusion_quality"],
                           **{k: summ[k] for k in ("relative_quality", "relative_quality_low",
                                                   "relative_quality_high", "speedup", "tokens_per_model_forward")},
                           "tokens_per_denoiser_forward": summ["tokens_per_forward"] if den else None,
                           # verified's acceptance length: tokens kept per verification (1..B)
                           "accepted_per_verify": (sum(r.accepted for r in mine) / verifies
                                                   if (verifies := sum(r.verifies for r in mine)) else None)}
        table[str(b)] = per_mode
    return table


def flat(table: dict[str, dict[str, dict[str, Any]]]) -> dict[str, float]:
    """`b<batch>_<mode>_<figure>` scalars of a `summarise` table (MLflow), Nones left out."""
    return {f"b{b}_{m}_{k}": v for b, modes in table.items() for m, figs in modes.items()
            for k, v in figs.items() if v is not None}


def speedup_plot(sweep: list[dict], auto_modes: dict[str, str], table: dict, path) -> None:
    """Speedup over AR against batch size, one line per mode, from calibrate_gamma's batch sweep
    (`auto`: the speedup of the mode its table picked there), with evaluate's own measurements at
    `mode_batches` as open markers of the same colour."""
    from stages.evaluation import plots
    from stages.evaluation.batch_sweep import auto_speedup

    fig, ax = plots.axes(5.5, 4)
    colours = {"ar": "tab:gray", "diffusion": "tab:blue", "verified": "tab:green", "auto": "tab:red"}
    xs = [r["batch"] for r in sweep]
    for m in MODES:
        if sweep:
            ys = [auto_speedup(r, auto_modes[str(r["batch"])]) if m == "auto" else r[f"{m}_speedup"] for r in sweep]
            ax.plot(xs, ys, marker="o", ms=4, color=colours[m], ls="--" if m == "auto" else "-",
                    label=f"{m} (calibration sweep)")
        at = [(int(b), figs[m]["speedup"]) for b, figs in table.items() if m in figs]
        if at:
            ax.plot([a for a, _ in at], [s for _, s in at], ls="none", marker="o", mfc="none", ms=9,
                    color=colours[m], label=f"{m} (evaluate)")
    ax.set_xscale("log", base=2)
    ticks = sorted({r["batch"] for r in sweep} | {int(b) for b in table})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("batch size")
    plots.save(fig, ax, path, title="speedup over AR by batch size", ylabel="wall-clock speedup over AR (×)",
               legend_loc="best")
