"""Stage `evaluate`: AR-only vs diffusion at the calibrated γ, side by side (section `evaluate`).

On the held-out examples that calibration did not use, it decodes each prompt with the AR tower
alone and with diffusion at the chosen γ (and B), interleaved in this process, and reports per-task
and overall quality, quality relative to AR with its 95% paired-bootstrap interval over prompts
(`relative_quality_low` / `relative_quality_high`, stages/evaluation/confidence.py), wall-clock speedup,
tokens per denoiser forward and peak
memory, plus a per-task bar chart. The metrics keys `ar_quality`, `diffusion_quality`,
`relative_quality`, `speedup`, `tokens_per_forward` and `per_task` are a contract (summary.json).
Each suite named in `suites` then runs in both modes too (`humaneval`: stages/evaluation/humaneval.py, its
`humaneval_*` metrics added to the same manifest). With `mode_batches`, every mode (ar, diffusion,
verified, auto) is measured side by side at those batch sizes (stages/evaluation/mode_table.py): `modes` in
the metrics, flat `b<batch>_<mode>_<figure>` in MLflow, and `speedup.png` (speedup by batch size).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, get_args

from stages.api import Range, StageContext
from twotower.devices import check_reserved, devices_of

SECTION = "evaluate"
REQUIRES = ("prepare_data", "train_denoiser", "calibrate_gamma")
Suite = Literal["humaneval"]
"""Extra benchmark suites `evaluate.suites` may name (run after the held-out comparison)."""
SUITES: tuple[str, ...] = get_args(Suite)


@dataclass
class Config:
    """The `evaluate` section."""

    prompts_per_task: Annotated[int, Range(1)] = 24
    """Held-out prompts per task (after the calibration slice)."""
    repeats: Annotated[int, Range(1)] = 3
    """Timing repeats per prompt and mode (medians are kept)."""
    max_new_tokens: Annotated[int, Range(1)] = 32
    """Generation cap per prompt (decoding stops earlier at EOS)."""
    num_threads: Annotated[int, Range(0)] = 0
    """torch intra-op threads; 0 leaves torch's default."""
    ar_threads: dict[int, Annotated[int, Range(1)]] | Literal["auto"] = field(default_factory=dict)
    """Batch size -> torch threads AR decoding is timed with, where its best differs from
    `num_threads`; `auto`: measured at the stage's start (AR at every thread count up to
    `num_threads` on the first prompts, the fastest kept; reported as `metrics.ar_threads`). Every
    mode is timed at its own best settings (`stages.evaluation.batch_sweep.AR_THREADS`)."""
    suites: list[Suite] = field(default_factory=list)
    """Extra suites, each in AR and in diffusion at the calibrated γ: `humaneval` (stages/evaluation/humaneval.py)."""
    humaneval_problems: Annotated[int, Range(1, 164)] = 164
    """HumanEval subset size: the first N of the 164 problems."""
    humaneval_max_new_tokens: Annotated[int, Range(1)] = 256
    """Generation cap per HumanEval completion (it stops earlier at a stop sequence or EOS)."""
    humaneval_timeout_s: Annotated[float, Range(0, low_open=True)] = 10.0
    """Seconds each completion's tests may run in the sandbox."""
    humaneval_chat_template: bool = False
    """Send each HumanEval prompt as a user turn through the tokenizer's chat template and check the
    code of the fenced answer (instruct models, e.g. SmolLM2-Instruct; stages/evaluation/humaneval.py)."""
    sandbox: Literal["auto", "namespaces", "guard"] = "auto"
    """Isolation of executed code (stages/evaluation/sandbox.py): `auto` and `namespaces` run it
    contained (root with unshare; an error where that is not permitted), `guard` runs it with no
    security boundary, only when named here, with a warning."""
    mode_batches: list[Annotated[int, Range(1)]] = field(default_factory=lambda: [1, 8])
    """Batch sizes of the mode table (ar, diffusion, verified, auto side by side:
    stages/evaluation/mode_table.py); [] skips it."""

    def __post_init__(self) -> None:
        if self.prompts_per_task < 1 or self.repeats < 1 or self.max_new_tokens < 1:
            raise ValueError("evaluate.prompts_per_task, evaluate.repeats and evaluate.max_new_tokens must be >= 1")
        unknown = [s for s in self.suites if s not in SUITES]
        if unknown:
            raise ValueError(f"evaluate.suites: unknown suite(s) {unknown}; known: {list(SUITES)}")
        if (not 1 <= self.humaneval_problems <= 164 or self.humaneval_max_new_tokens < 1
                or self.humaneval_timeout_s <= 0):
            raise ValueError("evaluate.humaneval_problems must be in 1..164, evaluate.humaneval_max_new_tokens >= 1 "
                             "and evaluate.humaneval_timeout_s > 0")
        if any(b < 1 for b in self.mode_batches) or len(set(self.mode_batches)) != len(self.mode_batches):
            raise ValueError(f"evaluate.mode_batches={self.mode_batches}: each must be >= 1, without repeats")
        from stages.evaluation.sandbox import ISOLATIONS

        if self.sandbox not in ISOLATIONS:
            raise ValueError(f"evaluate.sandbox must be one of {ISOLATIONS}, got {self.sandbox!r}")


def bar_chart(per_task: dict[str, dict], path: Path, gamma: float) -> None:
    """Per-task AR vs diffusion quality bars, the task kind under each name."""
    from stages.evaluation import plots

    tasks = list(per_task)
    x = range(len(tasks))
    fig, ax = plots.axes(max(5.0, 1.1 * len(tasks)), 3.8)
    ax.bar([i - 0.2 for i in x], [per_task[t]["ar_quality"] for t in tasks], 0.4, label="AR")
    ax.bar([i + 0.2 for i in x], [per_task[t]["diffusion_quality"] for t in tasks], 0.4,
           label=f"diffusion γ={gamma:g}")
    ax.set_xticks(list(x), [f"{t}\n({per_task[t]['kind']})" for t in tasks], fontsize=8)
    ax.set_ylim(0, 1.05)
    plots.save(fig, ax, path, title="AR vs diffusion per task", ylabel="quality (exact match)",
               legend_loc="lower right")


def _examples(path: str, cfg: Config, calib: dict, ctx: StageContext) -> list[dict]:
    from stages.evaluation import decoding_eval as de

    offset = int(calib.get("calibration_examples", {}).get("per_task", 0))
    try:
        return de.load_examples(path, cfg.prompts_per_task, offset=offset)
    except ValueError:
        ctx.warn(f"no held-out examples after the {offset} calibration prompts per task in {path}; "
                 "evaluating on the calibration prompts")
        return de.load_examples(path, cfg.prompts_per_task)


def check_resources(cfg: Config, sections: dict, resources, stage: str) -> None:
    """Config time: the towers' devices (`backbone.context_device` / `denoiser_device`) against the
    GPUs this stage reserves (`twotower.devices`)."""
    check_reserved(sections.get("backbone") or {}, float(resources.num_gpus), stage)


def run(cfg: Config, inputs: dict[str, dict], ctx: StageContext) -> dict:
    """Decode the eval split both ways; return the contract metrics and a bar chart."""
    import torch

    from stages.backbones.loading import load_trained
    from stages.evaluation import decoding_eval as de

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    from stages.evaluation import batch_sweep

    torch.manual_seed(ctx.seed)
    calib = inputs["calibrate_gamma"]
    gamma = float(calib["metrics"]["gamma"])
    setting = de.Setting(gamma, calib.get("block_size"))
    examples = _examples(inputs["prepare_data"]["artifacts"]["eval_examples"], cfg, calib, ctx)
    model, tokenizer = load_trained(inputs["train_denoiser"])
    ar_threads = batch_sweep.set_ar_threads(cfg.ar_threads, model, tokenizer, examples, [1, *cfg.mode_batches],
                                            cfg.max_new_tokens)
    de.reset_peak_memory()  # this stage's peak, not that of a stage that ran before in this worker
    rows = de.measure(model, tokenizer, examples, [setting], repeats=cfg.repeats,
                      max_new_tokens=cfg.max_new_tokens, progress=lambda d, t: ctx.progress(d, t, "evaluating"))
    summ = de.summarise(rows, setting.label)
    memory = de.peak_memory_mb()
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bar_chart(summ["per_task"], out / "per_task.png", gamma)
    ctx.log_artifact(out / "per_task.png")
    worst = de.losers(summ["per_task"])
    ctx.log_metrics({f"{t}_{k}": v[k] for t, v in summ["per_task"].items()
                     for k in ("ar_quality", "diffusion_quality", "relative_quality", "relative_quality_low",
                               "relative_quality_high", "speedup")})
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for ex_rows in zip(*(iter(rows),) * 2):  # (AR, diffusion) per example, in order
            ar, dif = ex_rows
            f.write(json.dumps({"task": ar.task, "ar": ar.text, "diffusion": dif.text,
                                "ar_correct": ar.correct, "diffusion_correct": dif.correct}) + "\n")
    metrics = {
        "ar_quality": summ["ar_quality"], "diffusion_quality": summ["diffusion_quality"],
        "relative_quality": summ["relative_quality"], "relative_quality_low": summ["relative_quality_low"],
        "relative_quality_high": summ["relative_quality_high"], "speedup": summ["speedup"],
        "tokens_per_forward": summ["tokens_per_forward"], "per_task": summ["per_task"],
        "gamma": gamma, "median_speedup": summ["median_speedup"],
        "tokens_per_model_forward": summ["tokens_per_model_forward"],
        "ar_tokens_per_second": summ["ar_tokens_per_second"],
        "diffusion_tokens_per_second": summ["diffusion_tokens_per_second"],
        "n_prompts": len(examples), **memory, "ar_threads": ar_threads,
    }
    artifacts = {"bar_chart": ctx.artifact_path("per_task.png"),
                 "evaluation": ctx.artifact_path("evaluation.json"),
                 "predictions": ctx.artifact_path("predictions.jsonl")}
    if cfg.mode_batches:
        metrics["modes"] = _mode_table(cfg, model, tokenizer, examples, setting, calib, out, ctx)
        artifacts["speedup"] = ctx.artifact_path("speedup.png")
    if "humaneval" in cfg.suites:
        metrics.update(_humaneval(cfg, model, tokenizer, setting, out, ctx))
        artifacts["humaneval"] = ctx.artifact_path("humaneval.jsonl")
    (out / "evaluation.json").write_text(json.dumps({**metrics, "worst_tasks": worst}, indent=1))
    ctx.log_artifact(out / "evaluation.json")
    return {"metrics": metrics, "placement": devices_of(model),
            "artifacts": artifacts,
            "worst_tasks": worst, "gamma": gamma, "block_size": calib.get("block_size")}


def _mode_table(cfg: Config, model, tokenizer, examples: list[dict], setting, calib: dict, out: Path,
                ctx: StageContext) -> dict:
    """ar, diffusion at the calibrated γ, verified and auto side by side at each of `mode_batches`
    (stages/evaluation/mode_table.py), logged flat to MLflow, and the speedup-by-batch-size plot."""
    from stages.evaluation import mode_table

    table_modes = calib.get("auto_modes") or {}
    sizes = sorted(cfg.mode_batches)
    rows = mode_table.measure(model, tokenizer, examples, sizes, gamma=setting.gamma, block_size=setting.block_size,
                              auto_modes={int(b): m for b, m in table_modes.items()} or None,
                              repeats=cfg.repeats, max_new_tokens=cfg.max_new_tokens,
                              progress=lambda d, t: ctx.progress(d, t, "every mode"))
    table = mode_table.summarise(rows, sizes)
    ctx.log_metrics(mode_table.flat(table))
    mode_table.speedup_plot(calib.get("batch_sweep") or [], table_modes, table, out / "speedup.png")
    ctx.log_artifact(out / "speedup.png")
    return table


def _humaneval(cfg: Config, model, tokenizer, setting, out: Path, ctx: StageContext) -> dict:
    """The HumanEval suite in AR and in diffusion at the calibrated setting (stages/evaluation/humaneval.py)."""
    from stages.evaluation import humaneval

    modes = [humaneval.DecodingMode("ar", "ar"),
             humaneval.DecodingMode("diffusion", "diffusion", setting.gamma, setting.block_size)]
    metrics = humaneval.run_suite(model, tokenizer, modes, problems=cfg.humaneval_problems,
                                  max_new_tokens=cfg.humaneval_max_new_tokens, timeout_s=cfg.humaneval_timeout_s,
                                  isolation=cfg.sandbox, out_path=out / "humaneval.jsonl",
                                  chat_template=cfg.humaneval_chat_template,
                                  progress=lambda d, t: ctx.progress(d, t, "humaneval"))
    ctx.log_artifact(out / "humaneval.jsonl")
    return metrics
