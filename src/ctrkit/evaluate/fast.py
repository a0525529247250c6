"""The validation figures of :func:`ctrkit.evaluate.metrics.evaluate`, computed with torch where the predictions are.

Early stopping scores the validation rows after every epoch. On a GPU that data, its labels and the model's
predictions already live on the device, and the NumPy metrics would copy them to the host and sort a million
rows there, which takes longer than a training epoch of a fast model. These functions give the same figures
(AUC with ties counting one half, clipped logloss, quantile-bin ECE, pred/actual; tests hold them to the NumPy
ones) from tensors on any device, with one sort and a handful of reductions. Reports use the NumPy metrics.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ctrkit.evaluate.metrics import EPS


def _segment_ends(sorted_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and end (exclusive) of each run of equal values in a sorted vector."""
    n = len(sorted_p)
    change = torch.ones(n + 1, dtype=torch.bool, device=sorted_p.device)
    change[1:n] = sorted_p[1:] != sorted_p[:-1]
    edges = torch.nonzero(change).squeeze(1)
    return edges[:-1], edges[1:]


def _before(cum: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """cum[at - 1], and 0 where ``at`` is 0: the sum of everything before position ``at``."""
    padded = torch.cat([cum.new_zeros(1), cum])
    return padded[at]


def auc(y: torch.Tensor, p: torch.Tensor, w: torch.Tensor) -> float:
    """Weighted Mann-Whitney AUC (ties count one half); NaN with one class only."""
    ps, order = torch.sort(p)
    ys, ws = y[order], w[order]
    cpos, cneg = torch.cumsum(ws * ys, 0), torch.cumsum(ws * (1 - ys), 0)
    start, end = _segment_ends(ps)
    pos_run = _before(cpos, end) - _before(cpos, start)
    neg_before = _before(cneg, start)
    neg_run = _before(cneg, end) - neg_before
    w_pos, w_neg = cpos[-1], cneg[-1]
    if float(w_pos) <= 0 or float(w_neg) <= 0:
        return float("nan")
    return float(torch.sum(pos_run * (neg_before + 0.5 * neg_run)) / (w_pos * w_neg))


def _numpy_quantiles(p: torch.Tensor, n_bins: int) -> torch.Tensor:
    """``np.quantile(p, np.linspace(0, 1, n_bins + 1))`` on the device, with NumPy's operations in NumPy's order
    (NumPy's linspace, its virtual index (n - 1) q and its two-sided lerp, each a separate rounding):
    torch.quantile rounds differently, and an edge one ulp off a tied prediction moves it to another bin."""
    s = torch.sort(p).values
    n = len(s)
    q = torch.from_numpy(np.linspace(0, 1, n_bins + 1)).to(p)
    vi = (n - 1) * q
    above = vi >= n - 1  # q = 1: the last value (vi is never below 0)
    lo = torch.where(above, torch.full_like(vi, n - 1), torch.floor(vi))
    hi = torch.where(above, lo, lo + 1)
    a, b = s[lo.long()], s[hi.long()]
    t = vi - lo
    diff = b - a
    return torch.where(t >= 0.5, b - diff * (1 - t), a + diff * t)


def ece(y: torch.Tensor, p: torch.Tensor, w: torch.Tensor, n_bins: int = 20) -> float:
    """Expected calibration error over equal-mass bins (the edges of :func:`ctrkit.evaluate.metrics.ece`)."""
    edges = torch.unique(_numpy_quantiles(p, n_bins))
    k = max(len(edges) - 1, 1)
    idx = torch.clamp(torch.searchsorted(edges, p, right=True) - 1, 0, max(len(edges) - 2, 0))
    count = torch.zeros(k, dtype=p.dtype, device=p.device).index_add_(0, idx, w)
    sum_p = torch.zeros_like(count).index_add_(0, idx, w * p)
    sum_y = torch.zeros_like(count).index_add_(0, idx, w * y)
    ok = count > 0
    if not bool(ok.any()):
        return float("nan")
    gap = torch.abs(sum_y[ok] / count[ok] - sum_p[ok] / count[ok])
    return float(torch.sum(count[ok] * gap) / count[ok].sum())


def evaluate(y: torch.Tensor, p: torch.Tensor, weight: torch.Tensor | None = None) -> dict[str, Any]:
    """auc, logloss, ece, pred_actual_ratio, mean_pred, positive_rate, n, positives of one head, as
    :func:`ctrkit.evaluate.metrics.evaluate` gives them (float64 throughout)."""
    y, p = y.reshape(-1).double(), p.reshape(-1).double()
    if len(y) != len(p):
        raise ValueError(f"labels and predictions differ in length: {len(y)} vs {len(p)}")
    if len(y) and bool(torch.isnan(p).any() | (p < 0).any() | (p > 1).any()):
        raise ValueError("predictions must be probabilities in [0, 1] without NaN")
    w = torch.ones_like(y) if weight is None else weight.reshape(-1).double()
    n = len(y)
    wsum, wpos = float(w.sum()), float(torch.dot(w, y))
    mean_pred = float(torch.dot(w, p)) / wsum if wsum else float("nan")
    c = torch.clamp(p, EPS, 1 - EPS)
    logloss = float(-torch.sum(w * (y * torch.log(c) + (1 - y) * torch.log1p(-c)))) / wsum if wsum else float("nan")
    return {"auc": auc(y, p, w) if n else float("nan"), "logloss": logloss,
            "ece": ece(y, p, w) if n else float("nan"),
            "pred_actual_ratio": mean_pred / (wpos / wsum) if wsum and wpos else float("nan"),
            "mean_pred": mean_pred, "positive_rate": wpos / wsum if wsum else float("nan"),
            "n": int(n), "positives": int(float(y.sum()))}


def evaluate_heads(y: torch.Tensor, p: torch.Tensor, names: list[str] | tuple[str, ...] = (),
                   weight: torch.Tensor | None = None) -> dict[str, Any]:
    """:func:`evaluate` of the first head, plus ``heads`` by label name when ``p`` is [n, T] (as
    :func:`ctrkit.evaluate.metrics.evaluate_heads`)."""
    if p.dim() == 1:
        return evaluate(y if y.dim() == 1 else y[:, 0], p, weight)
    if y.shape != p.shape:
        raise ValueError(f"labels {tuple(y.shape)} and predictions {tuple(p.shape)} differ in shape")
    names = list(names) or [f"head{t}" for t in range(p.shape[1])]
    heads = {name: evaluate(y[:, t], p[:, t], weight) for t, name in enumerate(names)}
    return {**heads[names[0]], "heads": heads}
