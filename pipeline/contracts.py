"""The two interfaces the runner talks to: an `Executor` (where stages run) and a `RunHook` (who
watches them). Typed as Protocols, like the stage contract (`stages/api.py`): any object with these
methods is one, no base class to inherit.

The runner's state objects (`RunInfo`, `StageState` in pipeline/runner.py) are what hooks receive.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pipeline.config import Stage
    from pipeline.state import RunInfo, StageState

Outcome = dict[str, Any]
"""What a worker returns for one stage attempt: `ok`, then `manifest` or `error_type` / `message` /
`traceback` / `error_bases`, and `duration_s` (pipeline/worker.py)."""


@runtime_checkable
class Executor(Protocol):
    """Where stages execute (pipeline/executors.py: `LocalExecutor`, `RayExecutor`)."""

    def check(self, stages: list["Stage"]) -> None:
        """Before anything is submitted: raise if some stage can never be scheduled."""

    def submit(self, name: str, job: dict[str, Any], stage: "Stage") -> None:
        """Start one stage attempt (`job` is the worker's plain-data input)."""

    def wait(self, timeout: float) -> list[tuple[str, Outcome]]:
        """The `(stage name, outcome)` pairs finished since the last call, waiting up to `timeout` s."""

    def close(self) -> None:
        """Release what the executor started (a Ray it owns)."""


class RunHook(Protocol):
    """Watches a run (pipeline/tracking.py's `MlflowHook`, pipeline/display.py's `LiveDisplay`).

    A hook may leave out any of these methods: the runner calls only those it has. Hooks must not
    raise; tracking wraps its own calls so an MLflow failure never fails a run."""

    def on_run_start(self, run: "RunInfo") -> None: ...

    def on_stage_start(self, run: "RunInfo", st: "StageState") -> None: ...

    def on_stage_event(self, run: "RunInfo", st: "StageState", event: dict[str, Any]) -> None:
        """`event["kind"]` is `progress`, `metrics`, `artifact`, `warning` or `retry`."""

    def on_stage_end(self, run: "RunInfo", st: "StageState") -> None: ...

    def on_tick(self, run: "RunInfo") -> None: ...

    def on_run_end(self, run: "RunInfo", summary: dict[str, Any]) -> None: ...
