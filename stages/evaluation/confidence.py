"""Paired bootstrap confidence interval of quality relative to AR (issue 13, item 5).

A relative-quality figure measured on a few prompts per family moves by several points from one
slice of prompts to the next, so every such figure is reported with an interval. Prompts are the
resampling unit, and a prompt's AR score and diffusion score are drawn together (paired), so the
interval reflects how much the *ratio* depends on which prompts were drawn. The seed is fixed: the
same scores always give the same interval.
"""
from __future__ import annotations

from collections.abc import Sequence

RESAMPLES = 1000
"""Bootstrap resamples per interval."""
LEVEL = 0.95
"""Two-sided confidence level of the percentile interval."""
SEED = 0
"""Seed of the resampling, so intervals are deterministic."""


def paired_bootstrap(ar: Sequence[float], diffusion: Sequence[float], *, resamples: int = RESAMPLES,
                     level: float = LEVEL, seed: int = SEED) -> tuple[float, float]:
    """Percentile interval `(low, high)` of mean(diffusion) / mean(AR) over prompts resampled in pairs.

    `ar[i]` and `diffusion[i]` are the scores of the same prompt. The ratio follows
    `decoding_eval.relative`: 1 when both means are 0, inf when only AR's is. No prompts: (0, 0).
    """
    import numpy as np

    if len(ar) != len(diffusion):
        raise ValueError(f"paired_bootstrap: {len(ar)} AR scores but {len(diffusion)} diffusion scores")
    if not 0.0 < level < 1.0 or resamples < 1:
        raise ValueError(f"paired_bootstrap: level={level} must be in (0, 1) and resamples={resamples} >= 1")
    n = len(ar)
    if n == 0:
        return 0.0, 0.0
    a = np.asarray(ar, dtype=np.float64)
    d = np.asarray(diffusion, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    ma, md = a[idx].mean(axis=1), d[idx].mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(ma > 0, md / np.where(ma > 0, ma, 1.0), np.where(md > 0, np.inf, 1.0))
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(rel, [tail, 1.0 - tail])
    return float(low), float(high)
