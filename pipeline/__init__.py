"""The orchestration layer: config, stage DAG, Ray runner, cache and resume, MLflow, CLI.

    python -m pipeline run [RECIPE] [key=value ...]       # see pipeline/cli.py and docs/pipeline.md

    from pipeline import load_config, run_pipeline
    result = run_pipeline(load_config("recipes/tiny.yaml", ["train.max_steps=5"]), runner="local")

Importing this package stays light (no Ray, MLflow or torch): those load only when a run needs them.
"""
from pipeline.config import ConfigError, PipelineConfig, load_config
from pipeline.runner import run_pipeline
from pipeline.state import PipelineError, RunResult, StageFailed

__all__ = ["ConfigError", "PipelineConfig", "PipelineError", "RunResult", "StageFailed", "load_config",
           "run_pipeline"]
