"""The figures stages save (PNG, headless): one way to open and to finish a plot.

`calibrate_gamma` draws its Pareto plot and `evaluate` its per-task bars with these, so both files
look alike (font sizes, dpi, layout) and matplotlib's headless backend is chosen in one place.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

DPI = 120
"""Resolution of saved figures: readable in a model card without making the PNGs heavy."""


def axes(width: float, height: float) -> tuple[Any, Any]:
    """A new (figure, axes) of `width` x `height` inches on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def save(fig: Any, ax: Any, path: Path, *, title: str, ylabel: str, legend_loc: str) -> None:
    """Title, y label and legend, then write `path` and free the figure."""
    import matplotlib.pyplot as plt

    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc=legend_loc)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
