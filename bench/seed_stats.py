"""Across-seed statistics of `make bench-quality` (issue 27): pure functions over plain numbers.

A run's bootstrap interval covers the test-set sampling only; training randomness is measured by
repeating the pretraining with other seeds. Per arm: the mean and sample standard deviation over
seeds (as the paper's Table 5a reports them). Per compared pair: the per-seed paired differences
(both arms pretrained and evaluated with the same seed), their mean, a 95% t-interval over seeds,
mean +- t_{0.975, n-1} * sd / sqrt(n), and a verdict:

    finding     every seed's difference has the same sign (none is 0) AND the interval excludes 0
    undecided   otherwise (fewer than 2 seeds included: no interval; a seed whose difference is
                undefined, e.g. an undefined mAP, has not agreed, so its pair stays undecided)

    across_seeds([v_s0, v_s1, ...])   -> {values, n, mean, std}
    paired_across_seeds([d_s0, ...])  -> {diffs, n, mean, std, ci95, same_sign, verdict}
"""

from __future__ import annotations

import math

from scipy import stats

FINDING, UNDECIDED = "finding", "undecided"


def _finite(values) -> list[float]:
    # A run that produced no number (e.g. an undefined mAP) drops out: the statistics use the seeds
    # that have one, and `n` says how many that was.
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def across_seeds(values) -> dict:
    """One arm's metric over seeds -> mean and sample std (ddof 1; None for a single seed)."""
    vals = _finite(values)
    n = len(vals)
    mean = sum(vals) / n if n else None
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n >= 2 else None
    return {"values": vals, "n": n, "mean": mean, "std": std}


def t_interval(vals: list[float], level: float = 0.95) -> list[float] | None:
    """mean +- t_{(1+level)/2, n-1} * sd / sqrt(n); None below 2 values."""
    n = len(vals)
    if n < 2:
        return None
    summary = across_seeds(vals)
    half = stats.t.ppf((1 + level) / 2, n - 1) * summary["std"] / math.sqrt(n)
    return [summary["mean"] - half, summary["mean"] + half]


def paired_across_seeds(diffs) -> dict:
    """Per-seed paired differences (b - a, one per pretraining seed) -> their mean, sd, 95% t-interval
    over seeds and the verdict (finding only when every seed agrees in sign and the interval excludes 0).
    The mean, std and interval use the seeds with a number; `undefined` counts the others, and any of
    them keeps the verdict undecided."""
    diffs = list(diffs)
    vals = _finite(diffs)
    summary = across_seeds(vals)
    ci = t_interval(vals)
    same_sign = bool(vals) and (all(v > 0 for v in vals) or all(v < 0 for v in vals))
    excludes_zero = ci is not None and (ci[0] > 0 or ci[1] < 0)
    undefined = len(diffs) - len(vals)
    return {
        "diffs": vals,
        "undefined": undefined,
        "n": summary["n"],
        "mean": summary["mean"],
        "std": summary["std"],
        "ci95": ci,
        "same_sign": same_sign,
        "verdict": FINDING if same_sign and excludes_zero and not undefined else UNDECIDED,
    }
