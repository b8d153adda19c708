"""Config loading and validation: merge order, env interpolation, deletions, and errors that name the
key and the file, all at once, with exit status 2 and no traceback from the CLI.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from conftest import REPO, cli

from pipeline.config import ConfigError, load_config


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_merge_order_recipe_then_overrides_win(engine_defaults: Path, tmp_path: Path) -> None:
    recipe = _write(tmp_path / "r.yaml", "source: {n: 7, start: 2}\nscale: {factor: 3}\n")
    cfg = load_config(recipe, ["source.n=9", "scale.tags=[a,b]"], defaults=engine_defaults)
    assert cfg.stages["source"].config == {"n": 9, "start": 2.0, "mode": "linear"}
    assert cfg.stages["scale"].config["factor"] == 3.0 and cfg.stages["scale"].config["tags"] == ["a", "b"]
    assert cfg.name == "r" and list(cfg.stages) == ["source", "scale", "combine"]
    assert cfg.resolved["combine"]["steps"] == 3  # defaults filled into the saved config


def test_env_interpolation_and_deletion(engine_defaults: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = _write(tmp_path / "r.yaml", "source: {n: '${oc.env:ENGINE_TEST_N,3}'}\n"
                    "ray: {address: '${oc.env:ENGINE_TEST_ADDR,null}'}\n")
    monkeypatch.delenv("ENGINE_TEST_N", raising=False)
    cfg = load_config(recipe, defaults=engine_defaults)
    assert cfg.stages["source"].config["n"] == 3 and cfg.ray.address is None
    monkeypatch.setenv("ENGINE_TEST_N", "11")
    assert load_config(recipe, defaults=engine_defaults).stages["source"].config["n"] == 11
    cfg = load_config(recipe, ["~source.n", "~graph.combine"], defaults=engine_defaults)
    assert cfg.stages["source"].config["n"] == 4 and "combine" not in cfg.stages  # back to the default


def test_section_shared_by_two_stages_accepts_the_union(engine_defaults: Path, tmp_path: Path) -> None:
    recipe = _write(tmp_path / "r.yaml", "graph: {shift: {needs: [scale], module: 'engine_stages:shift'}}\n"
                    "scale: {factor: 3, offset: 1.5}\n")
    cfg = load_config(recipe, defaults=engine_defaults)
    assert cfg.stages["scale"].config == {"factor": 3.0, "tags": None}  # each stage: its own fields
    assert cfg.stages["shift"].config == {"factor": 3.0, "offset": 1.5}
    with pytest.raises(ConfigError, match=r"scale.ofset: unknown key; did you mean 'offset'"):
        load_config(recipe, ["scale.ofset=2"], defaults=engine_defaults)


def test_recipe_null_removes_a_stage(engine_defaults: Path, tmp_path: Path) -> None:
    recipe = _write(tmp_path / "r.yaml", "graph: {combine: null}\n")
    assert list(load_config(recipe, defaults=engine_defaults).stages) == ["source", "scale"]


def test_all_errors_at_once_with_key_file_and_suggestion(engine_defaults: Path, tmp_path: Path) -> None:
    recipe = _write(tmp_path / "bad.yaml", "source: {nn: 3, mode: cube}\nscale: {factor: fast}\n"
                    "sorce: {}\nrun: {seed: 1.5}\n")
    with pytest.raises(ConfigError) as info:
        load_config(recipe, ["combine.steps=many", "bogus"], defaults=engine_defaults)
    problems = {p.key: p for p in info.value.problems}
    assert "bogus" in problems and problems["bogus"].source == "command line"
    assert not (set(problems) - {"bogus"})  # bad override syntax is reported before merging
    with pytest.raises(ConfigError) as info:
        load_config(recipe, ["combine.steps=many"], defaults=engine_defaults)
    problems = {p.key: p for p in info.value.problems}
    assert set(problems) == {"source.nn", "source.mode", "scale.factor", "sorce", "run.seed",
                             "combine.steps"}
    assert "did you mean 'n'" in problems["source.nn"].message
    assert "did you mean 'source'" in problems["sorce"].message
    assert "linear" in problems["source.mode"].message
    assert "expected float" in problems["scale.factor"].message
    assert problems["scale.factor"].source == str(recipe)
    assert problems["combine.steps"].source == "command line"


def test_missing_value_and_unknown_stage(engine_defaults: Path, tmp_path: Path) -> None:
    recipe = _write(tmp_path / "r.yaml", "source:\n  start: ???\n"
                    "graph: {extra: {needs: [source]}, scale: {needs: [sourc]}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(recipe, defaults=engine_defaults)
    problems = {p.key: p.message for p in info.value.problems}
    assert "missing value" in problems["source.start"]
    assert "unknown stage 'extra'" in problems["graph.extra"]
    assert "did you mean 'source'" in problems["graph.scale.needs[0]"]


def test_override_of_missing_key_and_unresolvable_env(engine_defaults: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENGINE_TEST_UNSET", raising=False)
    recipe = _write(tmp_path / "r.yaml", "scale: {factor: '${oc.env:ENGINE_TEST_UNSET}'}\n")
    with pytest.raises(ConfigError) as info:
        load_config(recipe, ["~source.nope"], defaults=engine_defaults)
    problems = {p.key: p.message for p in info.value.problems}
    assert "no such key" in problems["~source.nope"]
    assert "ENGINE_TEST_UNSET" in problems["scale.factor"]  # the interpolation is quoted


@pytest.mark.parametrize("args, key", [
    (["source.nn=3"], "source.nn"),            # unknown key
    (["source.n=three"], "source.n"),          # wrong type
    (["source.start=???"], "source.start"),    # missing value
    (["source.n"], "source.n"),                # bad override syntax
])
def test_cli_config_errors_exit_2_without_traceback(engine_defaults: Path, args: list[str], key: str) -> None:
    started = time.time()
    proc = cli("validate", *args, "--defaults", str(engine_defaults))
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stderr and "Traceback" not in proc.stderr
    assert time.time() - started < 20  # no heavy import: ~0.5 s idle (loose for a loaded CI machine)


def test_cli_bad_recipe_file_is_named(engine_defaults: Path, tmp_path: Path) -> None:
    broken = _write(tmp_path / "broken.yaml", "source: {n: [1,\n")
    proc = cli("validate", str(broken), "--defaults", str(engine_defaults))
    assert proc.returncode == 2 and "broken.yaml" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("run", str(tmp_path / "absent.yaml"), "--defaults", str(engine_defaults))
    assert proc.returncode == 2 and "absent.yaml" in proc.stderr and "no such file" in proc.stderr


RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES or [None], ids=[r.name for r in RECIPES] or ["none"])
def test_every_recipe_validates(recipe: Path | None) -> None:
    if recipe is None:
        pytest.skip("no recipe in recipes/ yet")
    first = recipe.read_text().lstrip().splitlines()[0]
    assert first.startswith("#"), f"{recipe.name} must start with a comment giving its launch command"
    for expr in re.findall(r"\$\{([^}]*)\}", recipe.read_text()):  # data only: no resolvers but env
        assert expr.startswith("oc.env:") or re.fullmatch(r"[A-Za-z_][\w.]*", expr), expr
    cfg = load_config(recipe)
    assert cfg.stages and cfg.dag.order


def test_default_pipeline_yaml_validates_and_plans() -> None:
    from pipeline.cli import plan_of
    cfg = load_config(None)
    assert "prepare_data" in cfg.stages and cfg.dag.order[0] == "prepare_data"
    plan = plan_of(cfg)  # with planning/estimate.py: its dict (or its error) under "estimate"
    assert plan["order"] == list(cfg.stages) and "estimate" in plan
    assert plan["stages"]["train_denoiser"]["needs"] == ["prepare_data", "attach_conditioning"]


@pytest.mark.parametrize("override, key, words", [
    ("calibrate.target_relative_quality=1.5", "calibrate.target_relative_quality", "(0, 1]"),
    ("calibrate.gammas=[]", "calibrate", "empty list"),
    ("twotower.block_size=12", "twotower", "data.seq_len=128"),
    ("data.seq_len=100", "data", "not a multiple"),
    ("backbone.denoiser_device=gpu1", "backbone", "expected auto, cpu, mps, cuda or cuda:N"),
])
def test_value_checks_of_real_stages_fail_before_anything_runs(override: str, key: str, words: str) -> None:
    """Stage `validate`/`check` hooks run at config time: a bad value cannot surface after pretraining."""
    with pytest.raises(ConfigError) as err:
        load_config(Path("recipes/tiny.yaml"), [override])
    assert any(p.key == key and words in p.message for p in err.value.problems), str(err.value)


def test_a_recipe_without_a_required_stage_fails_validate_naming_stage_input_and_file(tmp_path: Path) -> None:
    """A rewired graph that drops `attach_conditioning` passes the DAG checks but not REQUIRES:
    exit 2 before anything runs, naming the stage, the missing input and the recipe file."""
    recipe = tmp_path / "no_attach.yaml"
    text = (REPO / "recipes" / "tiny.yaml").read_text().replace(
        "  train_denoiser:      {needs: [prepare_data, attach_conditioning]",
        "  attach_conditioning: null\n  train_denoiser:      {needs: [prepare_data, freeze_context]")
    assert "attach_conditioning: null" in text
    recipe.write_text(text)
    proc = cli("validate", str(recipe))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    line = next(ln for ln in out.splitlines() if "graph.train_denoiser.needs" in ln)
    assert str(recipe) in line and "'train_denoiser'" in line and "'attach_conditioning'" in line, out


@pytest.mark.parametrize("override, allowed", [
    ("train.max_steps=-1", "[1, inf)"), ("train.batch_size=-4", "[1, inf)"), ("train.val_every=-1", "[0, inf)"),
    ("train.val_batches=-2", "[0, inf)"), ("calibrate.num_threads=-1", "[0, inf)"),
    ("evaluate.num_threads=-1", "[0, inf)"), ("calibrate.gammas=[0.5,1.5]", "(0, 1]"),
    ("data.eval_fraction=1.0", "(0, 1)"), ("graph.evaluate.resources.num_cpus=-1", "[0, inf)"),
    ("plan.context_len=0", "[1, inf)"), ("backbone.device_memory_gb=0", "(0, inf)"),
])
def test_numeric_ranges_are_checked_at_validate_time(override: str, allowed: str) -> None:
    proc = cli("validate", "recipes/tiny.yaml", override)
    assert proc.returncode == 2, proc.stdout
    key = override.split("=")[0]
    key = "calibrate.gammas[1]" if key == "calibrate.gammas" else key
    assert re.search(rf"{re.escape(key)}: must be in {re.escape(allowed)}, got", proc.stdout + proc.stderr), \
        proc.stdout + proc.stderr
    assert "1 config error(s)" in proc.stdout + proc.stderr  # and nothing else (a bad stage spec is still a stage)


@pytest.mark.parametrize("override", ["train.layout=blok", "train.noise_on=none", "train.strategy=fsd",
                                      "backbone.dtype=fp32", "data.source=synth", "pretrain.precision=bf16"])
def test_every_choice_is_a_literal_checked_at_validate_time(override: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(Path("recipes/tiny.yaml"), [override])
    key = override.split("=")[0]
    assert any(p.key == key and "must be one of" in p.message for p in err.value.problems), str(err.value)
