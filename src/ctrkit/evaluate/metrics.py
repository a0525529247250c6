"""Evaluation metrics for predicted click probabilities: AUC, logloss, group AUC and calibration.

Every metric takes optional sample weights (``weight``, one non-negative number per row, e.g. 1/propensity):
a row of weight w counts as w rows. Without weights each row counts once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

EPS = 1e-7


def _check(y: np.ndarray, p: np.ndarray,
           weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels and predictions differ in length: {len(y)} vs {len(p)}")
    if len(y) and not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if len(p) and (np.isnan(p).any() or p.min() < 0 or p.max() > 1):
        raise ValueError("predictions must be probabilities in [0, 1] without NaN")
    if weight is None:
        return y, p, np.ones_like(y)
    w = np.asarray(weight, dtype=np.float64).ravel()
    if w.shape != y.shape:
        raise ValueError(f"weights and labels differ in length: {len(w)} vs {len(y)}")
    if len(w) and not (np.isfinite(w).all() and w.min() >= 0):
        raise ValueError("weights must be finite and >= 0")
    return y, p, w


def _grouped_auc(y: np.ndarray, p: np.ndarray, w: np.ndarray,
                 g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AUC, total weight) of every group with both classes: one sort, no loop over groups.

    Within a group, each run of equal predictions adds its positive weight times the negative weight ranked
    below it plus half the negative weight tied with it (the weighted Mann-Whitney U).
    """
    order = np.lexsort((p, g))
    gs, ys, ps, ws = g[order], y[order], p[order], w[order]
    new_group = np.r_[True, gs[1:] != gs[:-1]]
    boundary = new_group | np.r_[True, ps[1:] != ps[:-1]]
    run_start = np.flatnonzero(boundary)
    run_id = np.cumsum(boundary) - 1
    group_of_run = np.cumsum(new_group)[run_start] - 1
    pos_run = np.bincount(run_id, weights=ws * ys)
    neg_run = np.bincount(run_id, weights=ws * (1 - ys))
    neg_before = np.cumsum(neg_run) - neg_run  # negative weight in all earlier runs
    first_run = np.flatnonzero(np.r_[True, group_of_run[1:] != group_of_run[:-1]])
    neg_before -= np.repeat(neg_before[first_run], np.diff(np.r_[first_run, len(run_start)]))
    n_groups = int(group_of_run[-1]) + 1
    u = np.bincount(group_of_run, weights=pos_run * (neg_before + 0.5 * neg_run), minlength=n_groups)
    w_pos = np.bincount(group_of_run, weights=pos_run, minlength=n_groups)
    w_neg = np.bincount(group_of_run, weights=neg_run, minlength=n_groups)
    both = (w_pos > 0) & (w_neg > 0)
    return u[both] / (w_pos[both] * w_neg[both]), (w_pos + w_neg)[both]


def auc(y: np.ndarray, p: np.ndarray, weight: np.ndarray | None = None) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count one half); NaN with one class only."""
    y, p, w = _check(y, p, weight)
    if len(y) == 0:
        return float("nan")
    aucs, _ = _grouped_auc(y, p, w, np.zeros(len(y), dtype=np.int64))
    return float(aucs[0]) if len(aucs) else float("nan")


def logloss(y: np.ndarray, p: np.ndarray, weight: np.ndarray | None = None) -> float:
    """Mean binary cross-entropy, with probabilities clipped to [1e-7, 1 - 1e-7]."""
    y, p, w = _check(y, p, weight)
    if len(y) == 0 or w.sum() == 0:
        return float("nan")
    q = np.clip(p, EPS, 1 - EPS)
    return float(-np.sum(w * (y * np.log(q) + (1 - y) * np.log(1 - q))) / w.sum())


def calibration_bins(y: np.ndarray, p: np.ndarray, n_bins: int = 20, strategy: str = "quantile",
                     weight: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-bin (weighted) count, mean prediction and observed rate; bins of equal mass ("quantile") or width
    ("uniform").

    Equal-mass bins are the default because click probabilities crowd near zero, where equal-width bins
    would put nearly every impression into the first bin.
    """
    y, p, w = _check(y, p, weight)
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
    count = np.bincount(idx, weights=w, minlength=k)
    sum_p = np.bincount(idx, weights=w * p, minlength=k)
    sum_y = np.bincount(idx, weights=w * y, minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"count": count, "mean_pred": sum_p / count, "rate": sum_y / count, "edges": edges}


def ece(y: np.ndarray, p: np.ndarray, n_bins: int = 20, strategy: str = "quantile",
        weight: np.ndarray | None = None) -> float:
    """Expected calibration error: impression-weighted mean |observed rate - mean prediction| over bins."""
    b = calibration_bins(y, p, n_bins, strategy, weight)
    ok = b["count"] > 0
    if not ok.any():
        return float("nan")
    gap = np.abs(b["rate"][ok] - b["mean_pred"][ok])
    return float(np.sum(b["count"][ok] * gap) / b["count"][ok].sum())


def group_auc(y: np.ndarray, p: np.ndarray, group: np.ndarray, weight: np.ndarray | None = None) -> float:
    """Impression-weighted mean of per-group AUC over groups (users) that have both classes."""
    y, p, w = _check(y, p, weight)
    g = np.asarray(group).ravel()
    if len(g) != len(y):
        raise ValueError("group must have one value per row")
    if len(y) == 0:
        return float("nan")
    aucs, size = _grouped_auc(y, p, w, g)
    if not len(aucs) or size.sum() == 0:
        return float("nan")
    return float(np.sum(aucs * size) / size.sum())


def evaluate(y: np.ndarray, p: np.ndarray, group: np.ndarray | None = None,
             weight: np.ndarray | None = None) -> dict[str, Any]:
    """The standard report: auc, logloss, ece, pred_actual_ratio, n, positives (+ gauc with groups).

    With weights, every figure but ``n`` and ``positives`` (row counts) is weighted.
    """
    y, p, w = _check(y, p, weight)
    n, pos = len(y), float(y.sum())
    wsum, wpos = float(w.sum()), float(np.dot(w, y))
    mean_pred = float(np.dot(w, p) / wsum) if wsum else float("nan")
    out: dict[str, Any] = {
        "auc": auc(y, p, w),
        "logloss": logloss(y, p, w),
        "ece": ece(y, p, weight=w),
        "pred_actual_ratio": mean_pred / (wpos / wsum) if wsum and wpos else float("nan"),
        "mean_pred": mean_pred,
        "positive_rate": wpos / wsum if wsum else float("nan"),
        "n": int(n),
        "positives": int(pos),
    }
    if group is not None:
        out["gauc"] = group_auc(y, p, group, w)
    return out


def evaluate_heads(y: np.ndarray, p: np.ndarray, names: list[str] | tuple[str, ...] = (),
                   group: np.ndarray | None = None, weight: np.ndarray | None = None) -> dict[str, Any]:
    """:func:`evaluate` of the first head, plus ``heads`` (the metrics of every head by label name) when
    ``p`` is [n, T]; one-head predictions of multi-label data are scored against the first label."""
    y, p = np.asarray(y), np.asarray(p)
    if p.ndim == 1:
        return evaluate(y if y.ndim == 1 else y[:, 0], p, group, weight)
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and predictions {p.shape} differ in shape")
    names = list(names) or [f"head{t}" for t in range(p.shape[1])]
    heads = {name: evaluate(y[:, t], p[:, t], group, weight) for t, name in enumerate(names)}
    return {**heads[names[0]], "heads": heads}


def cold_start(y: np.ndarray, p: np.ndarray, unseen: Iterable[tuple[str, np.ndarray]],
               weight: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """For each field with cold-start rows (``unseen``: (field, row mask) pairs, e.g. ``Encoder.unseen``), the
    share of rows whose value training never kept, and AUC, logloss, pred/actual and clicks of those rows and of
    the others, most frequently cold field first. What a model does for new users or items, next to the rest."""
    y, p, w = _check(y, p, weight)

    def part(m: np.ndarray) -> dict[str, Any]:
        clicks = float(np.dot(w[m], y[m]))
        return {"rows": int(m.sum()), "clicks": int(y[m].sum()), "auc": auc(y[m], p[m], w[m]),
                "logloss": logloss(y[m], p[m], w[m]),
                "pred_actual_ratio": float(np.dot(w[m], p[m]) / clicks) if clicks else float("nan")}

    out = {name: {"share": float(m.mean()), "unseen": part(m), "seen": part(~m)}
           for name, m in unseen if len(m) and m.any()}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["share"]))
