"""Statistics against closed forms and scipy."""

import itertools
import math
import time
import tracemalloc

import numpy as np
import pytest
from scipy import stats

from analysis.stats import (
    mark,
    paired_bootstrap,
    paired_t_test,
    summarize,
    two_level_bootstrap,
)


def test_summary_matches_the_t_interval():
    values = [0.5, 0.6, 0.7]
    summary = summarize(values)
    std = math.sqrt(((0.5 - 0.6) ** 2 + 0 + (0.7 - 0.6) ** 2) / 2)
    half = stats.t.ppf(0.975, 2) * std / math.sqrt(3)
    assert summary.mean == pytest.approx(0.6) and summary.std == pytest.approx(std)
    assert (summary.ci_low, summary.ci_high) == pytest.approx((0.6 - half, 0.6 + half))
    single = summarize([0.4])
    assert single.mean == 0.4 and math.isnan(single.std) and math.isnan(single.ci_low)
    assert summarize([]).n == 0


def test_paired_t_test_over_common_seeds():
    variant, reference = {0: 0.5, 1: 0.52, 2: 0.49, 7: 0.1}, {0: 0.6, 1: 0.61, 2: 0.58}
    comparison = paired_t_test(variant, reference)
    expected = stats.ttest_rel([0.5, 0.52, 0.49], [0.6, 0.61, 0.58]).pvalue
    assert comparison.pairs == 3 and comparison.p_value == pytest.approx(expected)
    assert comparison.delta == pytest.approx(-0.0933333, abs=1e-6)
    # Its interval is the t interval of the per-seed differences.
    differences = np.subtract([0.5, 0.52, 0.49], [0.6, 0.61, 0.58])
    half = stats.t.ppf(0.975, 2) * differences.std(ddof=1) / math.sqrt(3)
    assert (comparison.ci_low, comparison.ci_high) == pytest.approx(
        (differences.mean() - half, differences.mean() + half)
    )
    single = paired_t_test({0: 0.5}, {0: 0.6})
    assert math.isnan(single.p_value) and math.isnan(single.ci_low)


def test_paired_bootstrap_sees_a_real_shift_and_not_noise():
    generator = np.random.default_rng(1)
    reference = generator.uniform(0, 1, 500)
    shifted = paired_bootstrap(reference + 0.05, reference)
    assert shifted.delta == pytest.approx(0.05) and shifted.p_value < 0.01
    same = paired_bootstrap(reference, reference)
    assert same.p_value == 1.0
    noise = paired_bootstrap(reference + generator.normal(0, 0.2, 500) * 0.01, reference)
    assert noise.p_value > 0.05
    assert shifted.ci_low == pytest.approx(0.05) and shifted.ci_high == pytest.approx(0.05)
    with pytest.raises(ValueError, match="two equal 1-D arrays"):
        paired_bootstrap(reference, reference[:10])


def _arms(offsets, noise, queries=2000, seed=0):
    """``(S, Q)`` reference reciprocal ranks and a variant off by ``offsets[s]`` plus noise."""
    generator = np.random.default_rng(seed)
    reference = generator.uniform(0, 1, (len(offsets), queries))
    variant = reference + np.asarray(offsets)[:, None]
    return variant + generator.normal(0, noise, reference.shape), reference


def test_two_level_bootstrap_does_not_take_seed_variance_for_an_effect():
    # Seeds disagree (+0.05, -0.05, +0.01: mean +0.003) and queries barely vary around that.
    variant, reference = _arms([0.05, -0.05, 0.01], noise=0.01)
    query_only = paired_bootstrap(variant.mean(axis=0), reference.mean(axis=0))
    two_level = two_level_bootstrap(variant, reference)
    assert two_level.delta == pytest.approx(query_only.delta)
    assert two_level.delta == pytest.approx(0.0033, abs=5e-4)
    assert query_only.p_value < 0.01  # averaging seeds first hides their disagreement
    assert two_level.p_value > 0.05 and two_level.ci_low < 0 < two_level.ci_high
    query_width = query_only.ci_high - query_only.ci_low
    assert two_level.ci_high - two_level.ci_low > 50 * query_width
    assert two_level.test == "two-level bootstrap over seeds and queries"
    assert (two_level.pairs, two_level.queries) == (3, 2000)


def test_two_level_bootstrap_sees_a_gain_every_seed_agrees_on():
    variant, reference = _arms([0.03, 0.035, 0.04], noise=0.05, seed=1)
    comparison = two_level_bootstrap(variant, reference)
    assert comparison.delta == pytest.approx(0.035, abs=0.005)
    assert comparison.p_value < 0.01 and comparison.ci_low > 0
    assert comparison.ci_low < comparison.delta < comparison.ci_high
    losing = two_level_bootstrap(reference, variant)  # the same comparison the other way round
    assert losing.p_value < 0.01 and losing.ci_high < 0


def test_without_query_noise_it_is_the_exact_bootstrap_over_seeds():
    # Every query of seed s differs by d[s]: resampling queries changes nothing, so the round
    # means follow the bootstrap distribution of the mean of d, enumerable over all S**S draws.
    d = np.array([0.02, -0.01, 0.04, 0.005, -0.015])
    variant, reference = _arms(d, noise=0.0)
    exact = np.round([d[list(draw)].mean() for draw in itertools.product(range(5), repeat=5)], 12)
    low, high = np.percentile(exact, [2.5, 97.5])
    exact_p = 2 * min((exact <= 0).mean(), (exact >= 0).mean())
    comparison = two_level_bootstrap(variant, reference, rounds=20000)
    assert comparison.delta == pytest.approx(d.mean())
    assert comparison.ci_low == pytest.approx(low, abs=1e-3)
    assert comparison.ci_high == pytest.approx(high, abs=1e-3)
    assert comparison.p_value == pytest.approx(exact_p, abs=0.02)


def test_with_one_seed_it_is_the_bootstrap_over_queries_and_says_so():
    variant, reference = _arms([0.01], noise=0.2, seed=2)
    one_seed = two_level_bootstrap(variant, reference)
    query_only = paired_bootstrap(variant[0], reference[0])
    assert one_seed.test == "paired bootstrap over queries (1 seed)" and one_seed.pairs == 1
    assert one_seed.delta == pytest.approx(query_only.delta)
    width = query_only.ci_high - query_only.ci_low
    assert one_seed.ci_low == pytest.approx(query_only.ci_low, abs=0.1 * width)
    assert one_seed.ci_high == pytest.approx(query_only.ci_high, abs=0.1 * width)
    same = two_level_bootstrap(reference, reference)
    assert same.p_value == 1.0 and same.delta == 0.0


def test_two_level_bootstrap_is_deterministic_and_independent_of_chunking():
    variant, reference = _arms([0.02, 0.0, 0.01], noise=0.3, queries=500)
    first = two_level_bootstrap(variant, reference, rounds=500, seed=7)
    assert two_level_bootstrap(variant, reference, rounds=500, seed=7) == first
    other = two_level_bootstrap(variant, reference, rounds=500, seed=8)
    assert (other.ci_low, other.ci_high) != (first.ci_low, first.ci_high)
    # One round per chunk draws the same resamples as one chunk for all rounds.
    chunked = two_level_bootstrap(variant, reference, rounds=500, seed=7, max_bytes=1)
    assert chunked.p_value == first.p_value
    assert (chunked.ci_low, chunked.ci_high) == pytest.approx((first.ci_low, first.ci_high))


def test_two_level_bootstrap_rejects_arms_that_do_not_pair():
    variant, reference = _arms([0.0, 0.0], noise=0.1, queries=100)
    with pytest.raises(ValueError, match=r"same shape.*got \(2, 100\) and \(2, 99\)"):
        two_level_bootstrap(variant, reference[:, :99])
    with pytest.raises(ValueError, match=r"\(seeds, queries\) arrays"):
        two_level_bootstrap(variant[0], reference[0])  # (Q,) is not (S, Q)
    with pytest.raises(ValueError, match="finite"):
        two_level_bootstrap(np.full((2, 100), np.nan), reference)


def test_two_level_bootstrap_is_fast_and_small_at_full_size():
    # 10 seeds x 50k queries x 2000 rounds: chunked, so memory stays far below the 800 MB one
    # (rounds, Q) index array would take.
    variant, reference = _arms([0.0] * 10, noise=0.1, queries=50_000)
    tracemalloc.start()
    try:
        started = time.perf_counter()
        comparison = two_level_bootstrap(variant, reference)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert comparison.pairs == 10 and comparison.p_value > 0.05
    assert peak < 100 * 2**20, f"{peak / 2**20:.0f} MB"
    assert seconds < 8, f"{seconds:.1f} s"


def test_marks():
    assert [mark(p) for p in (0.001, 0.03, 0.2, math.nan)] == ["**", "*", "", ""]
