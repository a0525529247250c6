"""Position bias: examination propensities three ways, IPS-debiased item CTR, the examination decomposition.

Under the examination hypothesis P(click | item d at position k) = θ_k · γ_d. Propensities are reported
relative to position 1 (θ_1 = 1), which is all that debiasing needs.
(a) ``propensity_randomized``: on traffic where positions are randomised, CTR_k ∝ θ_k.
(b) ``fit_power_law``: θ_k = k^-η by binomial maximum likelihood on clicks/impressions per position.
(c) ``regression_em``: Wang et al., "Position Bias Estimation for Unbiased Learning to Rank in Personal
    Search" (WSDM 2018): EM over (item, position) cells with no randomisation; the M-step for relevance
    is a regression on item features (a per-item mean when the item id is the only feature).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import optimize

from ctrkit.measure.engine import MeasureError
from ctrkit.measure.stats import wilson_interval
from ctrkit.measure.tables import rollup


@dataclass
class Propensities:
    """θ per position relative to position 1, with its method and (where available) an interval."""

    positions: np.ndarray
    theta: np.ndarray
    method: str
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    eta: float | None = None

    def lookup(self) -> dict[int, float]:
        """position -> θ."""
        return {int(k): float(t) for k, t in zip(self.positions, self.theta)}

    def to_frame(self) -> pd.DataFrame:
        """One row per position."""
        df = pd.DataFrame({"position": self.positions.astype(int), "propensity": self.theta})
        if self.low is not None and self.high is not None:
            df["ci_low"], df["ci_high"] = self.low, self.high
        return df


def _by_position(cube: pd.DataFrame, position: str) -> pd.DataFrame:
    if position not in cube.columns:
        raise MeasureError(f"no position column {position!r} in the data")
    t = rollup(cube, [position]).dropna(subset=[position])
    t = t[t["impressions"] > 0].sort_values(position)
    if t.empty:
        raise MeasureError("no impressions with a position")
    return t


def propensity_randomized(cube: pd.DataFrame, position: str = "position", alpha: float = 0.05) -> Propensities:
    """(a) θ_k = CTR_k / CTR_1 on randomised traffic; the interval is the Wilson interval of CTR_k over CTR_1."""
    t = _by_position(cube, position)
    k, n = t["clicks"].to_numpy(np.float64), t["impressions"].to_numpy(np.float64)
    ctr = k / n
    if ctr[0] <= 0:
        raise MeasureError("no clicks at the top position: propensities relative to it are undefined")
    lo, hi = wilson_interval(k, n, alpha)
    return Propensities(t[position].to_numpy(), ctr / ctr[0], "randomized", lo / ctr[0], hi / ctr[0])


def fit_power_law(positions: np.ndarray, clicks: np.ndarray, impressions: np.ndarray) -> tuple[float, float]:
    """(b) Binomial MLE of CTR_k = c · k^-η; returns (c, η)."""
    pos = np.asarray(positions, np.float64)
    k = np.asarray(clicks, np.float64)
    n = np.asarray(impressions, np.float64)

    def nll(params: np.ndarray) -> float:
        logc, eta = params
        p = np.clip(np.exp(logc - eta * np.log(pos)), 1e-12, 1 - 1e-12)
        return -float(np.sum(k * np.log(p) + (n - k) * np.log1p(-p)))

    start = np.array([np.log(max(k[0], 0.5) / n[0]), 1.0])
    res = optimize.minimize(nll, start, method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12,
                                                                        "maxiter": 4000})
    return float(np.exp(res.x[0])), float(res.x[1])


def propensity_power_law(cube: pd.DataFrame, position: str = "position") -> Propensities:
    """(b) θ_k = k^-η fitted to CTR by position (randomised traffic, or cells re-weighted by EM)."""
    t = _by_position(cube, position)
    pos = t[position].to_numpy(np.float64)
    _, eta = fit_power_law(pos, t["clicks"].to_numpy(), t["impressions"].to_numpy())
    return Propensities(pos.astype(int), (pos / pos[0]) ** (-eta), "power_law", eta=eta)


def regression_em(cube: pd.DataFrame, item: str = "item_id", position: str = "position",
                  features: pd.DataFrame | None = None, iters: int = 5000, tol: float = 1e-10) -> Propensities:
    """(c) Regression-EM on (item, position) cells: θ_k and γ_d from clicks alone, no randomisation.

    ``features``: optional item features (index = item) for the relevance regression; without them the
    M-step for γ is the per-item posterior mean, i.e. the regression on a one-hot item id.
    """
    for c in (item, position):
        if c not in cube.columns:
            raise MeasureError(f"regression-EM needs the {c!r} column")
    cells = rollup(cube, [item, position]).dropna()
    cells = cells[cells["impressions"] > 0]
    pos_vals, pos_idx = np.unique(cells[position].to_numpy(), return_inverse=True)
    item_vals, item_idx = np.unique(cells[item].to_numpy(), return_inverse=True)
    n = cells["impressions"].to_numpy(np.float64)
    c = cells["clicks"].to_numpy(np.float64)
    ctr_pos = np.bincount(pos_idx, c, pos_vals.size) / np.bincount(pos_idx, n, pos_vals.size)
    theta = np.clip(ctr_pos / ctr_pos.max(), 1e-3, 1.0)
    gamma = np.full(item_vals.size, 0.5)
    model = None
    if features is not None:
        from sklearn.linear_model import LogisticRegression

        x = features.reindex(item_vals).fillna(0.0).to_numpy(np.float64)
        model = LogisticRegression(C=1.0, max_iter=500)
    for _ in range(iters):
        th, ga = theta[pos_idx], gamma[item_idx]
        denom = np.maximum(1.0 - th * ga, 1e-12)
        p_e = th * (1.0 - ga) / denom
        p_r = (1.0 - th) * ga / denom
        e_mass = c + (n - c) * p_e
        r_mass = c + (n - c) * p_r
        new_theta = np.bincount(pos_idx, e_mass, pos_vals.size) / np.bincount(pos_idx, n, pos_vals.size)
        r_sum = np.bincount(item_idx, r_mass, item_vals.size)
        n_item = np.bincount(item_idx, n, item_vals.size)
        if model is not None:
            y = np.concatenate([np.ones(item_vals.size), np.zeros(item_vals.size)])
            w = np.concatenate([r_sum, n_item - r_sum])
            model.fit(np.vstack([x, x]), y, sample_weight=w)
            new_gamma = model.predict_proba(x)[:, 1]
        else:
            new_gamma = r_sum / n_item
        new_theta = np.clip(new_theta, 1e-6, 1.0)
        new_gamma = np.clip(new_gamma, 1e-6, 1.0 - 1e-6)
        delta = max(np.max(np.abs(new_theta - theta)), np.max(np.abs(new_gamma - gamma)))
        theta, gamma = new_theta, new_gamma
        if delta < tol:
            break
    return Propensities(pos_vals, theta / theta[0], "regression_em")


def ips_item_ctr(cube: pd.DataFrame, props: Propensities, item: str = "item_id", position: str = "position",
                 clip: float = 0.01, min_impressions: int = 1) -> pd.DataFrame:
    """Per-item CTR: raw, IPS (mean of click/θ, θ clipped below at ``clip``) and self-normalised (clicks over
    expected examinations Σc/Σθ), all on the position-1 scale."""
    if not 0.0 < clip <= 1.0:  # θ is a probability: a clip above 1 rescales every item, one at 0 divides by 0
        raise MeasureError(f"--clip is the lowest examination probability an item's clicks are divided by: it must "
                           f"be in (0, 1], got {clip}")
    if min_impressions < 0:
        raise MeasureError(f"--min-item-impressions must be >= 0, got {min_impressions}")
    cells = rollup(cube, [item, position]).dropna()
    theta = cells[position].map(props.lookup())
    if theta.isna().any():
        missing = sorted(cells.loc[theta.isna(), position].unique().tolist())
        raise MeasureError(f"no propensity for positions {missing[:10]}")
    th = np.maximum(theta.to_numpy(np.float64), clip)
    cells = cells.assign(_w=cells["clicks"] / th, _e=cells["impressions"] * th)
    g = cells.groupby(item)[["impressions", "clicks", "_w", "_e"]].sum()
    g = g[g["impressions"] >= min_impressions]
    out = pd.DataFrame({
        item: g.index, "impressions": g["impressions"].to_numpy(np.int64), "clicks": g["clicks"].to_numpy(np.int64),
        "raw_ctr": (g["clicks"] / g["impressions"]).to_numpy(),
        "ips_ctr": (g["_w"] / g["impressions"]).to_numpy(),
        "snips_ctr": (g["clicks"] / g["_e"]).to_numpy(),
    })
    return out.reset_index(drop=True)


def examination_decomposition(cube: pd.DataFrame, props: Propensities, position: str = "position") -> pd.DataFrame:
    """Split each position's CTR into examination θ_k and the mean relevance of what was shown there.

    CTR_k = θ_k · r_k; ``exam_share`` is the part of log(CTR_k / CTR_1) that examination explains.
    """
    t = _by_position(cube, position)
    ctr = (t["clicks"] / t["impressions"]).to_numpy(np.float64)
    theta = t[position].map(props.lookup()).to_numpy(np.float64)
    rel = ctr / theta
    with np.errstate(divide="ignore", invalid="ignore"):
        total = np.log(ctr / ctr[0])
        share = np.where(np.abs(total) > 1e-12, np.log(theta / theta[0]) / total, np.nan)
    return pd.DataFrame({position: t[position].to_numpy(), "impressions": t["impressions"].to_numpy(np.int64),
                         "ctr": ctr, "propensity": theta, "relevance_shown": rel, "exam_share": share})
