"""Shared test fixtures: the engine's test graph, one local Ray per test module, a CLI runner.

`tests/` is on sys.path (pytest's rootdir insertion), so `engine_stages` imports as a top-level module;
`cli()` passes the same path to subprocesses. GPU-marked tests are skipped without CUDA.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True, scope="session")
def _private_user_cache(tmp_path_factory: pytest.TempPathFactory):
    """`plan`/`validate` cache backbone sizes under `$XDG_CACHE_HOME` (planning/estimate_cache.py):
    tests, and the CLI subprocesses they start, use a cache directory of their own, never the
    user's."""
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if saved is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = saved


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch  # only when a GPU test was collected: torch is slow to import
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture
def engine_defaults(tmp_path: Path) -> Path:
    """A defaults file wiring the test stages `source -> scale -> combine`, runs under tmp_path/runs."""
    from engine_stages import GRAPH_YAML
    path = tmp_path / "defaults.yaml"
    path.write_text(GRAPH_YAML.format(root=tmp_path / "runs"))
    return path


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for a module's Ray tests (~3-5 s and ~850 MB to start), shut down after the module
    so that other modules may start their own (`ray.init` twice in a process raises)."""
    import logging

    import ray
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), saved or ""])
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
             logging_level=logging.WARNING, configure_logging=False)
    yield ray
    ray.shutdown()
    if saved is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = saved


def cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess:
    """`python -m pipeline *args` in a subprocess that can import the test stages."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), full_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
