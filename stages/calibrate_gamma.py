"""Stage `calibrate_gamma`: choose the confidence threshold γ on held-out prompts (section `calibrate`).

For every γ in the grid (and every block size, when a list is given) it decodes the same held-out
prompts with AR and with diffusion, side by side in this process (`stages.evaluation.decoding_eval`), and
records quality relative to AR with its 95% paired-bootstrap interval over prompts
(`stages.evaluation.confidence`), tokens per denoiser forward and wall-clock speedup. It picks the smallest γ
whose *lower confidence bound* of relative quality meets `target_relative_quality` (ties across
block sizes: the fastest), so a γ that meets the target only by luck of the slice is not picked;
when no point does, it picks the one with the best lower bound, says so loudly and records
`target_met = 0`. A Pareto plot (relative quality against speedup, each point labelled) is saved.
Then, at the chosen γ, a batch-size sweep (`batch_sizes`, stages/evaluation/batch_sweep.py) times ar,
diffusion and verified side by side and records per batch size the fastest mode meeting the
target: `auto_modes`, which export writes into generation_config.json for `generate(mode="auto")`.

Calibration uses the first `prompts_per_task` held-out examples of each task; `evaluate` uses the
ones after them. With `max_interval_width` set, a chosen point whose interval is wider grows the
slice once (`slice_size`: width ∝ 1/√n, capped at `max_prompts_per_task`) and the sweep is summarised
again on all of it; `evaluate` then starts after the grown slice.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from stages.api import Range, StageContext
from twotower.devices import check_reserved, devices_of

SECTION = "calibrate"
REQUIRES = ("prepare_data", "train_denoiser")


@dataclass
class Config:
    """The `calibrate` section: the γ sweep."""

    gammas: list[Annotated[float, Range(0, 1, low_open=True)]] = field(
        default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    """Confidence thresholds to sweep, each in (0, 1]."""
    block_sizes: list[Annotated[int, Range(2)]] | None = None
    """Decoding block sizes to sweep as well; null: the model's trained block size only."""
    target_relative_quality: Annotated[float, Range(0, 1, low_open=True)] = 0.987
    """Quality relative to AR the chosen γ must reach, in (0, 1] (the paper's 0.987)."""
    prompts_per_task: Annotated[int, Range(1)] = 8
    """Held-out prompts per task used for calibration."""
    repeats: Annotated[int, Range(1)] = 3
    """Timing repeats per prompt and setting (medians are kept)."""
    max_new_tokens: Annotated[int, Range(1)] = 32
    """Generation cap per prompt (decoding stops earlier at EOS)."""
    num_threads: Annotated[int, Range(0)] = 0
    """torch intra-op threads; 0 leaves torch's default."""
    ar_threads: dict[int, Annotated[int, Range(1)]] | Literal["auto"] = field(default_factory=dict)
    """Batch size -> torch threads AR decoding is timed with, where its best differs from
    `num_threads`; `auto`: measured at the stage's start (AR at every thread count up to
    `num_threads` on the first prompts, the fastest kept; reported as `metrics.ar_threads`). Every
    mode is timed at its own best settings (`stages.evaluation.batch_sweep.AR_THREADS`)."""
    max_interval_width: Annotated[float, Range(0, 1, low_open=True)] | None = None
    """Widest 95% interval of the chosen point's relative quality; when wider, the slice grows (null: fixed slice)."""
    max_prompts_per_task: Annotated[int, Range(1)] = 64
    """Cap on the grown calibration slice per task (with `max_interval_width`)."""
    batch_sizes: list[Annotated[int, Range(1)]] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """Batch sizes of the mode sweep (ar, diffusion at the chosen γ, verified) that fills `auto_modes`; [] skips it."""
    batch_rounds: Annotated[int, Range(1)] = 3
    """Interleaved timing rounds of the batch sweep (the median is kept)."""

    def __post_init__(self) -> None:
        validate(self)


def validate(cfg: Config) -> None:
    """Clear errors naming the bad key, before any decoding (or, via the engine, any training)."""
    t = cfg.target_relative_quality
    if not (0.0 < t <= 1.0):
        raise ValueError(f"calibrate.target_relative_quality={t}: must be in (0, 1]")
    if not cfg.gammas:
        raise ValueError("calibrate.gammas: empty list")
    bad = [g for g in cfg.gammas if not 0.0 < g <= 1.0]
    if bad:
        raise ValueError(f"calibrate.gammas: {bad} outside (0, 1]")
    if cfg.block_sizes is not None and any(b < 2 for b in cfg.block_sizes):
        raise ValueError(f"calibrate.block_sizes={cfg.block_sizes}: each must be >= 2")
    if cfg.prompts_per_task < 1 or cfg.repeats < 1 or cfg.max_new_tokens < 1:
        raise ValueError("calibrate.prompts_per_task, calibrate.repeats and calibrate.max_new_tokens must be >= 1")
    if any(b < 1 for b in cfg.batch_sizes) or len(set(cfg.batch_sizes)) != len(cfg.batch_sizes):
        raise ValueError(f"calibrate.batch_sizes={cfg.batch_sizes}: each must be >= 1, without repeats")
    if cfg.batch_rounds < 1:
        raise ValueError(f"calibrate.batch_rounds={cfg.batch_rounds}: must be >= 1")


def check(sections: dict) -> None:
    """Config time, across sections: a swept block size above the trained one cannot decode (the
    denoiser saw no longer blocks); found at config time, not after training. ValueError naming keys."""
    sizes = (sections.get(SECTION) or {}).get("block_sizes") or []
    trained = int((sections.get("twotower") or {}).get("block_size", 16))
    too_big = [b for b in sizes if b > trained]
    if too_big:
        raise ValueError(f"calibrate.block_sizes: {too_big} exceed twotower.block_size={trained} (the trained "
                         "block size); sweep sizes up to it")


def slice_size(n: int, width: float, target_width: float, cap: int) -> int:
    """Prompts per task for an interval of `target_width`, from one of `width` measured on `n`:
    the width shrinks as 1/sqrt(n), so n·(width/target)², at least n, at most max(n, cap)."""
    if width <= target_width or n >= cap:
        return n
    return min(cap, max(n + 1, math.ceil(n * (width / target_width) ** 2)))


def _low(p: dict) -> float:
    """A point's lower confidence bound of relative quality (its point estimate when it has none)."""
    return p.get("relative_quality_low", p["relative_quality"])


def choose(points: list[dict], target: float) -> tuple[dict, bool]:
    """The smallest γ whose lower confidence bound meets `target` (fastest among equal γ), else the
    best lower bound (then the best point estimate, then speed)."""
    ok = [p for p in points if _low(p) >= target]
    if ok:
        return min(ok, key=lambda p: (p["gamma"], -p["speedup"])), True
    return max(points, key=lambda p: (_low(p), p["relative_quality"], p["speedup"])), False


def _points(de, rows: list, settings: list) -> list[dict]:
    """Summary rows of every setting (relative quality with its interval, speedup, ...)."""
    out = []
    for s in settings:
        summ = de.summarise(rows, s.label)
        out.append({"gamma": s.gamma, "block_size": s.block_size, **{k: v for k, v in summ.items() if k != "per_task"}})
    return out


def pareto_plot(points: list[dict], target: float, chosen: dict, path: Path) -> None:
    """Relative quality against speedup, each point labelled with its γ (and B)."""
    from stages.evaluation import plots

    fig, ax = plots.axes(5.5, 4)
    xs = [p["speedup"] for p in points]
    ys = [p["relative_quality"] for p in points]
    ax.plot(xs, ys, "o", color="tab:blue")
    ci = [p for p in points if "relative_quality_low" in p and "relative_quality_high" in p]
    if ci:  # the 95% paired-bootstrap interval of each point
        ax.errorbar([p["speedup"] for p in ci], [p["relative_quality"] for p in ci],
                    yerr=[[max(0.0, p["relative_quality"] - p["relative_quality_low"]) for p in ci],
                          [max(0.0, p["relative_quality_high"] - p["relative_quality"]) for p in ci]],
                    fmt="none", ecolor="tab:blue", alpha=0.5, capsize=3)
    for p in points:
        label = f"γ={p['gamma']:g}" + (f",B={p['block_size']}" if p.get("block_size") else "")
        ax.annotate(label, (p["speedup"], p["relative_quality"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.plot([chosen["speedup"]], [chosen["relative_quality"]], "o", ms=12, mfc="none", color="tab:red",
            label=f"chosen γ={chosen['gamma']:g}")
    ax.axhline(target, ls="--", color="gray", label=f"target {target:g}")
    ax.axvline(1.0, ls=":", color="gray")
    ax.set_xlabel("wall-clock speedup over AR (×)")
    plots.save(fig, ax, path, title="γ calibration: quality vs speed", ylabel="quality relative to AR",
               legend_loc="lower left")


def check_resources(cfg: Config, sections: dict, resources, stage: str) -> None:
    """Config time: the towers' devices (`backbone.context_device` / `denoiser_device`) against the
    GPUs this stage reserves (`twotower.devices`)."""
    check_reserved(sections.get("backbone") or {}, float(resources.num_gpus), stage)


def run(cfg: Config, inputs: dict[str, dict], ctx: StageContext) -> dict:
    """Sweep γ (× B), pick the smallest γ meeting the target, save table and Pareto plot."""
    import torch

    from stages.backbones.loading import load_trained
    from stages.evaluation import decoding_eval as de
    from stages.evaluation.batch_sweep import auto_speedup

    validate(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    from stages.evaluation import batch_sweep

    torch.manual_seed(ctx.seed)
    examples = de.load_examples(inputs["prepare_data"]["artifacts"]["eval_examples"], cfg.prompts_per_task)
    model, tokenizer = load_trained(inputs["train_denoiser"])
    ar_threads = batch_sweep.set_ar_threads(cfg.ar_threads, model, tokenizer, examples, [1, *cfg.batch_sizes],
                                            cfg.max_new_tokens)
    trained_b = int(inputs["train_denoiser"]["twotower"]["block_size"])
    too_big = [b for b in (cfg.block_sizes or []) if b > trained_b]
    if too_big:
        raise ValueError(f"calibrate.block_sizes: {too_big} exceed the trained block size {trained_b}")
    settings = [de.Setting(g, b) for b in (cfg.block_sizes or [None]) for g in sorted(cfg.gammas)]
    rows = de.measure(model, tokenizer, examples, settings, repeats=cfg.repeats,
                      max_new_tokens=cfg.max_new_tokens,
                      progress=lambda d, t: ctx.progress(d, t, "calibrating"))
    per_task = cfg.prompts_per_task
    if cfg.max_interval_width is not None:  # grow the slice until the chosen point's interval is narrow enough
        first, _ = choose(_points(de, rows, settings), cfg.target_relative_quality)
        width = first["relative_quality_high"] - first["relative_quality_low"]
        want = slice_size(per_task, width, cfg.max_interval_width, cfg.max_prompts_per_task)
        if want > per_task:
            try:
                more = de.load_examples(inputs["prepare_data"]["artifacts"]["eval_examples"], want - per_task,
                                        offset=per_task)
            except ValueError:
                more = []
            if more:
                rows += de.measure(model, tokenizer, more, settings, repeats=cfg.repeats,
                                   max_new_tokens=cfg.max_new_tokens,
                                   progress=lambda d, t: ctx.progress(d, t, "calibrating (grown slice)"))
                examples += more
                per_task = want
            ctx.warn(f"calibrate: interval width {width:.3f} > max_interval_width={cfg.max_interval_width}: "
                     + (f"slice grown to {per_task} prompts per task" if more else
                        "no further held-out prompts to grow the slice"))
    points = []
    for i, s in enumerate(settings):
        summ = de.summarise(rows, s.label)
        point = {"gamma": s.gamma, "block_size": s.block_size, **{k: v for k, v in summ.items() if k != "per_task"},
                 "per_task_relative_quality": {t: v["relative_quality"] for t, v in summ["per_task"].items()},
                 "per_task_relative_quality_interval": {t: [v["relative_quality_low"], v["relative_quality_high"]]
                                                        for t, v in summ["per_task"].items()}}
        points.append(point)
        ctx.log_metrics({"sweep_gamma": s.gamma, "sweep_relative_quality": point["relative_quality"],
                         "sweep_relative_quality_low": point["relative_quality_low"],
                         "sweep_relative_quality_high": point["relative_quality_high"],
                         "sweep_speedup": point["speedup"], "sweep_tokens_per_forward": point["tokens_per_forward"]},
                        step=i)
    chosen, met = choose(points, cfg.target_relative_quality)
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    message = ""
    if not met:
        message = (f"NO γ MET calibrate.target_relative_quality={cfg.target_relative_quality}: using the best "
                   f"available γ={chosen['gamma']:g} (relative quality {chosen['relative_quality']:.3f}, "
                   f"95% interval [{chosen['relative_quality_low']:.3f}, {chosen['relative_quality_high']:.3f}], "
                   f"speedup {chosen['speedup']:.2f}x)")
        ctx.warn(message)
    sweep, auto_modes = _batch_sweep(cfg, model, tokenizer, examples, chosen, ctx)
    (out / "calibration.json").write_text(json.dumps({
        "points": points, "chosen": chosen, "target_met": met, "config": asdict(cfg), "warning": message,
        "batch_sweep": sweep, "auto_modes": {str(b): m for b, m in auto_modes.items()}}, indent=1))
    pareto_plot(points, cfg.target_relative_quality, chosen, out / "pareto.png")
    ctx.log_artifact(out / "pareto.png")
    ctx.log_artifact(out / "calibration.json")
    metrics = {"gamma": chosen["gamma"], "relative_quality": chosen["relative_quality"],
               "relative_quality_low": chosen["relative_quality_low"],
               "relative_quality_high": chosen["relative_quality_high"],
               "speedup": chosen["speedup"], "tokens_per_forward": chosen["tokens_per_forward"],
               "ar_quality": chosen["ar_quality"], "diffusion_quality": chosen["diffusion_quality"],
               "target_met": 1.0 if met else 0.0, "n_prompts": len(examples), "ar_threads": ar_threads}
    if chosen.get("block_size"):
        metrics["block_size"] = chosen["block_size"]
    for row in sweep:  # flat, so MLflow shows them: speedup of each mode per batch size
        metrics.update({f"b{row['batch']}_{m}_speedup": row[f"{m}_speedup"] for m in ("diffusion", "verified")})
        metrics[f"b{row['batch']}_auto_speedup"] = auto_speedup(row, auto_modes[row["batch"]])
    return {"metrics": metrics, "placement": devices_of(model),
            "artifacts": {"pareto": ctx.artifact_path("pareto.png"),
                          "calibration": ctx.artifact_path("calibration.json")},
            "gamma": chosen["gamma"], "block_size": chosen.get("block_size"), "target_met": met,
            "warning": message, "points": points,
            "calibration_examples": {"per_task": per_task, "offset": 0},
            "batch_sweep": sweep, "auto_modes": {str(b): m for b, m in auto_modes.items()}}


def _batch_sweep(cfg: Config, model, tokenizer, examples: list[dict], chosen: dict,
                 ctx: StageContext) -> tuple[list[dict], dict[int, str]]:
    """Time ar, diffusion at the chosen γ and verified at each of `batch_sizes` (stages/evaluation/batch_sweep.py)
    and pick per batch size the fastest mode meeting the quality target: `auto`'s table."""
    from stages.evaluation import batch_sweep

    if not cfg.batch_sizes:
        return [], {}
    sizes = sorted(cfg.batch_sizes)
    rows = batch_sweep.measure(model, tokenizer, examples, sizes, gamma=chosen["gamma"],
                               block_size=chosen.get("block_size"), rounds=cfg.batch_rounds,
                               max_new_tokens=cfg.max_new_tokens,
                               progress=lambda d, t: ctx.progress(d, t, "batch sweep"))
    table = batch_sweep.decide(rows, _low(chosen), cfg.target_relative_quality)
    for i, row in enumerate(rows):
        row["auto"] = table[row["batch"]]
        ctx.log_metrics({"batch_sweep_batch": row["batch"], **{f"batch_sweep_{m}_speedup": row[f"{m}_speedup"]
                                                         for m in batch_sweep.SWEPT_MODES}}, step=i)
    return rows, table
