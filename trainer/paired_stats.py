"""Base against tuned on the same items: the difference and how sure we are of it.

Both models answer the same documents, so the comparison is paired: the uncertainty of the
difference comes from the per-document differences, which is far tighter than two independent
standard errors (most items are right, or wrong, for both). The interval is a percentile bootstrap
over documents; a change is called only when the interval excludes 0.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np

CHUNK = 256  # bootstrap resamples drawn at once: bounds memory for tasks with many documents


def mean_and_stderr(values: Sequence[float]) -> tuple:
    x = np.asarray(values, dtype=np.float64)
    stderr = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(x.mean()), stderr


def paired_bootstrap(base: Sequence[float], tuned: Sequence[float], iters: int = 2000,
                     confidence: float = 0.95, seed: int = 0) -> Dict[str, float]:
    """Mean of tuned - base over documents, its standard error and a percentile bootstrap interval.

    `base[i]` and `tuned[i]` are the two models' scores on document i. Resampling documents (not
    scores) keeps each pair together; the same seed gives the same interval."""
    b = np.asarray(base, dtype=np.float64)
    t = np.asarray(tuned, dtype=np.float64)
    if b.shape != t.shape or b.ndim != 1 or len(b) == 0:
        raise ValueError(f"paired scores need two equal, non-empty lists (got {b.shape} and {t.shape})")
    diff = t - b
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, iters, CHUNK):
        draws = rng.integers(0, len(diff), size=(min(CHUNK, iters - start), len(diff)))
        means.append(diff[draws].mean(axis=1))
    means = np.concatenate(means)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    mean, stderr = mean_and_stderr(diff)
    return {"diff": mean, "diff_stderr": stderr, "ci_low": float(low), "ci_high": float(high),
            "confidence": confidence, "iters": iters, "n": int(len(diff))}


def verdict(ci_low: float, ci_high: float, higher_is_better: bool) -> str:
    """'better' or 'worse' only when the whole interval says so, else 'no clear change'."""
    if ci_low > 0 or ci_high < 0:
        improved = (ci_low > 0) == higher_is_better
        return "better" if improved else "worse"
    return "no clear change"
