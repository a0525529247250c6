"""Own rate statistics against statsmodels, to 1e-9."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import proportion_confint, proportion_effectsize, proportions_ztest

from ctrkit.measure import stats


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 10**9), frac=st.floats(0, 1), alpha=st.sampled_from([0.01, 0.05, 0.1, 0.32]))
def test_wilson_matches_statsmodels(n: int, frac: float, alpha: float) -> None:
    k = int(round(frac * n))
    lo, hi = stats.wilson_interval(k, n, alpha)
    rlo, rhi = proportion_confint(k, n, alpha=alpha, method="wilson")
    assert abs(float(lo) - rlo) < 1e-9 and abs(float(hi) - rhi) < 1e-9


def test_wilson_vectorised_and_empty() -> None:
    lo, hi = stats.wilson_interval(np.array([0, 5, 0]), np.array([10, 100, 0]))
    assert np.isnan(lo[2]) and np.isnan(hi[2])
    assert lo[0] == 0.0 and 0 < hi[0] < 0.35


@settings(max_examples=200, deadline=None)
@given(n1=st.integers(10, 10**8), n2=st.integers(10, 10**8), f1=st.floats(0.001, 0.999),
       f2=st.floats(0.001, 0.999))
def test_ztest_matches_statsmodels(n1: int, n2: int, f1: float, f2: float) -> None:
    k1, k2 = max(1, int(f1 * n1)), max(1, int(f2 * n2))
    z, p = stats.two_proportion_ztest(k1, n1, k2, n2)
    rz, rp = proportions_ztest([k1, k2], [n1, n2])
    assert abs(float(z) - rz) < 1e-9 * max(1.0, abs(rz))
    assert abs(float(p) - rp) < 1e-9


@settings(max_examples=100, deadline=None)
@given(p0=st.floats(0.001, 0.5), lift=st.floats(-0.5, 1.0), n=st.integers(100, 10**8),
       ratio=st.sampled_from([0.5, 1.0, 2.0]), alpha=st.sampled_from([0.01, 0.05]))
def test_power_matches_normalindpower(p0: float, lift: float, n: int, ratio: float, alpha: float) -> None:
    p1 = p0 * (1 + lift)
    es = proportion_effectsize(p1, p0)
    ref = NormalIndPower().power(es, nobs1=n, alpha=alpha, ratio=ratio)
    assert abs(float(stats.power_two_proportions(p0, p1, n, alpha, ratio)) - ref) < 1e-9


def test_impressions_needed_solves_the_power_equation() -> None:
    for p0, mde in [(0.05, 0.02), (0.003, 0.1), (0.2, -0.05)]:
        n = stats.impressions_needed(p0, mde, alpha=0.05, power=0.8)
        es = proportion_effectsize(p0 * (1 + mde), p0)
        assert abs(NormalIndPower().power(es, nobs1=n, alpha=0.05, ratio=1.0) - 0.8) < 1e-9
        ref = NormalIndPower().solve_power(es, nobs1=None, alpha=0.05, power=0.8, ratio=1.0)
        assert abs(n - ref) / ref < 1e-6


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=30))
def test_holm_and_bonferroni_match_multipletests(p: list[float]) -> None:
    arr = np.array(p)
    assert np.allclose(stats.holm(arr), multipletests(arr, method="holm")[1], atol=1e-12)
    assert np.allclose(stats.bonferroni(arr), multipletests(arr, method="bonferroni")[1], atol=1e-12)


def test_lift_intervals_cover_the_point() -> None:
    d, lo, hi = stats.diff_interval(120, 1000, 100, 1000)
    assert lo < d < hi and abs(d - 0.02) < 1e-12
    r, rlo, rhi = stats.ratio_interval(120, 1000, 100, 1000)
    assert rlo < r < rhi and abs(r - 0.2) < 1e-12
