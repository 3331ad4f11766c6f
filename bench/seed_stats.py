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
    rank_relation({seed: [(x, y), ...]}) -> {rho, n, per_seed, p_value, same_sign, verdict}: does y
                                         follow x across runs (e.g. a Table 5a column and collapse)?
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

FINDING, UNDECIDED = "finding", "undecided"


def _defined(v) -> bool:
    return v is not None and math.isfinite(float(v))


def _finite(values) -> list[float]:
    # A run that produced no number (e.g. an undefined mAP) drops out: the statistics use the seeds
    # that have one, and `n` says how many that was.
    return [float(v) for v in values if _defined(v)]


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


def _spearman(x, y) -> float | None:
    """Spearman's rank correlation (ties share their mean rank); None when either side is constant."""
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def rank_relation(points: dict, permutations: int = 10_000, seed: int = 0) -> dict:
    """Does y follow x across runs? points: {seed: [(x, y), ...]}, one pair per run (e.g. one arm's
    pseudo-mask collapse and its Table 5a value). Spearman's rho over every run (pooled) and within each
    seed, and a one-sided permutation p-value of the pooled rho in its own direction, permuting y within
    each seed (what one seed's pretraining shares does not count as a relation). Verdict: finding when
    every seed's rho has the pooled rho's sign and p < 0.05; otherwise undecided."""
    runs = {s: [(float(x), float(y)) for x, y in pts if _defined(x) and _defined(y)] for s, pts in points.items()}
    runs = {s: pts for s, pts in runs.items() if pts}
    xs = np.array([x for pts in runs.values() for x, _ in pts])
    ys = [np.array([y for _, y in pts]) for pts in runs.values()]
    rho = _spearman(xs, np.concatenate(ys)) if ys else None
    per_seed = {str(s): _spearman([x for x, _ in pts], [y for _, y in pts]) for s, pts in runs.items()}
    p_value = None
    if rho is not None:
        rng = np.random.default_rng(seed)
        drawn = np.array(
            [_spearman(xs, np.concatenate([rng.permutation(y) for y in ys])) or 0.0 for _ in range(permutations)]
        )
        p_value = float((1 + np.sum(drawn * np.sign(rho) >= abs(rho) - 1e-12)) / (1 + permutations))
    same_sign = rho is not None and rho != 0 and all(r is not None and r * rho > 0 for r in per_seed.values())
    return {
        "rho": rho,
        "n": int(xs.size),
        "per_seed": per_seed,
        "p_value": p_value,
        "same_sign": same_sign,
        "verdict": FINDING if same_sign and p_value is not None and p_value < 0.05 else UNDECIDED,
    }
