"""Statistics for tables: mean ± std with a t confidence interval, and paired comparisons.

Three ways to compare a variant with the full model, all paired, each with a 95% interval of the
difference:

* over seeds and test queries: a two-level bootstrap on per-query values (``ranks_test.npz`` of
  each run) that resamples seeds, then queries, so the interval carries both seed-to-seed and
  query-to-query variance. The ablation table uses it whenever both arms stored their ranks for at
  least one common seed; with one seed it is a bootstrap over queries only, and says so;
* over seeds: a paired t-test on the per-seed test metric (seeds match runs of the same seed),
  which needs at least two common seeds: the fallback when ranks are missing;
* over test queries: a paired bootstrap on per-query values already averaged over seeds. It
  ignores seed variance (the seed average hides it), so a gain one seed produces and another
  reverses can look significant; kept for comparison, not used by the tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "Comparison",
    "Summary",
    "mark",
    "paired_bootstrap",
    "paired_t_test",
    "summarize",
    "two_level_bootstrap",
]

TWO_LEVEL = "two-level bootstrap over seeds and queries"
ONE_SEED = "paired bootstrap over queries (1 seed)"


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
        test: ``"two-level bootstrap over seeds and queries"``, ``"paired bootstrap over queries
            (1 seed)"``, ``"paired t over seeds"``, ``"paired bootstrap over queries"`` or
            ``"none"``.
        pairs: seeds paired (queries for :func:`paired_bootstrap`, which averaged the seeds).
        ci_low, ci_high: 95% interval of ``delta`` (t interval over seeds, or bootstrap
            percentiles); NaN when it cannot be computed.
        queries: test queries paired (0 for the t-test, which sees one value per seed).
    """

    delta: float
    p_value: float
    test: str
    pairs: int
    ci_low: float = math.nan
    ci_high: float = math.nan
    queries: int = 0


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
    interval = summarize(a - b)
    return Comparison(
        delta,
        float(stats.ttest_rel(a, b).pvalue),
        "paired t over seeds",
        len(seeds),
        interval.ci_low,
        interval.ci_high,
    )


def paired_bootstrap(
    variant: np.ndarray, reference: np.ndarray, rounds: int = 2000, seed: int = 0
) -> Comparison:
    """Paired bootstrap over queries of the mean difference of per-query values.

    Args:
        variant, reference: ``(Q,)`` per-query values (reciprocal ranks) on the same queries in
            the same order.

    The two-sided p-value is twice the smaller tail of the resampled differences around zero
    (at least ``1 / rounds``); the interval is their 2.5 and 97.5 percentiles. Averaging seeds
    before this test hides their variance: :func:`two_level_bootstrap` keeps it.
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
    low, high = np.percentile(means, [2.5, 97.5])
    return Comparison(
        float(differences.mean()),
        _two_sided_p(means),
        "paired bootstrap over queries",
        len(differences),
        float(low),
        float(high),
        len(differences),
    )


def two_level_bootstrap(
    variant: np.ndarray,
    reference: np.ndarray,
    rounds: int = 2000,
    seed: int = 0,
    *,
    max_bytes: int = 8 * 2**20,
) -> Comparison:
    """Paired bootstrap over seeds, then queries, of the mean difference of per-query values.

    Args:
        variant, reference: ``(S, Q)`` per-query values (reciprocal ranks, or hits as 0/1) of
            ``S`` paired seeds (row ``s`` of both arms is the same seed) on the same ``Q`` test
            queries in the same order.
        rounds: bootstrap rounds.
        seed: seed of the resampling; the same seed gives the same result.
        max_bytes: bound on the working memory: rounds are processed in chunks within it
            (cache-sized chunks, the default, are the fastest); the result does not depend on it
            beyond floating-point rounding.

    Each round draws ``S`` seeds with replacement, then ``Q`` queries with replacement (one draw
    shared by both arms and by every seed: the queries are one test set, so the pairing is kept),
    and takes the mean of ``variant − reference`` over the drawn cells. Seeds and queries are
    crossed factors, so the spread of the round means carries the variance of both, where
    averaging seeds first (:func:`paired_bootstrap`) carries only the queries'.

    A round's mean is ``c · D · w / (S·Q)``, with ``D = variant − reference`` and ``c`` ``(S,)`` and
    ``w`` ``(Q,)`` how often each seed and each query was drawn, so no ``(S, Q)`` array is ever
    gathered: each chunk of ``R`` rounds costs one ``(R, Q)`` count matrix.

    Returns:
        the observed mean difference, the 2.5 and 97.5 percentiles of the round means, and a
        two-sided p-value: twice the smaller tail of the round means around zero, at least
        ``1 / rounds``. With ``S = 1`` the seed variance cannot be estimated; the test is named
        ``"paired bootstrap over queries (1 seed)"``.
    """
    variant, reference = np.asarray(variant, float), np.asarray(reference, float)
    if variant.shape != reference.shape or variant.ndim != 2 or 0 in variant.shape:
        raise ValueError(
            "two-level bootstrap needs two (seeds, queries) arrays of the same shape with at "
            f"least one seed and one query, got {variant.shape} and {reference.shape}"
        )
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    differences = variant - reference  # (S, Q)
    if not np.isfinite(differences).all():
        raise ValueError("two-level bootstrap needs finite per-query values (NaN or inf found)")
    n_seeds, n_queries = differences.shape
    generator = np.random.default_rng(seed)
    # Seeds first for all rounds, then queries chunk by chunk from the same stream: the draws do
    # not depend on the chunk size.
    seed_draws = generator.integers(0, n_seeds, size=(rounds, n_seeds))
    seed_counts = _counts(seed_draws, n_seeds)  # (rounds, S)
    # Per round in a chunk: the int64 draws, their int64 and float64 counts, (Q,) each, and slack.
    chunk = max(1, min(rounds, max_bytes // (32 * n_queries)))
    means = np.empty(rounds)
    for start in range(0, rounds, chunk):
        stop = min(rounds, start + chunk)
        query_draws = generator.integers(0, n_queries, size=(stop - start, n_queries))
        query_counts = _counts(query_draws, n_queries)  # (R, Q)
        per_seed = query_counts @ differences.T  # (R, S): each seed's sum over drawn queries
        means[start:stop] = (seed_counts[start:stop] * per_seed).sum(axis=1)
    means /= n_seeds * n_queries
    low, high = np.percentile(means, [2.5, 97.5])
    # Rounding of a sum of S·Q terms, far below any difference a metric can show.
    tolerance = 1e-9 * float(np.abs(differences).max())
    return Comparison(
        float(differences.mean()),
        _two_sided_p(means, tolerance),
        TWO_LEVEL if n_seeds > 1 else ONE_SEED,
        n_seeds,
        float(low),
        float(high),
        n_queries,
    )


def _counts(draws: np.ndarray, size: int) -> np.ndarray:
    """``(R, size)`` float counts of each index in each row of ``(R, n)`` integer draws."""
    rows = draws.shape[0]
    draws += size * np.arange(rows)[:, None]  # row r counts into bins [r·size, (r+1)·size)
    return np.bincount(draws.ravel(), minlength=rows * size).reshape(rows, size).astype(float)


def _two_sided_p(means: np.ndarray, tolerance: float = 0.0) -> float:
    """Twice the smaller tail of bootstrap means around zero, in ``[1 / rounds, 1]``.

    Means within ``tolerance`` of zero count in both tails: a resample whose differences cancel
    is a tie, whatever sign its rounding error has.
    """
    tail = min((means <= tolerance).mean(), (means >= -tolerance).mean())
    return float(min(1.0, max(2 * tail, 1 / len(means))))


def mark(p_value: float) -> str:
    """``**`` for p < 0.01, ``*`` for p < 0.05, empty otherwise (and when unknown)."""
    if p_value is None or math.isnan(p_value):
        return ""
    return "**" if p_value < 0.01 else "*" if p_value < 0.05 else ""
