"""Statistics for tables: mean ± std with a t confidence interval, and paired comparisons.

Two ways to compare a variant with the full model, both paired:

* over seeds: a paired t-test on the per-seed test metric (seeds match runs of the same seed),
  which needs at least two common seeds;
* over test queries: a paired bootstrap on per-query reciprocal ranks (``ranks_test.npz`` of each
  run, averaged over the common seeds query by query), which works with a single seed and is used
  whenever every run stored its ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["Comparison", "Summary", "mark", "paired_bootstrap", "paired_t_test", "summarize"]


@dataclass(frozen=True)
class Summary:
    """``n`` values: mean, sample standard deviation (ddof 1) and a 95% t interval."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float


def summarize(values, confidence: float = 0.95) -> Summary:
    """Mean, std and a two-sided t confidence interval; std and interval are NaN for n < 2."""
    values = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(values)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(values.mean())
    if n < 2:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Comparison:
    """A paired comparison of a variant against the reference.

    Attributes:
        delta: variant minus reference (mean over pairs).
        p_value: two-sided; NaN when it cannot be computed.
        test: ``"paired t over seeds"``, ``"paired bootstrap over queries"`` or ``"none"``.
        pairs: seeds (or queries) paired.
    """

    delta: float
    p_value: float
    test: str
    pairs: int


def paired_t_test(variant: dict, reference: dict) -> Comparison:
    """Paired t-test over the seeds both have (``{seed: value}`` each)."""
    seeds = sorted(variant.keys() & reference.keys())
    if not seeds:
        return Comparison(math.nan, math.nan, "none", 0)
    a = np.array([variant[s] for s in seeds], dtype=float)
    b = np.array([reference[s] for s in seeds], dtype=float)
    delta = float((a - b).mean())
    if len(seeds) < 2 or np.allclose(a - b, (a - b)[0]):
        # Too few pairs, or a constant difference (zero variance): no t statistic exists.
        return Comparison(delta, math.nan, "paired t over seeds", len(seeds))
    return Comparison(delta, float(stats.ttest_rel(a, b).pvalue), "paired t over seeds", len(seeds))


def paired_bootstrap(
    variant: np.ndarray, reference: np.ndarray, rounds: int = 2000, seed: int = 0
) -> Comparison:
    """Paired bootstrap over queries of the mean difference of per-query values.

    Args:
        variant, reference: ``(Q,)`` per-query values (reciprocal ranks) on the same queries in
            the same order.

    The two-sided p-value is twice the smaller tail of the resampled differences around zero
    (at least ``1 / rounds``).
    """
    variant, reference = np.asarray(variant, float), np.asarray(reference, float)
    if variant.shape != reference.shape or variant.ndim != 1 or not len(variant):
        raise ValueError(
            f"paired bootstrap needs two equal 1-D arrays, got {variant.shape} and {reference.shape}"
        )
    differences = variant - reference
    generator = np.random.default_rng(seed)
    indices = generator.integers(0, len(differences), size=(rounds, len(differences)))
    means = differences[indices].mean(axis=1)  # (rounds,)
    tail = min((means <= 0).mean(), (means >= 0).mean())
    p_value = min(1.0, max(2 * tail, 1 / rounds))
    return Comparison(
        float(differences.mean()), p_value, "paired bootstrap over queries", len(differences)
    )


def mark(p_value: float) -> str:
    """``**`` for p < 0.01, ``*`` for p < 0.05, empty otherwise (and when unknown)."""
    if p_value is None or math.isnan(p_value):
        return ""
    return "**" if p_value < 0.01 else "*" if p_value < 0.05 else ""
