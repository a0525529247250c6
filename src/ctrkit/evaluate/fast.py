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


def _auc_terms(ys: torch.Tensor, ps: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """Weighted Mann-Whitney numerator (ties count one half) over rows sorted by prediction, as a device scalar:
    each positive row's weight times the negative weight below its run of equal predictions plus half that in
    it. Each row's run is found by binary search in the sorted predictions (a running max / min over a million
    rows took milliseconds on a GPU), so nothing waits for the host."""
    cneg = torch.cumsum(ws * (1 - ys), 0)
    start = torch.searchsorted(ps, ps)  # first row of each row's run of equal predictions
    end = torch.searchsorted(ps, ps, right=True) - 1  # its last row
    below = torch.where(start > 0, cneg[(start - 1).clamp(min=0)], 0.0)
    return torch.sum(ws * ys * (below + 0.5 * (cneg[end] - below)))


def _numpy_quantiles(s: torch.Tensor, n_bins: int) -> torch.Tensor:
    """``np.quantile(p, np.linspace(0, 1, n_bins + 1))`` of the sorted predictions ``s`` on the device, with NumPy's
    operations in NumPy's order (NumPy's linspace, its virtual index (n - 1) q and its two-sided lerp, each a
    separate rounding): torch.quantile rounds differently, and an edge one ulp off a tied prediction moves it to
    another bin."""
    n = len(s)
    q = torch.from_numpy(np.linspace(0, 1, n_bins + 1)).to(s)
    vi = (n - 1) * q
    above = vi >= n - 1  # q = 1: the last value (vi is never below 0)
    lo = torch.where(above, torch.full_like(vi, n - 1), torch.floor(vi))
    hi = torch.where(above, lo, lo + 1)
    a, b = s[lo.long()], s[hi.long()]
    t = vi - lo
    diff = b - a
    return torch.where(t >= 0.5, b - diff * (1 - t), a + diff * t)


def _ece_terms(ys: torch.Tensor, ps: torch.Tensor, ws: torch.Tensor,
               n_bins: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted sum of |actual - predicted| over equal-mass bins, weight in non-empty bins), the bins' edges
    those of :func:`ctrkit.evaluate.metrics.ece`, from the rows sorted by prediction: a bin is a run of sorted
    rows, so its sums are differences of running sums at its bounds (no scatter into a few bins)."""
    edges = torch.unique(_numpy_quantiles(ps, n_bins))
    k = max(len(edges) - 1, 1)
    # row r is in bin b >= 1 when ps[r] >= edges[b] (the last bin also takes the rows at or above the top edge)
    bounds = torch.cat([torch.zeros(1, dtype=torch.long, device=ps.device), torch.searchsorted(ps, edges[1:k]),
                        torch.full((1,), len(ps), dtype=torch.long, device=ps.device)])
    sums = torch.cumsum(torch.stack([ws, ws * ps, ws * ys]), dim=1)
    sums = torch.cat([torch.zeros(3, 1, dtype=sums.dtype, device=sums.device), sums], dim=1)[:, bounds]
    count, sum_p, sum_y = sums[:, 1:] - sums[:, :-1]
    ok = count > 0
    safe = torch.where(ok, count, 1.0)
    gap = torch.where(ok, torch.abs(sum_y / safe - sum_p / safe), 0.0)
    return torch.sum(count * gap), torch.sum(torch.where(ok, count, 0.0))


def evaluate(y: torch.Tensor, p: torch.Tensor, weight: torch.Tensor | None = None) -> dict[str, Any]:
    """auc, logloss, ece, pred_actual_ratio, mean_pred, positive_rate, n, positives of one head, as
    :func:`ctrkit.evaluate.metrics.evaluate` gives them (float64 throughout), from one sort of the predictions
    and one transfer of the sums to the host."""
    y, p = y.reshape(-1).double(), p.reshape(-1).double()
    if len(y) != len(p):
        raise ValueError(f"labels and predictions differ in length: {len(y)} vs {len(p)}")
    n = len(y)
    nan = float("nan")
    if n == 0:
        return {"auc": nan, "logloss": nan, "ece": nan, "pred_actual_ratio": nan, "mean_pred": nan,
                "positive_rate": nan, "n": 0, "positives": 0}
    w = torch.ones_like(y) if weight is None else weight.reshape(-1).double()
    ps, order = torch.sort(p)
    ys, ws = y[order], w[order]
    c = torch.clamp(p, EPS, 1 - EPS)
    ece_sum, ece_weight = _ece_terms(ys, ps, ws)
    bad = torch.isnan(ps[-1]) | (ps[0] < 0) | (ps[-1] > 1)  # NaN sorts last
    wsum, wpos, wp, loss, u, positives, w_neg, ece_sum, ece_weight, bad = torch.stack([
        w.sum(), torch.dot(w, y), torch.dot(w, p), -torch.sum(w * (y * torch.log(c) + (1 - y) * torch.log1p(-c))),
        _auc_terms(ys, ps, ws), y.sum(), torch.dot(w, 1 - y), ece_sum, ece_weight, bad.double()]).tolist()
    if bad:
        raise ValueError("predictions must be probabilities in [0, 1] without NaN")
    return {"auc": u / (wpos * w_neg) if wpos > 0 and w_neg > 0 else nan,
            "logloss": loss / wsum if wsum else nan,
            "ece": ece_sum / ece_weight if ece_weight > 0 else nan,
            "pred_actual_ratio": (wp / wsum) / (wpos / wsum) if wsum and wpos else nan,
            "mean_pred": wp / wsum if wsum else nan, "positive_rate": wpos / wsum if wsum else nan,
            "n": int(n), "positives": int(positives)}


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
