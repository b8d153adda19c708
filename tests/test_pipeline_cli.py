"""The CLI as a user runs it (subprocesses): light imports, run/status/plan, a failing stage's message,
`generate` wiring, and the MLflow UI serving the run store.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, cli


def test_cli_imports_stay_light() -> None:
    code = ("import sys, pipeline.cli, pipeline.config, pipeline.runner; "
            "print([m for m in ('ray', 'mlflow', 'torch', 'transformers', 'pytorch_lightning') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    started = time.time()
    proc = cli("--help")
    assert proc.returncode == 0 and "plan" in proc.stdout and "generate" in proc.stdout
    assert time.time() - started < 10  # ~0.2 s on an idle machine


def test_run_status_plan(engine_defaults: Path, tmp_path: Path) -> None:
    defaults = ["--defaults", str(engine_defaults)]
    proc = cli("run", "source.n=3", "--runner", "local", "--quiet", *defaults)
    assert proc.returncode == 0, proc.stderr
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    assert (run_dir / "summary.json").is_file() and run_dir.parent == tmp_path / "runs"
    proc = cli("status", "--root", str(tmp_path / "runs"), "--json")
    summary = json.loads(proc.stdout)
    assert summary["status"] == "done" and summary["stages"]["combine"]["metrics"]["sum"] == 18.0
    proc = cli("status", str(run_dir))
    assert proc.returncode == 0 and "combine" in proc.stdout and "done" in proc.stdout
    proc = cli("plan", "source.n=3", "--json", "--no-estimate", *defaults)
    plan = json.loads(proc.stdout)
    assert plan["order"] == ["source", "scale", "combine"]
    assert plan["stages"]["combine"]["needs"] == ["source", "scale"] and plan["stages"]["combine"]["cached"]
    assert plan["stages"]["scale"]["resources"] == {"num_cpus": 0.5, "num_gpus": 0.0, "memory_gb": None}
    proc = cli("plan", "source.n=5", "--no-estimate", *defaults)  # the table: changed stages will run
    assert proc.returncode == 0 and "combine" in proc.stdout and "to run" in proc.stdout


def test_failing_stage_exit_1_with_its_message(engine_defaults: Path) -> None:
    proc = cli("run", "combine.fail=true", "--runner", "local", "--defaults", str(engine_defaults))
    assert proc.returncode == 1
    assert "stage 'combine' failed: ValueError: combine exploded: the answer is 42" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = cli("run", "--runner", "local", "--force", "nope", "--defaults", str(engine_defaults))
    assert proc.returncode == 2 and "unknown stage 'nope'" in proc.stderr


def test_overrides_go_anywhere_on_the_line_and_version_answers(engine_defaults: Path, tmp_path: Path) -> None:
    """As users type them: overrides after options (`--force STAGE key=value`, `--overlay FILE
    key=value`) are overrides, not "unrecognized arguments"."""
    defaults = ["--defaults", str(engine_defaults)]
    proc = cli("run", "--runner", "local", "--quiet", *defaults, "--force", "scale", "source.n=3")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((Path(proc.stdout.strip().splitlines()[-1]) / "summary.json").read_text())
    assert summary["stages"]["combine"]["metrics"]["sum"] == 18.0  # source.n=3 took effect (4 gives 30)
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("source:\n  n: 7\n")
    proc = cli("plan", "--json", "--no-estimate", *defaults, "--overlay", str(overlay), "scale.factor=3")
    plan = json.loads(proc.stdout)
    assert plan["config"]["source"]["n"] == 7 and plan["config"]["scale"]["factor"] == 3
    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip().startswith("python -m pipeline 0.")


def test_bash_completion_offers_commands_recipes_sections_and_stages(tmp_path: Path) -> None:
    proc = cli("completion")
    assert proc.returncode == 0, proc.stderr
    script = tmp_path / "complete.sh"
    script.write_text(proc.stdout)
    probe = ('source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); '
             '_twotower_pipeline; echo "${COMPREPLY[*]}"')

    def complete(*words: str) -> set[str]:
        out = subprocess.run(["bash", "-c", probe, "probe", str(script), "twotower-pipeline", *words],
                             capture_output=True, text=True, check=True)
        return set(out.stdout.split())

    assert complete("se") == {"serve"}
    assert {"tiny", "train.", "tracking."} <= complete("run", "t")  # recipes and override sections
    assert complete("run", "tiny", "--force", "tr") == {"train_denoiser"}  # stage names
    assert "--max-batch-size" in complete("serve", "--m")
    assert complete("--ver") == {"--version"}


def test_serve_is_wired_and_refuses_a_non_export_at_once(tmp_path: Path) -> None:
    proc = cli("serve", "--help")
    assert proc.returncode == 0 and "--max-batch-size" in proc.stdout
    proc = cli("serve", str(tmp_path))
    assert proc.returncode == 2 and "not an export directory (no config.json)" in proc.stderr
    from serving_fixtures import tiny_export
    export = tiny_export(tmp_path / "model")
    with socket.socket() as busy:  # something already listens on the port: said at once, before Ray starts
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = cli("serve", str(export), "--port", str(busy.getsockname()[1]))
    assert proc.returncode == 2 and "cannot listen there" in proc.stderr and "Traceback" not in proc.stderr


def test_generate_is_wired() -> None:
    proc = cli("generate", "--help")
    if "pipeline/generate.py is missing" in proc.stderr:
        pytest.skip("pipeline/generate.py not written yet")
    assert proc.returncode == 0 and "--prompt" in proc.stdout


@pytest.mark.slow
@pytest.mark.ray
def test_ray_run_ships_the_repository(engine_defaults: Path, tmp_path: Path) -> None:
    """`ray.ship_code=true`: the workers run from Ray's uploaded copy of the repo, not from REPO."""
    proc = cli("run", "ray.ship_code=true", "--runner", "ray", "--quiet", "--defaults", str(engine_defaults),
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    manifest = json.loads((run_dir / "stages" / "combine.json").read_text())
    assert Path(manifest["cwd"]).resolve() != REPO
    assert (Path(manifest["cwd"]) / "pipeline" / "runner.py").is_file()  # the uploaded copy
    assert not (Path(manifest["cwd"]) / ".venv").exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ui_serves_the_run_store(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "ui", "--root", str(tmp_path), "--port",
                             str(port)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline, body = time.time() + 240, ""  # ~15 s idle; minutes on a loaded machine
        while time.time() < deadline and proc.poll() is None:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert body.strip() == "OK", proc.stdout.read() if proc.poll() is not None else "no answer"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
