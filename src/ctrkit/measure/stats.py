"""Vectorised statistics for rates: Wilson intervals, two-proportion tests, lift intervals, power, corrections.

Own closed forms (numpy + scipy.stats.norm) so whole tables are computed in one call; the tests check each
one against statsmodels (proportion_confint 'wilson', proportions_ztest, NormalIndPower, multipletests).
"""

from __future__ import annotations

import numpy as np
from scipy import optimize
from scipy.stats import norm

def _z(alpha: float) -> float:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return float(norm.isf(alpha / 2.0))


def wilson_interval(successes: np.ndarray | float, trials: np.ndarray | float,
                    alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for k successes in n trials (NaN where n == 0); good at tiny CTRs."""
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    z = _z(alpha)
    z2 = z * z
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k / n
        denom = 1.0 + z2 / n
        center = (p + z2 / (2.0 * n)) / denom
        half = z * np.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n)) / denom
        lo = np.where(n > 0, center - half, np.nan)
        hi = np.where(n > 0, center + half, np.nan)
    return lo, hi


def two_proportion_ztest(k1: np.ndarray | float, n1: np.ndarray | float, k2: np.ndarray | float,
                         n2: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Pooled two-sided z-test of p1 == p2; returns (z, p-value), z > 0 when sample 1 is higher."""
    k1, n1, k2, n2 = (np.asarray(a, dtype=np.float64) for a in (k1, n1, k2, n2))
    with np.errstate(divide="ignore", invalid="ignore"):
        pooled = (k1 + k2) / (n1 + n2)
        se = np.sqrt(pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2))
        z = (k1 / n1 - k2 / n2) / se
    pval = 2.0 * norm.sf(np.abs(z))
    return z, pval


def diff_interval(k1: np.ndarray | float, n1: np.ndarray | float, k0: np.ndarray | float,
                  n0: np.ndarray | float, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Absolute lift p1 - p0 with an unpooled (Wald) interval: (lift, low, high)."""
    k1, n1, k0, n0 = (np.asarray(a, dtype=np.float64) for a in (k1, n1, k0, n0))
    z = _z(alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        p1, p0 = k1 / n1, k0 / n0
        se = np.sqrt(p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0)
    d = p1 - p0
    return d, d - z * se, d + z * se


def ratio_interval(k1: np.ndarray | float, n1: np.ndarray | float, k0: np.ndarray | float,
                   n0: np.ndarray | float, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relative lift p1/p0 - 1 with a delta-method interval on log(p1/p0): (lift, low, high)."""
    k1, n1, k0, n0 = (np.asarray(a, dtype=np.float64) for a in (k1, n1, k0, n0))
    z = _z(alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        p1, p0 = k1 / n1, k0 / n0
        log_r = np.log(p1 / p0)
        se = np.sqrt((1 - p1) / (n1 * p1) + (1 - p0) / (n0 * p0))
    return np.exp(log_r) - 1.0, np.exp(log_r - z * se) - 1.0, np.exp(log_r + z * se) - 1.0


def mean_diff_test(s1: float, ss1: float, n1: float, s0: float, ss0: float, n0: float,
                   alpha: float = 0.05) -> dict[str, float]:
    """Welch-style z comparison of two means from sums and sums of squares (revenue per impression)."""
    z = _z(alpha)
    m1, m0 = s1 / n1, s0 / n0
    v1 = max(ss1 / n1 - m1 * m1, 0.0) * n1 / max(n1 - 1, 1)
    v0 = max(ss0 / n0 - m0 * m0, 0.0) * n0 / max(n0 - 1, 1)
    se = float(np.sqrt(v1 / n1 + v0 / n0))
    d = m1 - m0
    stat = d / se if se > 0 else (0.0 if d == 0 else float(np.sign(d)) * np.inf)
    return {"control": m0, "treatment": m1, "abs_lift": d, "abs_low": d - z * se, "abs_high": d + z * se,
            "rel_lift": d / m0 if m0 else float("nan"), "z": stat, "p_value": float(2 * norm.sf(abs(stat)))}


def cohens_h(p1: np.ndarray | float, p2: np.ndarray | float) -> np.ndarray:
    """Cohen's h effect size 2·asin(√p1) − 2·asin(√p2), the scale NormalIndPower works on."""
    return 2.0 * np.arcsin(np.sqrt(np.asarray(p1, dtype=np.float64))) - 2.0 * np.arcsin(
        np.sqrt(np.asarray(p2, dtype=np.float64)))


def power_two_proportions(p0: float, p1: float, n_per_arm: np.ndarray | float, alpha: float = 0.05,
                          ratio: float = 1.0) -> np.ndarray:
    """Power of the two-sided test of p1 vs p0 with n_per_arm in control and ratio·n in treatment."""
    h = cohens_h(p1, p0)
    n1 = np.asarray(n_per_arm, dtype=np.float64)
    n_eff = 1.0 / (1.0 / n1 + 1.0 / (n1 * ratio))
    crit = _z(alpha)
    return norm.sf(crit - h * np.sqrt(n_eff)) + norm.cdf(-crit - h * np.sqrt(n_eff))


def impressions_needed(p0: float, mde: float, alpha: float = 0.05, power: float = 0.8, ratio: float = 1.0,
                       relative: bool = True) -> float:
    """Impressions per control arm to detect a CTR change of ``mde`` (relative by default) with ``power``."""
    if not 0.0 < p0 < 1.0:
        raise ValueError(f"baseline rate must be in (0, 1), got {p0}")
    p1 = p0 * (1.0 + mde) if relative else p0 + mde
    if not 0.0 < p1 < 1.0 or p1 == p0:
        raise ValueError(f"treatment rate {p1} must differ from {p0} and lie in (0, 1)")
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power}")
    h = abs(float(cohens_h(p1, p0)))
    crit = _z(alpha)
    guess = ((crit + norm.isf(1.0 - power)) / h) ** 2 * (1.0 + 1.0 / ratio)

    def f(n: float) -> float:
        return float(power_two_proportions(p0, p1, n, alpha, ratio)) - power

    return float(optimize.brentq(f, guess * 0.5, guess * 2.0, xtol=1e-10, rtol=1e-14))


def bonferroni(pvalues: np.ndarray | list[float]) -> np.ndarray:
    """Bonferroni-adjusted p-values (capped at 1)."""
    p = np.asarray(pvalues, dtype=np.float64)
    return np.minimum(p * p.size, 1.0)


def holm(pvalues: np.ndarray | list[float]) -> np.ndarray:
    """Holm step-down adjusted p-values: uniformly more powerful than Bonferroni, same error control."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = p.size
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return out
