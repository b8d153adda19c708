"""On a CPU run, transformers' "`<kernel>` is falling back to its reference PyTorch implementation
... much slower" lines (two to four per Mamba-2 stage process) become one notice per run
(`pipeline/quiet.py`)."""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from rich.console import Console

from pipeline import load_config, run_pipeline
from pipeline.display import LiveDisplay
from pipeline.quiet import FALLBACK_TEXT, KERNEL_LOGGER, NOTICE

GRAPH = """\
run: {{root: {root}, runner: local}}
ray: {{address: null, num_cpus: 2}}
tracking: {{enabled: false}}
graph:
  first:  {{needs: [], module: "engine_stages:mamba", resources: {{num_cpus: 0.5}}}}
  second: {{needs: [first], module: "engine_stages:mamba", resources: {{num_cpus: 0.5}}}}
"""


def test_two_mamba_stages_show_one_notice_and_no_fallback_line(tmp_path: Path, capfd) -> None:
    defaults = tmp_path / "defaults.yaml"
    defaults.write_text(GRAPH.format(root=tmp_path / "runs"))
    out = io.StringIO()
    result = run_pipeline(load_config(None, defaults=defaults), runner="local",
                          hooks=[LiveDisplay(Console(file=out, width=400))])
    assert result.summary["status"] == "done", result.summary
    captured = capfd.readouterr()
    text = out.getvalue() + captured.out + captured.err
    assert FALLBACK_TEXT not in text
    assert text.count(NOTICE) == 1, text
    # each stage did run into the fallback and said so (the display showed it once)
    events = sorted((tmp_path / "runs").rglob("events/*.jsonl"))
    noticed = {p.stem for p in events if any(json.loads(line).get("kind") == "notice"
                                             for line in p.read_text().splitlines())}
    assert noticed == {"first", "second"}


def test_other_transformers_kernel_messages_pass() -> None:
    from pipeline.quiet import quiet_kernel_fallbacks

    seen = []
    f = quiet_kernel_fallbacks(seen.append)
    logger = logging.getLogger(KERNEL_LOGGER)
    assert logger.filters.count(f) == 1 and quiet_kernel_fallbacks(seen.append) is f  # installed once
    record = logging.LogRecord(KERNEL_LOGGER, logging.WARNING, __file__, 1, "kernels loaded from the hub", None, None)
    assert f.filter(record)
    fallback = logging.LogRecord(KERNEL_LOGGER, logging.WARNING, __file__, 1,
                                 f"`x` {FALLBACK_TEXT} because `mamba_ssm` is absent", None, None)
    assert not f.filter(fallback) and not f.filter(fallback)
    assert seen == [{"kind": "notice", "message": NOTICE}]
