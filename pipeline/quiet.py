"""One line per run, not three per stage, when the Mamba-2 kernels are absent.

transformers' Mamba-2 models (Nemotron-H, Granite-4.0-H, Falcon-H1) call `mamba_ssm` and
`causal_conv1d` kernels through `transformers.integrations.hub_kernels`, which logs, once per
function and per process, "`<function>` is falling back to its reference PyTorch implementation
because ... This is correct but much slower." On a CPU run every stage process that runs such a
model printed two to four of these. `quiet_kernel_fallbacks` (called by `pipeline.worker.execute`
before each stage runs) drops them and reports one `notice` event with `NOTICE` instead; the live
display prints a notice once per run, however many stages send it. Nothing here imports
transformers: the filter sits on the logger by name.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

KERNEL_LOGGER = "transformers.integrations.hub_kernels"
"""The logger transformers' kernel fallback messages come from."""
FALLBACK_TEXT = "is falling back to its reference PyTorch implementation"
"""What every such message says (the function and package names vary)."""
NOTICE = ("mamba-ssm / causal-conv1d kernels are not installed (or do not run on this device), so Mamba-2 "
          "layers use transformers' PyTorch path: correct, much slower. On a GPU machine: pip install -e '.[cuda]'.")
"""The one sentence a run shows instead."""


class KernelFallbackFilter(logging.Filter):
    """Drops transformers' kernel-fallback records; the first one dropped since `watch` reports `NOTICE`."""

    def __init__(self) -> None:
        super().__init__()
        self.report: Callable[[dict[str, Any]], None] | None = None
        self.noticed = False
        self.dropped = 0

    def watch(self, report: Callable[[dict[str, Any]], None] | None) -> None:
        """Send the notice of the next dropped record through `report` (a stage's event writer)."""
        self.report, self.noticed = report, False

    def filter(self, record: logging.LogRecord) -> bool:
        if FALLBACK_TEXT not in record.getMessage():
            return True
        self.dropped += 1
        if not self.noticed and self.report is not None:
            self.noticed = True
            self.report({"kind": "notice", "message": NOTICE})
        return False


def quiet_kernel_fallbacks(report: Callable[[dict[str, Any]], None] | None = None) -> KernelFallbackFilter:
    """Install the filter on transformers' kernel logger (once per process) and point its notice at
    `report`; returns it."""
    logger = logging.getLogger(KERNEL_LOGGER)
    found = next((f for f in logger.filters if isinstance(f, KernelFallbackFilter)), None)
    if found is None:
        found = KernelFallbackFilter()
        logger.addFilter(found)
    found.watch(report)
    return found
