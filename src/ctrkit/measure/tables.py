"""CTR tables from a cube: overall, by position, by any segment set, with Wilson intervals on every rate."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ctrkit.measure.stats import wilson_interval

COUNTS = ["impressions", "clicks", "conversions", "click_conversions", "view_conversions", "revenue",
          "revenue_sq", "bounces"]


def rollup(cube: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Sum the cube's counts over every dimension not in ``by`` (an empty ``by`` gives the overall row)."""
    counts = [c for c in COUNTS if c in cube.columns]
    if not by:
        return cube[counts].sum().to_frame().T
    return cube.groupby(by, dropna=False, sort=True)[counts].sum().reset_index()


def add_rate(df: pd.DataFrame, num: str, den: str, name: str, alpha: float = 0.05) -> pd.DataFrame:
    """Add ``name``, ``name_ci_low``, ``name_ci_high`` = num/den with a Wilson interval."""
    k = df[num].to_numpy(dtype=np.float64)
    n = df[den].to_numpy(dtype=np.float64)
    lo, hi = wilson_interval(k, n, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        df[name] = np.where(n > 0, k / n, np.nan)
    df[f"{name}_ci_low"], df[f"{name}_ci_high"] = lo, hi
    return df


def ctr_table(cube: pd.DataFrame, by: list[str], alpha: float = 0.05, conversions: bool = False) -> pd.DataFrame:
    """CTR per group with a Wilson interval (``ci_low``/``ci_high``); CVR per impression and per click if asked."""
    df = rollup(cube, by)
    df["impressions"] = df["impressions"].astype(np.int64)
    df["clicks"] = df["clicks"].astype(np.int64)
    add_rate(df, "clicks", "impressions", "ctr", alpha)
    df = df.rename(columns={"ctr_ci_low": "ci_low", "ctr_ci_high": "ci_high"})
    if conversions:
        df["conversions"] = df["conversions"].astype(np.int64)
        add_rate(df, "conversions", "impressions", "cvr_per_impression", alpha)
        add_rate(df, "click_conversions", "clicks", "cvr_per_click", alpha)
    keep = by + ["impressions", "clicks", "ctr", "ci_low", "ci_high"]
    if conversions:
        keep += ["conversions", "cvr_per_impression", "cvr_per_impression_ci_low", "cvr_per_impression_ci_high",
                 "click_conversions", "cvr_per_click", "cvr_per_click_ci_low", "cvr_per_click_ci_high"]
    return df[keep]


def weighted_vs_macro(cube: pd.DataFrame, over: list[str]) -> dict[str, float]:
    """Impression-weighted CTR (total clicks / impressions) vs the macro average of per-group CTRs."""
    t = rollup(cube, over)
    t = t[t["impressions"] > 0]
    weighted = float(t["clicks"].sum() / t["impressions"].sum()) if len(t) else float("nan")
    macro = float((t["clicks"] / t["impressions"]).mean()) if len(t) else float("nan")
    return {"weighted_ctr": weighted, "macro_ctr": macro, "groups": int(len(t))}


def records(df: pd.DataFrame) -> list[dict[str, object]]:
    """JSON-ready rows: numpy scalars to Python, NaN to None."""
    out = []
    for row in df.to_dict(orient="records"):
        clean: dict[str, object] = {}
        for k, v in row.items():
            if isinstance(v, (np.integer,)):
                v = int(v)
            elif isinstance(v, (np.floating, float)):
                v = None if np.isnan(v) else float(v)
            elif isinstance(v, np.bool_):
                v = bool(v)
            elif isinstance(v, pd.Timestamp):
                v = v.isoformat()
            elif v is pd.NA or v is pd.NaT:
                v = None
            clean[str(k)] = v
        out.append(clean)
    return out
