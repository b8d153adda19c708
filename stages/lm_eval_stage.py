"""Stage `lm_eval` (optional): score the export with lm-evaluation-harness tasks (section `lm_eval`).

It runs `lm_eval.simple_evaluate` on the `twotower` model (`stages.evaluation.lm_eval_model`) over the
export stage's directory (or `lm_eval.pretrained`), and returns every task's every numeric metric
flat in the manifest, so the engine puts them in summary.json and MLflow:
`lm_eval_<task>_<metric>` (`acc`, `acc_norm`, `exact_match`, ... with a non-default filter
appended, e.g. `lm_eval_gsm8k_exact_match_strict-match`; standard errors as `<metric>_stderr`).
The whole lm-eval results object (configs, versions, n-samples) is the `results` artifact; its
`config.model_args` records the export path, the decoding mode, γ and the block size the run used.
With `log_samples: true`, every scored example (document, prompt, model output, per-sample metrics:
lm-eval's `log_samples`) is written to `lm_eval_samples.jsonl`, one JSON object per line with its
`task`, as the `samples` artifact.

Add it to a recipe's graph with `lm_eval: {needs: [export]}`. Tasks come from lm-eval's own
catalogue (which downloads datasets from the hub) or from local task YAMLs under `include_path`
(offline: `dataset_path: json` over a local file). The cache key covers this section and the code,
not the files under `include_path`: after editing a task file, rerun with `--force lm_eval`.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from stages.api import Range, StageContext

SECTION = "lm_eval"
EXTRA_HINT = "lm-evaluation-harness is not installed: pip install -e '.[eval]' (the `eval` extra)"
REQUIRES: tuple[str, ...] = ()  # `export` is read when the graph has it (else `lm_eval.pretrained`)


@dataclass
class Config:
    """The `lm_eval` section."""

    tasks: list[str] = field(default_factory=list)
    """lm-eval task (or group) names."""
    limit: Annotated[int, Range(1)] | None = None
    """Examples per task (None: all)."""
    batch_size: Annotated[int, Range(1)] = 1
    """Requests per model call."""
    include_path: str | None = None
    """A directory of extra task YAMLs (local tasks)."""
    num_fewshot: Annotated[int, Range(0)] | None = None
    """Few-shot examples per prompt (None: each task's default)."""
    mode: Literal["diffusion", "verified", "mock_ar", "ar", "auto"] | None = None
    """`generate_until` decoding, any mode the `twotower` lm-eval model takes (`twotower.generate.MODES`:
    diffusion, verified, mock_ar, ar, auto); None: the export's generation_config.json."""
    gamma: Annotated[float, Range(0, 1, low_open=True)] | None = None
    """Diffusion confidence threshold (None: the export's calibrated γ)."""
    max_gen_toks: Annotated[int, Range(1)] = 256
    """Generation cap when a task does not set `max_gen_toks`."""
    pretrained: str | None = None
    """An exported two-tower directory to score; None: the upstream `export` stage's `path`."""
    log_samples: bool = False
    """Write every scored example (prompt, output, per-sample metrics) to `lm_eval_samples.jsonl`
    (lm-eval's `log_samples`); off by default: the file holds every document and grows with `limit`."""

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("lm_eval.tasks is empty: name at least one lm-eval task")
        if self.batch_size < 1 or self.max_gen_toks < 1:
            raise ValueError("lm_eval.batch_size and lm_eval.max_gen_toks must be >= 1")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise ValueError(f"lm_eval.include_path={self.include_path} is not a directory")


def validate(cfg: Config) -> None:
    """Before anything runs: the optional extra must be installed."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError(EXTRA_HINT)


def flat_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """`{task: {"acc,none": .5, ...}}` -> `{"lm_eval_<task>_acc": .5, ...}` (numeric, finite only)."""
    out = {}
    for task, values in results.items():
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            metric, _, filt = key.partition(",")
            name = f"lm_eval_{task}_{metric}" + ("" if filt in ("", "none") else f"_{filt}")
            out[re.sub(r"[^A-Za-z0-9_.\-/]", "_", name)] = float(value)
    return out


def run(cfg: Config, inputs: dict[str, dict], ctx: StageContext) -> dict:
    """Evaluate the export on `cfg.tasks`; every task's metrics flat in the manifest."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from stages.evaluation.lm_eval_model import TwoTowerLM

    path = cfg.pretrained or (inputs.get("export") or {}).get("path")
    if not path:
        raise ValueError("lm_eval: no model to score: set lm_eval.pretrained or add `export` to graph.lm_eval.needs")
    lm = TwoTowerLM(pretrained=path, mode=cfg.mode, gamma=cfg.gamma, batch_size=cfg.batch_size,
                    max_gen_toks=cfg.max_gen_toks)
    ctx.progress(0, None, f"lm-eval: {', '.join(cfg.tasks)}")
    res = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                                  task_manager=TaskManager(include_path=cfg.include_path),
                                  log_samples=cfg.log_samples,
                                  random_seed=ctx.seed, numpy_random_seed=ctx.seed, torch_random_seed=ctx.seed,
                                  fewshot_random_seed=ctx.seed)
    metrics = flat_metrics(res["results"])
    ctx.log_metrics(metrics)
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    artifacts = {}
    samples = res.pop("samples", None)
    if cfg.log_samples:
        lines = [json.dumps({"task": task, **example}, default=str)
                 for task, examples in (samples or {}).items() for example in examples]
        _write(out / "lm_eval_samples.jsonl", "".join(line + "\n" for line in lines))
        ctx.log_artifact(out / "lm_eval_samples.jsonl")
        artifacts["samples"] = ctx.artifact_path("lm_eval_samples.jsonl")
    _write(out / "lm_eval_results.json", json.dumps(res, indent=1, default=str))
    ctx.log_artifact(out / "lm_eval_results.json")
    return {"metrics": metrics, "artifacts": {"results": ctx.artifact_path("lm_eval_results.json"), **artifacts},
            "lm_eval": {"model": str(path), "mode": lm.mode, "gamma": lm.gamma, "block_size": lm.block_size,
                        "tasks": list(cfg.tasks),
                        "limit": cfg.limit}}


def _write(path: Path, text: str) -> None:
    """Write `text` whole or not at all (a temporary file, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
