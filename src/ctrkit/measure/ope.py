"""Off-policy estimates: "what CTR would policy B have had?" from logs that carry the logging propensity.

The target policy is a table ``keys..., action, propensity`` (π_e(action | keys)), e.g. position × item for a
context-free ranking policy, or a column of π_e(a_i | x_i) already in the log. The weight of a logged row is
w = π_e(a|x) / π_0(a|x), optionally clipped at ``max_weight``.
IPS = mean(w·r); SNIPS = Σw·r / Σw; DR = mean(Σ_a π_e(a|x)·q(x,a) + w·(r − q(x,a_logged))) with q any
callable ``f(DataFrame) -> pCTR`` (a ctrkit bundle through :func:`bundle_reward_model`, or
:class:`LogisticRewardModel`). IPS and SNIPS are single SQL aggregates (DuckDB or Spark); DR pulls the rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import norm

from ctrkit.measure.engine import Engine, MeasureError

RewardModel = Callable[[pd.DataFrame], np.ndarray]


@dataclass
class Estimate:
    """One estimate with a normal-approximation interval and weight diagnostics."""

    estimator: str
    value: float
    ci_low: float
    ci_high: float
    n: int
    effective_sample_size: float
    max_weight: float

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return asdict(self)


def _check_cols(kinds: dict[str, str], cols: list[str], what: str) -> None:
    missing = [c for c in cols if c not in kinds]
    if missing:
        raise MeasureError(f"{what}: no column {missing[0]!r}; columns are {list(kinds)}")


def policy_from_log(engine: Engine, view: str, keys: list[str], action: str, what: str | None = None
                    ) -> pd.DataFrame:
    """The empirical action distribution of a logged policy: share of each action within each key group
    (``what`` names the view in errors, e.g. its file)."""
    _check_cols(engine.columns(view), keys + [action], what or view)
    q = engine.dialect.q
    k = ", ".join(q(c) for c in keys)
    part = f"PARTITION BY {k}" if keys else ""
    sql = (f"SELECT {k + ', ' if keys else ''}{q(action)}, CAST(COUNT(*) AS DOUBLE) / SUM(COUNT(*)) OVER ({part}) "
           f"AS propensity FROM {view} GROUP BY {k + ', ' if keys else ''}{q(action)}")
    return engine.query(sql)


def _weights_sql(engine: Engine, view: str, logging: str, target: str | pd.DataFrame, keys: list[str],
                 action: str, max_weight: float | None) -> str:
    """SQL of the log with ``_w`` (clipped importance weight) and ``_pe`` (target propensity) columns."""
    q = engine.dialect.q
    if isinstance(target, str):
        pe = f"CAST(l.{q(target)} AS DOUBLE)"
        join = ""
    else:
        _check_cols({c: "" for c in target.columns}, keys + [action, "propensity"], "target policy table")
        engine.register("_target_policy", target[keys + [action, "propensity"]])
        on = " AND ".join(f"l.{q(c)} = p.{q(c)}" for c in keys + [action])
        join = f"LEFT JOIN _target_policy p ON {on}"
        pe = "COALESCE(CAST(p.propensity AS DOUBLE), 0.0)"
    w = f"{pe} / CAST(l.{q(logging)} AS DOUBLE)"
    if max_weight is not None and not max_weight > 0:  # a clip at 0 or below makes every weight 0 or negative
        raise MeasureError(f"--max-weight clips importance weights: it must be > 0, got {max_weight}")
    if max_weight is not None:
        w = f"LEAST({w}, {float(max_weight)})"
    return f"SELECT l.*, {pe} AS _pe, {w} AS _w FROM {view} l {join}"


def ips_snips(engine: Engine, view: str, reward: str, logging: str, target: str | pd.DataFrame,
              keys: list[str] | None = None, action: str = "item_id", max_weight: float | None = None,
              alpha: float = 0.05, what: str | None = None) -> list[Estimate]:
    """IPS and self-normalised IPS of the target policy's mean reward, from one SQL aggregate (``what`` names
    the view in errors, e.g. its file)."""
    keys = keys or []
    kinds = engine.columns(view)
    what = what or view
    _check_cols(kinds, [reward, logging] + ([target] if isinstance(target, str) else keys + [action]), what)
    q = engine.dialect.q
    bad = engine.query(f"SELECT COUNT(*) AS n FROM {view} WHERE {q(logging)} IS NULL OR {q(logging)} <= 0 "
                       f"OR {q(logging)} > 1").iloc[0, 0]
    if int(bad):
        raise MeasureError(f"{what}: {int(bad)} rows have a logging propensity {logging!r} outside (0, 1]; "
                           "IPS needs every logged action's probability")
    r = f"CAST({q(reward)} AS DOUBLE)"
    agg = engine.query(
        f"SELECT COUNT(*) AS n, SUM(_w) AS sw, SUM(_w * _w) AS sw2, SUM(_w * {r}) AS swr, "
        f"SUM(_w * _w * {r} * {r}) AS sw2r2, SUM(_w * _w * {r}) AS sw2r, MAX(_w) AS wmax "
        f"FROM ({_weights_sql(engine, view, logging, target, keys, action, max_weight)}) t").iloc[0]
    n, sw, sw2, swr, sw2r2, sw2r, wmax = (float(agg[c] or 0.0) for c in
                                          ("n", "sw", "sw2", "swr", "sw2r2", "sw2r", "wmax"))
    if n == 0 or sw == 0:
        raise MeasureError("no logged row has a positive target-policy probability: the policies do not overlap")
    z = float(norm.isf(alpha / 2))
    ess = sw * sw / sw2 if sw2 > 0 else 0.0
    ips = swr / n
    var_ips = max(sw2r2 / n - ips * ips, 0.0) / n
    snips = swr / sw
    var_sn = max(sw2r2 - 2 * snips * sw2r + snips * snips * sw2, 0.0) / (sw * sw)
    return [Estimate("ips", ips, ips - z * np.sqrt(var_ips), ips + z * np.sqrt(var_ips), int(n), ess, wmax),
            Estimate("snips", snips, snips - z * np.sqrt(var_sn), snips + z * np.sqrt(var_sn), int(n), ess, wmax)]


def doubly_robust(engine: Engine, view: str, reward: str, logging: str, target: pd.DataFrame,
                  reward_model: RewardModel, keys: list[str] | None = None, action: str = "item_id",
                  max_weight: float | None = None, alpha: float = 0.05, batch_rows: int = 200_000) -> Estimate:
    """Doubly robust estimate: the reward model's value of the target policy, corrected by weighted residuals."""
    keys = keys or []
    if not isinstance(target, pd.DataFrame):
        raise MeasureError("doubly robust needs the target policy as a table of (keys, action, propensity)")
    rows = engine.query(_weights_sql(engine, view, logging, target, keys, action, max_weight))
    if rows.empty:
        raise MeasureError(f"{view}: no rows")
    rows = rows.reset_index(drop=True)
    pol = target[keys + [action, "propensity"]]
    q_logged = np.asarray(reward_model(rows), dtype=np.float64)
    dm = np.zeros(len(rows))
    clash = [c for c in pol.columns if c in rows.columns and c not in keys]  # e.g. a logged 'propensity'
    base = rows.drop(columns=clash).assign(_row=np.arange(len(rows)))
    for start in range(0, len(rows), max(1, batch_rows // max(1, len(pol)))):
        chunk = base.iloc[start:start + max(1, batch_rows // max(1, len(pol)))]
        cand = chunk.merge(pol, on=keys, how="inner") if keys else chunk.merge(pol, how="cross")
        if cand.empty:
            continue
        pred = np.asarray(reward_model(cand), dtype=np.float64)
        dm += np.bincount(cand["_row"].to_numpy(), cand["propensity"].to_numpy() * pred, len(rows))
    w = rows["_w"].to_numpy(np.float64)
    r = rows[reward].to_numpy(np.float64)
    terms = dm + w * (r - q_logged)
    value = float(terms.mean())
    se = float(terms.std(ddof=1) / np.sqrt(len(terms))) if len(terms) > 1 else float("nan")
    z = float(norm.isf(alpha / 2))
    ess = float(w.sum() ** 2 / (w * w).sum()) if (w * w).sum() > 0 else 0.0
    return Estimate("dr", value, value - z * se, value + z * se, len(rows), ess, float(w.max()))


class LogisticRewardModel:
    """A small pCTR model for DR: one-hot categoricals + numerics -> logistic regression (scikit-learn)."""

    def __init__(self, categorical: list[str], numeric: list[str] | None = None, c: float = 1.0) -> None:
        self.categorical = list(categorical)
        self.numeric = list(numeric or [])
        self.c = c
        self._pipe: Any = None

    def fit(self, df: pd.DataFrame, reward: str) -> LogisticRewardModel:
        """Fit on logged rows."""
        from sklearn.compose import ColumnTransformer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import OneHotEncoder, StandardScaler

        parts: list[Any] = [("cat", OneHotEncoder(handle_unknown="ignore"), self.categorical)]
        if self.numeric:
            parts.append(("num", StandardScaler(), self.numeric))
        self._pipe = make_pipeline(ColumnTransformer(parts), LogisticRegression(C=self.c, max_iter=1000))
        y = df[reward].to_numpy()
        if len(np.unique(y)) < 2:
            raise MeasureError(f"the reward column {reward!r} has a single value; a reward model cannot be fitted")
        self._pipe.fit(self._frame(df), y)
        return self

    def _frame(self, df: pd.DataFrame) -> pd.DataFrame:
        out = df[self.categorical + self.numeric].copy()
        for c in self.categorical:
            out[c] = out[c].astype(str)
        return out

    def __call__(self, df: pd.DataFrame) -> np.ndarray:
        """pCTR per row."""
        if self._pipe is None:
            raise MeasureError("LogisticRewardModel: call fit() first")
        return self._pipe.predict_proba(self._frame(df))[:, 1]


def bundle_reward_model(path: str) -> RewardModel:
    """A ctrkit model bundle as a DR reward model (``Bundle.load(path).predict(frame)``)."""
    try:
        from ctrkit.serve.bundle import Bundle
    except ImportError as exc:
        raise MeasureError(f"cannot load bundle {path}: ctrkit.serve.bundle is not available ({exc})") from exc
    bundle = Bundle.load(path)

    def predict(df: pd.DataFrame) -> np.ndarray:
        return np.asarray(bundle.predict(df), dtype=np.float64)

    return predict


def top_slot_value(logged: pd.DataFrame, candidates: pd.DataFrame, predict: RewardModel, *,
                   request: str = "request_id", action: str = "item_id", reward: str = "click",
                   logging: str = "propensity", position: str = "position", max_weight: float | None = None,
                   alpha: float = 0.05, recalibrate: bool = True) -> dict[str, Any]:
    """IPS, SNIPS and DR estimates of the top-slot CTR of the greedy policy that ``predict`` (a model's pCTR of
    candidate rows) defines, from logged rankings with their propensities.

    ``logged``: served impressions (``request``, ``action``, ``position``, ``reward``, ``logging``), of which
    the first position is used, since the logged propensity of a deeper slot is conditional
    on the slots above it. ``candidates``: every candidate of each request, with the features ``predict``
    reads; the target shows the one with the highest pCTR (first on ties). DR's reward model is ``predict``
    recalibrated to the top slot (with ``recalibrate``: Platt scaling of its logit on the logged top slots),
    since a click model fitted to every position underestimates the top slot's CTR, and DR's direct part keeps
    that bias wherever target and logger disagree and exploration rarely shows the target's pick. Requests
    without candidates are left out and counted.
    """
    for frame, what, cols in ((logged, "the log", [request, action, position, reward, logging]),
                              (candidates, "the candidates", [request, action])):
        _check_cols({c: "" for c in frame.columns}, cols, what)
    top = logged[logged[position] == logged[position].min()]
    cand = candidates[candidates[request].isin(top[request])].drop_duplicates([request, action])
    cand = cand.reset_index(drop=True)
    if cand.empty:
        raise MeasureError(f"no logged request has its candidates: none of {top[request].nunique()} request ids "
                           f"in the log is in the candidates' {request!r} column")
    q = cand[[request, action]].assign(_q=np.asarray(predict(cand), dtype=np.float64))
    target = q.loc[q.groupby(request, sort=False)["_q"].idxmax(), [request, action]].assign(propensity=1.0)
    rows = top[top[request].isin(q[request])][[request, action, reward, logging]].reset_index(drop=True)
    unmatched = int(top[request].nunique() - rows[request].nunique())
    missing = rows.merge(q, on=[request, action], how="left")["_q"].isna()
    if missing.any():
        raise MeasureError(f"request {rows.loc[missing.idxmax(), request]!r}: the logged top item "
                           f"{rows.loc[missing.idxmax(), action]!r} is not among its candidates")

    if recalibrate and rows[reward].nunique() == 2:
        from sklearn.linear_model import LogisticRegression

        def logit(p: np.ndarray) -> np.ndarray:
            p = np.clip(p, 1e-6, 1 - 1e-6)
            return (np.log(p) - np.log1p(-p))[:, None]

        shown = rows.merge(q, on=[request, action], how="left")["_q"].to_numpy()
        platt = LogisticRegression(C=1e4).fit(logit(shown), rows[reward].to_numpy())
        q["_q"] = platt.predict_proba(logit(q["_q"].to_numpy()))[:, 1]

    def lookup(df: pd.DataFrame) -> np.ndarray:
        return df[[request, action]].merge(q, on=[request, action], how="left")["_q"].fillna(0.0).to_numpy()

    from ctrkit.measure.engine import make_engine

    eng = make_engine("duckdb", threads=1)
    try:
        eng.register("_top_slot", rows)
        ests = ips_snips(eng, "_top_slot", reward, logging, target, [request], action, max_weight, alpha)
        ests.append(doubly_robust(eng, "_top_slot", reward, logging, target, lookup, [request], action,
                                  max_weight, alpha))
    finally:
        eng.close()
    agree = float(rows.merge(target, on=[request, action], how="inner").shape[0]) / len(rows)
    return {"estimates": [e.to_dict() for e in ests], "requests": len(rows), "without_candidates": unmatched,
            "logged_ctr": float(rows[reward].mean()), "agreement": agree}


def bundle_top_slot_value(events: Any, candidates: Any, bundle: Any, *, action: str = "item_id",
                          max_weight: float | None = None, alpha: float = 0.05) -> dict[str, Any]:
    """:func:`top_slot_value` of a bundle's greedy ranking on an event log of ``ctrkit serve``: ``events`` a log
    folder or a frame of attributed impressions, ``candidates`` a CSV/Parquet file or a frame, ``bundle`` a
    folder or a loaded bundle."""
    import polars as pl

    from ctrkit.serve.bundle import Bundle
    from ctrkit.serve.events import attributed_impressions

    model = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    label = model.schema.label
    rows = events if isinstance(events, (pl.DataFrame, pd.DataFrame)) else attributed_impressions(events, label=label)
    rows = rows.to_pandas() if isinstance(rows, pl.DataFrame) else rows
    if isinstance(candidates, (str, Path)):
        path = Path(candidates)
        if not path.is_file():
            raise MeasureError(f"candidates file {path} does not exist")
        cand = (pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path)).to_pandas()
    else:
        cand = candidates.to_pandas() if isinstance(candidates, pl.DataFrame) else candidates

    def predict(df: pd.DataFrame) -> np.ndarray:
        p = np.asarray(model.predict(df), dtype=np.float64)
        return p if p.ndim == 1 else p[:, 0]

    res = top_slot_value(rows, cand, predict, action=action, reward=label, max_weight=max_weight, alpha=alpha)
    return {"bundle": str(bundle), **res}
