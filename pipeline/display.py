"""The live display: a table of stages (state, elapsed, progress bar) and a final summary table.

On a terminal it is a `rich.live.Live` table refreshed by the runner's hooks; elsewhere (CI, logs,
tests) it prints one line per state change instead, so logs stay readable. `summary_table` renders
a `summary.json` for the final table and for `python -m pipeline status`.
"""
from __future__ import annotations

import time
from typing import Any

from pipeline.state import RunInfo, StageState

STYLE = {"pending": "dim", "waiting": "blue", "running": "yellow", "cached": "cyan", "done": "green",
         "failed": "bold red", "skipped": "dim", "interrupted": "magenta"}


def _fmt_metrics(metrics: dict[str, Any], limit: int = 4) -> str:
    from pipeline.tracking import numeric
    items = list(numeric(metrics).items())[:limit]
    text = ", ".join(f"{k}={v:.4g}" for k, v in items)
    return text + (", …" if len(numeric(metrics)) > limit else "")


def summary_table(summary: dict[str, Any]) -> Any:
    """A rich Table of a `summary.json` document."""
    from rich.table import Table
    table = Table(title=f"{summary.get('run', '')}  [{summary.get('status', '?')}]")
    for col in ("stage", "status", "time", "attempts", "metrics"):
        table.add_column(col)
    for name, st in summary.get("stages", {}).items():
        status = st.get("status", "?")
        detail = st.get("error") or _fmt_metrics(st.get("metrics") or {})
        table.add_row(name, f"[{STYLE.get(status, '')}]{status}[/]", f"{st.get('duration_s', 0):.1f}s",
                      str(st.get("attempts", 0)), detail)
    return table


class LiveDisplay:
    """Runner hooks drawing the stage table (live on a terminal, one line per change otherwise)."""

    def __init__(self, console: Any = None):
        from rich.console import Console
        self.console = console or Console()
        self.live: Any = None
        self.run: "RunInfo | None" = None
        self.notices: set[str] = set()
        """Notices already printed this run: each shows once, however many stages send it."""

    def _table(self) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        table = Table(title=str(self.run.run_dir.name), expand=False)
        for col in ("stage", "status", "elapsed", "progress"):
            table.add_column(col)
        now = time.time()
        for name, st in self.run.states.items():
            elapsed = now - st.started if st.status == "running" and st.started else st.duration_s
            progress: Any = ""
            if st.status == "running" and st.progress and st.progress.get("total"):
                bar = ProgressBar(total=float(st.progress["total"]), completed=float(st.progress["done"]),
                                  width=24)
                progress = Table.grid(padding=(0, 1))
                progress.add_row(bar, f"{st.progress['done']:g}/{st.progress['total']:g} "
                                 f"{st.progress.get('message', '')}")
            elif st.status == "failed":
                progress = st.error or ""
            elif st.status == "waiting":
                progress = f"waiting for {name} ({st.waiting_for})"
            elif st.status in ("done", "cached"):
                progress = _fmt_metrics(st.metrics)
            table.add_row(name, f"[{STYLE.get(st.status, '')}]{st.status}[/]", f"{elapsed:.1f}s", progress)
        return table

    def _line(self, st: "StageState", note: str = "") -> None:
        if self.live is None:
            elapsed = time.time() - self.run.started
            self.console.print(f"[{elapsed:7.1f}s] {st.name}: [{STYLE.get(st.status, '')}]{st.status}[/]"
                               + (f"  {note}" if note else ""), highlight=False)

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._table(), refresh=True)

    def on_run_start(self, run: "RunInfo") -> None:
        from rich.live import Live
        self.run, self.notices = run, set()
        self.console.print(f"run directory: {run.run_dir}", highlight=False)
        if run.cache_only:
            started = "Ray not started" if run.runner == "ray" else "nothing to run"
            self.console.print(f"all {len(run.states)} stages cached; {started}", highlight=False)
        if self.console.is_terminal:
            self.live = Live(self._table(), console=self.console, refresh_per_second=4, transient=True)
            self.live.start()

    def on_stage_start(self, run: "RunInfo", st: "StageState") -> None:
        if st.status == "running":
            self._line(st)
        self._refresh()

    def on_stage_event(self, run: "RunInfo", st: "StageState", event: dict[str, Any]) -> None:
        from rich.markup import escape  # a message's own brackets (`.[cuda]`) are text, not markup
        if event.get("kind") == "retry":
            self._line(st, f"retrying after {event.get('error')}")
        elif event.get("kind") in ("waiting", "lock"):  # another run computes (or computed) this key
            self._line(st, event.get("message", ""))
        elif event.get("kind") == "warning":  # printed above the live table too: it must be seen
            self.console.print(f"[bold yellow]WARNING[/] {st.name}: {escape(str(event.get('message', '')))}",
                               highlight=False)
        elif event.get("kind") == "notice" and event.get("message") not in self.notices:  # once per run
            self.notices.add(event.get("message"))
            self.console.print(f"[yellow]note[/] {escape(str(event.get('message', '')))}", highlight=False)
        self._refresh()

    def on_stage_end(self, run: "RunInfo", st: "StageState") -> None:
        note = st.error if st.status == "failed" else _fmt_metrics(st.metrics)
        self._line(st, note)
        self._refresh()

    def on_tick(self, run: "RunInfo") -> None:
        self._refresh()

    def on_run_end(self, run: "RunInfo", summary: dict[str, Any]) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
        self.console.print(summary_table(summary))
