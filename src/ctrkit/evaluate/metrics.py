"""Evaluation metrics for predicted click probabilities: AUC, logloss, group AUC and calibration."""

from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-7


def _check(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels and predictions differ in length: {len(y)} vs {len(p)}")
    if len(y) and not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if len(p) and (np.isnan(p).any() or p.min() < 0 or p.max() > 1):
        raise ValueError("predictions must be probabilities in [0, 1] without NaN")
    return y, p


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN with one class only."""
    y, p = _check(y, p)
    n_pos = y.sum()
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ps, ys = p[order], y[order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    ends = np.r_[starts[1:], len(ps)]
    avg_rank = (starts + ends + 1) / 2.0
    ranks = np.repeat(avg_rank, ends - starts)
    return float((ranks[ys == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary cross-entropy, with probabilities clipped to [1e-7, 1 - 1e-7]."""
    y, p = _check(y, p)
    if len(y) == 0:
        return float("nan")
    q = np.clip(p, EPS, 1 - EPS)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))


def calibration_bins(y: np.ndarray, p: np.ndarray, n_bins: int = 20,
                     strategy: str = "quantile") -> dict[str, np.ndarray]:
    """Per-bin count, mean prediction and observed rate; bins of equal mass ("quantile") or width ("uniform").

    Equal-mass bins are the default because click probabilities crowd near zero, where equal-width bins
    would put nearly every impression into the first bin.
    """
    y, p = _check(y, p)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if strategy == "quantile":
        edges = np.unique(np.quantile(p, np.linspace(0, 1, n_bins + 1))) if len(p) else np.array([0.0, 1.0])
    elif strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    else:
        raise ValueError(f"strategy must be 'quantile' or 'uniform', got {strategy!r}")
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, max(len(edges) - 2, 0))
    k = max(len(edges) - 1, 1)
    count = np.bincount(idx, minlength=k).astype(np.float64)
    sum_p = np.bincount(idx, weights=p, minlength=k)
    sum_y = np.bincount(idx, weights=y, minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"count": count, "mean_pred": sum_p / count, "rate": sum_y / count, "edges": edges}


def ece(y: np.ndarray, p: np.ndarray, n_bins: int = 20, strategy: str = "quantile") -> float:
    """Expected calibration error: impression-weighted mean |observed rate - mean prediction| over bins."""
    b = calibration_bins(y, p, n_bins, strategy)
    ok = b["count"] > 0
    if not ok.any():
        return float("nan")
    gap = np.abs(b["rate"][ok] - b["mean_pred"][ok])
    return float(np.sum(b["count"][ok] * gap) / b["count"][ok].sum())


def group_auc(y: np.ndarray, p: np.ndarray, group: np.ndarray) -> float:
    """Impression-weighted mean of per-group AUC over groups (users) that have both classes.

    All groups at once (one sort, no loop over groups): each row gets its rank among its group's
    predictions, ties averaged, and each group's AUC is the Mann-Whitney U of its positives' ranks.
    """
    y, p = _check(y, p)
    g = np.asarray(group).ravel()
    if len(g) != len(y):
        raise ValueError("group must have one value per row")
    if len(y) == 0:
        return float("nan")
    order = np.lexsort((p, g))
    gs, ys, ps = g[order], y[order], p[order]
    new_group = np.r_[True, gs[1:] != gs[:-1]]
    group_id = np.cumsum(new_group) - 1
    group_start = np.flatnonzero(new_group)
    # runs of equal (group, prediction) share the average of the ranks they span
    run_start = np.flatnonzero(new_group | np.r_[True, ps[1:] != ps[:-1]])
    run_end = np.r_[run_start[1:], len(ps)]
    first_rank = run_start - group_start[group_id[run_start]]  # 0-based rank of the run's first row
    rank = np.repeat(first_rank + (run_end - run_start + 1) / 2.0, run_end - run_start)
    size = np.bincount(group_id).astype(np.float64)
    n_pos = np.bincount(group_id, weights=ys)
    n_neg = size - n_pos
    both = (n_pos > 0) & (n_neg > 0)
    if not both.any():
        return float("nan")
    rank_sum = np.bincount(group_id, weights=rank * ys)
    u = rank_sum[both] - n_pos[both] * (n_pos[both] + 1) / 2.0
    aucs = u / (n_pos[both] * n_neg[both])
    return float(np.sum(aucs * size[both]) / size[both].sum())


def evaluate(y: np.ndarray, p: np.ndarray, group: np.ndarray | None = None) -> dict[str, Any]:
    """The standard report: auc, logloss, ece, pred_actual_ratio, n, positives (+ gauc with groups)."""
    y, p = _check(y, p)
    n, pos = len(y), float(y.sum())
    out: dict[str, Any] = {
        "auc": auc(y, p),
        "logloss": logloss(y, p),
        "ece": ece(y, p),
        "pred_actual_ratio": float(p.mean() / (pos / n)) if n and pos else float("nan"),
        "mean_pred": float(p.mean()) if n else float("nan"),
        "positive_rate": pos / n if n else float("nan"),
        "n": int(n),
        "positives": int(pos),
    }
    if group is not None:
        out["gauc"] = group_auc(y, p, group)
    return out


def evaluate_heads(y: np.ndarray, p: np.ndarray, names: list[str] | tuple[str, ...] = (),
                   group: np.ndarray | None = None) -> dict[str, Any]:
    """:func:`evaluate` of the first head, plus ``heads`` (the metrics of every head by label name) when
    ``p`` is [n, T]; one-head predictions of multi-label data are scored against the first label."""
    y, p = np.asarray(y), np.asarray(p)
    if p.ndim == 1:
        return evaluate(y if y.ndim == 1 else y[:, 0], p, group)
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and predictions {p.shape} differ in shape")
    names = list(names) or [f"head{t}" for t in range(p.shape[1])]
    heads = {name: evaluate(y[:, t], p[:, t], group) for t, name in enumerate(names)}
    return {**heads[names[0]], "heads": heads}
