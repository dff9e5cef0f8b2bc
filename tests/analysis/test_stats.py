"""Statistics against closed forms and scipy."""

import math

import numpy as np
import pytest
from scipy import stats

from analysis.stats import mark, paired_bootstrap, paired_t_test, summarize


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
    assert math.isnan(paired_t_test({0: 0.5}, {0: 0.6}).p_value)


def test_paired_bootstrap_sees_a_real_shift_and_not_noise():
    generator = np.random.default_rng(1)
    reference = generator.uniform(0, 1, 500)
    shifted = paired_bootstrap(reference + 0.05, reference)
    assert shifted.delta == pytest.approx(0.05) and shifted.p_value < 0.01
    same = paired_bootstrap(reference, reference)
    assert same.p_value == 1.0
    noise = paired_bootstrap(reference + generator.normal(0, 0.2, 500) * 0.01, reference)
    assert noise.p_value > 0.05
    with pytest.raises(ValueError, match="two equal 1-D arrays"):
        paired_bootstrap(reference, reference[:10])


def test_marks():
    assert [mark(p) for p in (0.001, 0.03, 0.2, math.nan)] == ["**", "*", "", ""]
