"""The live display as a runner hook: state lines off a terminal, a live table with progress on one,
and the final summary table (also what `status` prints).
"""
from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from pipeline import load_config, run_pipeline
from pipeline.display import LiveDisplay, summary_table


def test_lines_off_a_terminal_and_final_table(engine_defaults: Path) -> None:
    out = io.StringIO()
    cfg = load_config(None, defaults=engine_defaults)
    result = run_pipeline(cfg, runner="local", hooks=[LiveDisplay(Console(file=out, width=120))])
    text = out.getvalue()
    assert "combine: running" in text and "combine: done  sum=30" in text
    assert text.rstrip().splitlines()[-2].startswith("│ combine")  # the final summary table
    out2 = io.StringIO()
    Console(file=out2, width=120).print(summary_table(result.summary))
    assert "done" in out2.getvalue() and "sum=30" in out2.getvalue()


def test_live_table_on_a_terminal(engine_defaults: Path) -> None:
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True, color_system=None)
    cfg = load_config(None, ["combine.sleep_s=0.6", "combine.steps=2"], defaults=engine_defaults)
    run_pipeline(cfg, runner="local", hooks=[LiveDisplay(console)])
    text = out.getvalue()
    assert "elapsed" in text and "progress" in text  # the live table's header
    assert "2/2 combining" in text  # the progress bar's label, drawn from the stage's events
