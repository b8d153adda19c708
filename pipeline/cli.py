"""`python -m pipeline`: run, plan, validate, status, track, ui, generate, serve.

    python -m pipeline run                              # the embedded default recipe (recipes/tiny.yaml)
    python -m pipeline run recipes/tiny.yaml train.max_steps=20 ~graph.export --runner local
    python -m pipeline run tiny --force train_denoiser  # rerun a stage and everything downstream
    python -m pipeline run --resume [RUN_DIR]           # a failed/killed run, from its saved config
    python -m pipeline plan recipes/nano.yaml --json    # resolved DAG, resources, size estimate
    python -m pipeline validate recipes/*.yaml
    python -m pipeline status [RUN_DIR]                 # default: runs/latest
    python -m pipeline track RUN_DIR [--uri URI]        # log an untracked run to MLflow afterwards
    python -m pipeline ui                               # MLflow UI on 127.0.0.1 for the run store
    python -m pipeline generate EXPORT_DIR --prompt "..." [--mode diffusion] [--gamma 0.9]
    python -m pipeline serve EXPORT_DIR [--port 8000]   # OpenAI-compatible server on Ray Serve

Overrides (`key=value`, `~key`) may come anywhere on the line, before or after options.

Exit status: 0 success, 1 a stage failed, 2 a config or usage error (printed without a traceback).
Heavy libraries (Ray, MLflow, torch) are imported only by the commands that need them, so `--help`
and config errors answer at once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

from pipeline.cli_parsing import parse, version
from pipeline.completion import print_script
from pipeline.config import CLI, DEFAULT_RECIPE, REPO_ROOT, ConfigError, PipelineConfig, Problem, load_config


def resolve_recipe(arg: str | None, defaults: str | None = None) -> Path | None:
    """A recipe argument as a path: a file, or a name under recipes/ (`tiny` -> recipes/tiny.yaml).

    Without one: the embedded default recipe, unless another defaults file was given (`--defaults`).
    """
    if arg is None:
        return DEFAULT_RECIPE if DEFAULT_RECIPE.exists() and defaults is None else None
    for candidate in (Path(arg), REPO_ROOT / "recipes" / f"{arg}.yaml", REPO_ROOT / "recipes" / arg):
        if candidate.is_file():
            return candidate
    return Path(arg)  # the loader reports "no such file" with the name


def split_args(args: list[str]) -> tuple[str | None, list[str]]:
    """(recipe, overrides): the first argument is the recipe unless it looks like an override."""
    if args and "=" not in args[0] and not args[0].startswith("~"):
        return args[0], args[1:]
    return None, args


def _load(args: argparse.Namespace) -> tuple[PipelineConfig, Path | None]:
    recipe_arg, overrides = split_args(args.args)
    recipe = resolve_recipe(recipe_arg, args.defaults)
    return load_config(recipe, overrides, defaults=args.defaults, overlays=args.overlay), recipe


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate one or more recipes (each with the same overrides)."""
    recipes = [a for a in args.args if "=" not in a and not a.startswith("~")] or [None]
    overrides = [a for a in args.args if "=" in a or a.startswith("~")]
    status = 0
    for arg in recipes:
        recipe = resolve_recipe(arg, args.defaults)
        try:
            cfg = load_config(recipe, overrides, defaults=args.defaults, overlays=args.overlay)
        except ConfigError as err:
            print(f"{recipe or args.defaults or 'pipeline.yaml'}: INVALID\n{err}", file=sys.stderr)
            status = 2
            continue
        from planning.estimate_cache import cached_estimate
        error, warning = _check_root(cfg, cached_estimate(cfg))
        if error:
            print(f"{recipe or args.defaults or 'pipeline.yaml'}: INVALID\n{error}", file=sys.stderr)
            status = 2
            continue
        if warning:
            print(f"{recipe or 'pipeline.yaml'}: warning: {warning}", file=sys.stderr)
        from pipeline.cluster import cluster_problem
        cluster = cluster_problem(cfg)
        if cluster:
            print(f"{recipe or 'pipeline.yaml'}: INVALID on the cluster\n{cluster}", file=sys.stderr)
            status = 2
            continue
        if cfg.tracking.enabled:
            from pipeline.tracking import TrackingUnavailable, check_tracking
            try:
                check_tracking(cfg)
            except TrackingUnavailable as err:
                print(f"{recipe or args.defaults or 'pipeline.yaml'}: INVALID\n{err}", file=sys.stderr)
                status = 2
                continue
        print(f"{recipe or 'pipeline.yaml'}: ok ({len(cfg.stages)} stages: {' -> '.join(cfg.stages)})")
    return status


def _check_root(cfg: PipelineConfig, estimate: Any = None) -> tuple[str | None, str | None]:
    """`run.root` writable (else an error) and, given the plan's estimate, with room for what the
    run writes (else a warning: a big recipe is validated on a laptop before it runs on a cluster's
    root). `validate` passes the estimate's cached parameter counts (`planning.estimate_cache`:
    sizing a backbone costs seconds of imports the first time only)."""
    from pipeline.diskspace import check_root, plan_bytes
    return check_root(Path(cfg.run.root), plan_bytes(estimate if isinstance(estimate, dict) else None))


def plan_of(cfg: PipelineConfig, with_estimate: bool = True) -> dict[str, Any]:
    """The plan: resolved config, DAG in order with resources and cache state, and the estimate."""
    from pipeline.runner import stage_keys
    from pipeline.store import ArtifactStore
    store = ArtifactStore(cfg.run.root)
    keys = stage_keys(cfg)
    stages = {}
    for name, stage in cfg.stages.items():
        stages[name] = {"needs": list(stage.spec.needs), "module": stage.module, "section": stage.section,
                        "resources": cfg.resolved["graph"][name]["resources"], "retries": stage.spec.retries,
                        "cache_key": keys[name], "cached": store.lookup(name, keys[name]) is not None}
    plan: dict[str, Any] = {"name": cfg.name, "sources": cfg.sources, "runner": cfg.run.runner,
                            "order": list(cfg.stages), "stages": stages, "config": cfg.resolved}
    from planning.estimate import plan_world
    plan["world"] = plan_world(cfg)  # what train_denoiser will run: stages/training/world_size.py
    if with_estimate:
        plan["estimate"] = _estimate(cfg)
    return plan


def _estimate(cfg: PipelineConfig) -> Any:
    try:
        from planning import estimate
    except ImportError as err:
        if getattr(err, "name", None) == "planning.estimate":
            return None
        return {"error": f"{type(err).__name__}: {err}"}
    try:
        result = estimate.estimate(cfg)
    except Exception as err:  # the plan stays useful without the estimate
        return {"error": f"{type(err).__name__}: {err}"}
    from planning.estimate_cache import remember
    remember(cfg, result)  # a later `validate` checks the disk against it without sizing again
    return result


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the resolved DAG (and the estimate) without running anything."""
    cfg, _ = _load(args)
    plan = plan_of(cfg, with_estimate=not args.no_estimate)
    error, warning = _check_root(cfg, plan.get("estimate"))
    if error or warning:
        plan["run_root"] = error or warning
        print(f"warning: {error or warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(plan, indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table
    console = Console() if sys.stdout.isatty() else Console(width=120)
    table = Table(title=f"plan: {cfg.name}  ({' <- '.join(reversed(cfg.sources))})")
    for col in ("stage", "needs", "cpus", "gpus", "memory", "section", "cache"):
        table.add_column(col, no_wrap=col in ("stage", "cache"))
    for name, st in plan["stages"].items():
        res = st["resources"]
        mem = f"{res['memory_gb']:g} GiB" if res.get("memory_gb") else "-"
        table.add_row(name, ", ".join(st["needs"]) or "-", f"{res['num_cpus']:g}", f"{res['num_gpus']:g}",
                      mem, st["section"], "cached" if st["cached"] else "to run")
    console.print(table)
    if plan.get("world"):
        w = plan["world"]
        console.print(f"[bold]training world[/] {w['num_workers']} worker(s) x {w['gpus_per_worker']} GPU, "
                      f"micro-batch {w['micro_batch']} x {w['seq_len']} tokens, grad_accum {w['grad_accum']}: "
                      f"{w['tokens_per_step']:,} tokens per step")
    if plan.get("estimate") is not None:
        console.print("[bold]estimate[/]")
        console.print_json(json.dumps(plan["estimate"], default=str))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run the pipeline (or, with --resume, rerun a previous run's saved config: same cache keys)."""
    hooks: list[Any] = []
    if args.resume is not None:
        cfg = _load_resume(args, hooks)
    else:
        cfg, _ = _load(args)
    from pipeline.runner import run_pipeline
    result = run_pipeline(cfg, runner=args.runner, force=args.force or [], from_stage=args.from_stage,
                          display=not args.quiet, tracking=False if args.no_track else None, hooks=hooks)
    if args.quiet:
        print(result.run_dir)
    return 0


def _load_resume(args: argparse.Namespace, hooks: list[Any]) -> PipelineConfig:
    """The resolved `config.yaml` of a previous run (default: runs/latest), plus any overrides.

    With overrides, the unfinished stages keep their checkpoints (`pipeline.resume`) and the new
    run records what changed in `resume.json` (a hook appended to `hooks`)."""
    recipe, overrides = split_args(args.args)
    if recipe is not None:
        raise ConfigError([Problem(recipe, "--resume takes the run's saved config: give no recipe", CLI)])
    run_dir = find_run_dir(args.resume or None, "runs")
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = load_config(None, overrides, defaults=run_dir / "config.yaml")
    cfg.name = summary.get("name") or cfg.name
    if overrides:
        from pipeline.resume import ResumeRecord, carry_checkpoints, config_changes
        old = load_config(None, [], defaults=run_dir / "config.yaml")
        carried = carry_checkpoints(old, cfg, summary)
        hooks.append(ResumeRecord(run_dir, overrides, config_changes(old.resolved, cfg.resolved), carried))
    return cfg


def find_run_dir(arg: str | None, root: str) -> Path:
    """The run directory to report on: the argument, else `<root>/latest`."""
    path = Path(arg) if arg else Path(root) / "latest"
    if not (path / "summary.json").is_file():
        raise FileNotFoundError(f"no summary.json in {path} (run `python -m pipeline run` first, "
                                "or pass a run directory)")
    return path.resolve()


def cmd_status(args: argparse.Namespace) -> int:
    """Print a run's summary (its stages' status, times and metrics)."""
    run_dir = find_run_dir(args.run_dir, args.root)
    summary = json.loads((run_dir / "summary.json").read_text())
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    from rich.console import Console

    from pipeline.display import summary_table
    console = Console()
    console.print(f"run directory: {run_dir}", highlight=False)
    console.print(summary_table(summary))
    if summary.get("status") == "running":
        alive = _driver_alive(summary.get("driver") or {})
        state = {True: "in progress", False: "killed (its driver process is gone)", None: "in progress, "
                 "or killed"}[alive]
        console.print(f"[magenta]the run is {state}; `python -m pipeline run --resume {run_dir}` "
                      "resumes it from the cache[/]")
    return 0


def _driver_alive(driver: dict[str, Any]) -> bool | None:
    """Whether the run's driver process still exists (None: another host, cannot tell)."""
    import socket
    if driver.get("host") != socket.gethostname() or not driver.get("pid"):
        return None
    try:
        os.kill(int(driver["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmd_track(args: argparse.Namespace) -> int:
    """Log a run that went on without tracking (server down or dead mid-run) to MLflow now."""
    from pipeline.replay import replay
    from pipeline.tracking import TrackingUnavailable
    run_dir = find_run_dir(args.run_dir, args.root)
    try:
        run_id = replay(run_dir, args.uri)
    except TrackingUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{run_dir}: logged to MLflow as run {run_id}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Start the MLflow UI on 127.0.0.1 for the run store."""
    from pipeline.tracking import default_tracking_uri
    uri = args.uri or default_tracking_uri(args.root)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", "127.0.0.1", "--port", str(args.port), "--workers", str(args.workers)]
    print(f"MLflow UI for {uri} on http://127.0.0.1:{args.port}", flush=True)
    os.execv(sys.executable, cmd)
    return 0  # not reached


def cmd_generate(argv: list[str]) -> int:
    """Hand over to `pipeline.generate.main` (the stages engineer's decoding CLI)."""
    try:
        from pipeline import generate
    except ImportError as err:
        if getattr(err, "name", None) in ("pipeline.generate",):
            print("error: `generate` is not available: pipeline/generate.py is missing", file=sys.stderr)
            return 2
        raise
    return int(generate.main(argv) or 0)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve an export until Ctrl-C (`serving.launch`)."""
    try:
        from serving import launch
    except ImportError as err:
        print(f"error: `serve` needs Ray Serve: pip install -e '.[serve]' ({err})", file=sys.stderr)
        return 2
    return launch.main(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=(
        "TwoTower adaptation pipeline: turn a pretrained autoregressive LM into a two-tower "
        "block-diffusion LM. Config: pipeline.yaml <- RECIPE <- key=value overrides (~key deletes)."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("args", nargs="*", metavar="RECIPE|key=value",
                       help="a recipe (file, or name under recipes/; default recipes/tiny.yaml), "
                            "then overrides key=value or ~key")
        p.add_argument("--defaults", default=None, help="the defaults file (default: pipeline.yaml)")
        p.add_argument("--overlay", action="append", default=None, metavar="FILE",
                       help="a YAML file merged over the recipe, before the overrides (repeatable)")

    p = sub.add_parser("run", help="run the pipeline (default: the embedded recipes/tiny.yaml)")
    with_config(p)
    p.add_argument("--runner", choices=["ray", "local"], default=None,
                   help="ray: each stage a Ray task (default, run.runner); local: in this process")
    p.add_argument("--force", action="append", metavar="STAGE",
                   help="rerun STAGE and everything downstream (repeatable)")
    p.add_argument("--from", dest="from_stage", metavar="STAGE",
                   help="rerun from STAGE on: upstream stages must be cached")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR",
                   help="rerun a previous run's saved config (default: runs/latest): finished stages "
                        "come from the cache, the failed or killed one reruns")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument("--quiet", action="store_true", help="no live display; print the run directory")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("plan", help="show the resolved DAG, resources and size estimate; runs nothing")
    with_config(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-estimate", action="store_true", help="skip the parameter/memory estimate")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("validate", help="validate recipes (exit 2 listing every error)")
    with_config(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("status", help="show a run's summary (default: runs/latest)")
    p.add_argument("run_dir", nargs="?", help="a run directory")
    p.add_argument("--root", default="runs", help="run root holding `latest` (default: runs)")
    p.add_argument("--json", action="store_true", help="print summary.json")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("track", help="log a run to MLflow afterwards (its tracking server was down)")
    p.add_argument("run_dir", nargs="?", help="a run directory (default: runs/latest)")
    p.add_argument("--root", default="runs", help="run root holding `latest` (default: runs)")
    p.add_argument("--uri", default=None, help="tracking URI (default: the run's tracking.uri)")
    p.set_defaults(func=cmd_track)

    p = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for the run store")
    p.add_argument("--root", default="runs", help="run root holding mlflow.db (default: runs)")
    p.add_argument("--uri", default=None, help="another tracking URI")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=1, help="server processes (one is plenty locally)")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("serve", help="serve an export: OpenAI-compatible HTTP API on Ray Serve (docs/serving.md)")
    from serving.launch import add_arguments
    add_arguments(p)
    p.set_defaults(func=cmd_serve)

    sub.add_parser("completion", help='bash completion: eval "$(twotower-pipeline completion)"').set_defaults(
        func=partial(print_script, parser))
    sub.add_parser("generate", add_help=False, help="decode with an exported model: generate EXPORT_DIR "
                   "--prompt TEXT [--mode diffusion|mock_ar|ar] [--gamma G] [--show-steps]")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "generate":
        return cmd_generate(argv[1:])
    args = parse(build_parser(), argv)
    from pipeline.state import PipelineError, StageFailed
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StageFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (PipelineError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: `python -m pipeline run` with the same recipe resumes from the cache",
              file=sys.stderr)
        return 130
