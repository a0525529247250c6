"""The first-order term of a small log, fitted exactly: an L2-regularised logistic regression by L-BFGS.

On a small log, stochastic steps stopped early leave the per-id weights far from their optimum (early
stopping ends when an MLP starts to memorise, long before the linear part has converged), and no fixed L2
suits every log: the best strength differs a hundredfold between logs of the same size. So the L2 strength is
chosen from the data as scikit-learn's ``LogisticRegressionCV`` does: along a regularisation path (strong to
weak, each point warm-started from the previous one), by the logloss of out-of-fold predictions over K folds of
the training rows, every fold solved in full batch by L-BFGS; the chosen strength is then refitted on all
training rows. The validation rows stay untouched for early stopping and calibration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import sparse

from ctrkit.data.dataset import EncodedData
from ctrkit.evaluate.metrics import evaluate
from ctrkit.nn.embedding import FeatureLinear, FeatureSpec
from ctrkit.training.sampling import prior_logit

L2_PATH = (100.0, 30.0, 10.0, 3.0, 1.0)  # L2 * training rows (scikit-learn's 1 / C), strongest first
FOLDS = 3


@dataclass
class FirstOrderFit:
    """The chosen L2 strength (on the mean loss), the fitted first-order weights (a :class:`FeatureLinear`
    state) and the out-of-fold logloss of each point of the path."""

    l2: float
    state: dict[str, torch.Tensor]
    path: list[dict[str, float]] = field(default_factory=list)


def design_matrix(data: EncodedData, spec: FeatureSpec) -> sparse.csr_matrix:
    """The first-order term as a sparse matrix X, so that :class:`FeatureLinear` is ``X @ w + bias``.

    Columns: one per id (summed over a row's fields; sequence fields pooled by sum or mean), then each numeric
    value (0 when missing), then each numeric field's missing indicator.
    """
    n, n_ids, n_dense = len(data), max(spec.n_ids, 1), spec.n_dense
    rows = [np.repeat(np.arange(n), spec.n_sparse)]
    cols = [np.asarray(data.ids, dtype=np.int64).ravel()]
    vals = [np.ones(n * spec.n_sparse)]
    if spec.n_seq and data.seq is not None and data.seq_len is not None:
        seq, length = np.asarray(data.seq, dtype=np.int64), np.asarray(data.seq_len, dtype=np.int64)
        held = np.arange(seq.shape[2]) < length[..., None]  # [n, Fq, L]
        mean = np.array([p == "mean" for p in spec.seq_pooling])
        scale = np.where(mean, 1.0 / np.maximum(length, 1), 1.0)  # [n, Fq]
        r, q, _ = np.nonzero(held)
        rows.append(r)
        cols.append(seq[held])
        vals.append(scale[r, q])
    if n_dense:
        dense = np.asarray(data.dense, dtype=np.float64)
        missing = np.isnan(dense)
        rows += [np.repeat(np.arange(n), n_dense)] * 2
        cols += [np.tile(n_ids + np.arange(n_dense), n), np.tile(n_ids + n_dense + np.arange(n_dense), n)]
        vals += [np.where(missing, 0.0, dense).ravel(), missing.ravel().astype(np.float64)]
    return sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                             shape=(n, n_ids + 2 * n_dense))


def _objective(params: np.ndarray, x: sparse.csr_matrix, xt: sparse.csr_matrix, y: np.ndarray, v: np.ndarray,
               l2: float, n_ids: int, pos_weight: float) -> tuple[float, np.ndarray]:
    """Weighted mean (class-weighted) BCE + l2 / 2 * ||id weights||^2, and its gradient."""
    w, b = params[:-1], params[-1]
    z = x @ w + b
    nll = pos_weight * y * np.logaddexp(0.0, -z) + (1 - y) * np.logaddexp(0.0, z)
    p = 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid without overflow
    dz = v * (pos_weight * y * (p - 1.0) + (1 - y) * p) / v.sum()
    grad = np.append(xt @ dz, dz.sum())
    grad[:n_ids] += l2 * w[:n_ids]
    return float(v @ nll / v.sum() + 0.5 * l2 * w[:n_ids] @ w[:n_ids]), grad


def _solve(x: sparse.csr_matrix, y: np.ndarray, v: np.ndarray, l2: float, n_ids: int, pos_weight: float,
           start: np.ndarray) -> np.ndarray:
    """The minimiser of :func:`_objective` from ``start`` by L-BFGS, to a change of the loss below 1e-7."""
    xt = x.T.tocsr()
    params = torch.tensor(start, dtype=torch.float64)
    opt = torch.optim.LBFGS([params], lr=1.0, max_iter=1000, history_size=10, tolerance_grad=1e-6,
                            tolerance_change=1e-7, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        f, g = _objective(params.numpy(), x, xt, y, v, l2, n_ids, pos_weight)
        params.grad = torch.from_numpy(g)
        return torch.tensor(f, dtype=torch.float64)

    opt.step(closure)
    return params.numpy().copy()


def fit_first_order(spec: FeatureSpec, train: EncodedData, pos_weight: float = 1.0,
                    path: tuple[float, ...] = L2_PATH, folds: int = FOLDS, seed: int = 0) -> FirstOrderFit:
    """Choose l2 = k / rows (k from ``path``) by out-of-fold logloss over ``folds`` folds of ``train``, and fit
    the first-order weights on all of ``train`` with it. Deterministic for given data and seed.

    ``pos_weight`` counts positives that many times (``--loss weighted``); sample weights are honoured. Ids not
    seen in training keep a weight of 0 (the L2 pulls them there).
    """
    y = np.asarray(train.label, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError("the first-order fit applies to logs with one label")
    v = np.ones_like(y) if train.weight is None else np.asarray(train.weight, dtype=np.float64)
    x = design_matrix(train, spec)
    n, n_ids = len(y), max(spec.n_ids, 1)
    start = np.zeros(x.shape[1] + 1)
    start[-1] = prior_logit(y, v, pos_weight)
    fold = np.random.default_rng(seed).permutation(n) % folds
    record, best = [], len(path) // 2  # too few rows to cut into folds: the middle of the path
    mean_fit = np.tile(start, (len(path), 1))
    if n >= 2 * folds:
        oof = np.zeros((len(path), n))
        mean_fit[:] = 0.0
        for f in range(folds):
            tr, te = fold != f, fold == f
            params = start.copy()
            for i, k in enumerate(path):
                params = _solve(x[tr], y[tr], v[tr], k / tr.sum(), n_ids, pos_weight, params)
                oof[i, te] = x[te] @ params[:-1] + params[-1]
                mean_fit[i] += params / folds
        for i, k in enumerate(path):
            m = evaluate(y, 1.0 / (1.0 + np.exp(-(oof[i] - math.log(pos_weight)))), weight=v)
            record.append({"l2": k / n, "oof_logloss": m["logloss"], "oof_auc": m["auc"]})
        best = int(np.argmin([r["oof_logloss"] for r in record]))
    params = _solve(x, y, v, path[best] / n, n_ids, pos_weight, mean_fit[best])  # from the folds' mean
    nd = spec.n_dense
    w = torch.from_numpy(params[:-1]).float()
    state = {"table.weight": w[:n_ids].unsqueeze(1).clone(), "dense_w": w[n_ids:n_ids + nd].clone(),
             "dense_missing": w[n_ids + nd:].clone(), "bias": torch.tensor([params[-1]], dtype=torch.float32)}
    return FirstOrderFit(path[best] / n, state, record)


def load_first_order(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Copy fitted first-order weights into ``model``'s first-order term; False when it has none."""
    for m in model.modules():
        if isinstance(m, FeatureLinear):
            m.load_state_dict(state)
            return True
    return False
