"""Paired bootstrap intervals, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from medrag_ray.eval.bootstrap import bootstrap_interval, paired_bootstrap


def test_identical_rows_differ_by_exactly_zero() -> None:
    a = np.array([1, 0, 1, 1, 0, 1])
    d = paired_bootstrap(a, a)
    assert (d.difference, d.ci_low, d.ci_high, d.n) == (0.0, 0.0, 0.0, 6) and not d.above_zero


def test_all_right_against_all_wrong() -> None:
    d = paired_bootstrap(np.ones(50), np.zeros(50))
    assert (d.difference, d.ci_low, d.ci_high) == (1.0, 1.0, 1.0) and d.above_zero


def test_interval_matches_the_binomial_spread() -> None:
    # 60 of 100 questions gained, none lost: the difference is 0.6 with a standard error of sqrt(.6*.4/100) ~ 0.049,
    # so the 95% percentile interval is about 0.6 +- 0.096
    a = np.r_[np.ones(60), np.zeros(40)]
    d = paired_bootstrap(a, np.zeros(100), n_resamples=4000)
    assert d.difference == pytest.approx(0.6)
    assert d.ci_low == pytest.approx(0.504, abs=0.03) and d.ci_high == pytest.approx(0.696, abs=0.03)


def test_pairing_removes_the_shared_variance() -> None:
    # b is a with 5 extra questions wrong: each resample's difference is 0.05 times the share of those 5 drawn,
    # so the interval stays near [0.01, 0.1] although each row's own accuracy varies far more
    rng = np.random.default_rng(1)
    a = (rng.random(100) < 0.7).astype(float)
    b = a.copy()
    b[np.flatnonzero(a)[:5]] = 0.0
    d = paired_bootstrap(a, b)
    assert d.difference == pytest.approx(0.05) and 0.0 < d.ci_low < 0.05 < d.ci_high <= 0.1
    low, high = bootstrap_interval(a)
    assert high - low > 2 * (d.ci_high - d.ci_low)


def test_seeded_and_checked() -> None:
    a, b = np.array([1, 0, 1, 0, 1]), np.array([0, 0, 1, 1, 0])
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)
    with pytest.raises(ValueError, match="one length"):
        paired_bootstrap(a, b[:4])
    with pytest.raises(ValueError, match="at least one"):
        paired_bootstrap(np.array([]), np.array([]))
