"""Calibration of served probabilities: Platt scaling, isotonic regression (scikit-learn) and centred isotonic
regression, as plain data.

A :class:`Calibrator` maps a model's raw logit to the served probability: first the exact shift that undoes
negative downsampling and class weights (:mod:`ctrkit.training.sampling`), then an optional fitted map.
It is fitted on held-out (validation) rows, never on the test rows, and saved as JSON: two numbers for
Platt, the knots of a piecewise-linear map for the isotonic maps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctrkit.evaluate.metrics import logloss

METHODS = ("none", "platt", "isotonic", "cir")
KNOTTED = ("isotonic", "cir")  # maps served by interpolating knots x -> y
CHOICES = METHODS + ("auto",)
P_MIN = 1e-6  # served probabilities stay inside [P_MIN, 1 - P_MIN]: an isotonic step at 0 is not a bid


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


@dataclass
class Calibrator:
    """logit -> served probability: sigmoid(logit + shift), then Platt (sigmoid(a z + b) of the shifted logit
    z) or an isotonic map (piecewise-linear through the knots ``x`` -> ``y`` over z, flat outside)."""

    method: str = "none"
    shift: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"calibration method must be one of {METHODS}, got {self.method!r}")

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """Served probabilities for raw model logits."""
        z = np.asarray(logits, dtype=np.float64) + self.shift
        if self.method == "platt":
            p = _sigmoid(self.params["a"] * z + self.params["b"])
        elif self.method in KNOTTED:
            p = np.interp(z, self.params["x"], self.params["y"])
        else:
            p = _sigmoid(z)
        return np.clip(p, P_MIN, 1 - P_MIN) if self.method != "none" else p

    def torch(self, logits: torch.Tensor) -> torch.Tensor:
        """The same map in torch operations only (elementwise, exportable to ONNX): isotonic interpolation is
        written as a sum of clamped ramps between its breakpoints, with steps where two breakpoints coincide."""
        z = logits.double() + self.shift
        if self.method == "platt":
            p = torch.sigmoid(self.params["a"] * z + self.params["b"])
        elif self.method in KNOTTED:
            x = torch.tensor(self.params["x"], dtype=torch.float64, device=z.device)
            y = torch.tensor(self.params["y"], dtype=torch.float64, device=z.device)
            dx, dy = x[1:] - x[:-1], y[1:] - y[:-1]
            ramp = torch.minimum(torch.clamp(z.unsqueeze(-1) - x[:-1], min=0.0), dx)
            flat = dx == 0
            slope = torch.where(flat, torch.zeros_like(dy), dy / torch.where(flat, torch.ones_like(dx), dx))
            step = torch.where(flat, dy, torch.zeros_like(dy)) * (z.unsqueeze(-1) > x[:-1]).double()
            p = y[0] + (ramp * slope + step).sum(-1)
        else:
            p = torch.sigmoid(z)
        return (p.clamp(P_MIN, 1 - P_MIN) if self.method != "none" else p).to(logits.dtype)

    def raw(self, logits: np.ndarray) -> np.ndarray:
        """Probabilities with the exact shift only (what the model says, corrected for sampling)."""
        return _sigmoid(np.asarray(logits, dtype=np.float64) + self.shift)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``calibration.json`` in a bundle)."""
        return {"method": self.method, "shift": self.shift, "params": self.params, "info": self.info}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibrator:
        """Inverse of :meth:`to_dict`; a malformed entry is a ValueError naming it."""
        cal = cls(method=d.get("method", "none"), shift=float(d.get("shift", 0.0)), params=d.get("params") or {},
                  info=d.get("info") or {})
        need = ("a", "b") if cal.method == "platt" else ("x", "y") if cal.method in KNOTTED else ()
        missing = [k for k in need if k not in cal.params]
        if missing:
            raise ValueError(f"{cal.method} calibration lacks {missing}")
        return cal

    def save(self, path: str | Path) -> None:
        """Write as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Calibrator:
        """Read a JSON file written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def _fit(method: str, z: np.ndarray, y: np.ndarray, w: np.ndarray) -> dict[str, Any]:
    if method == "platt":
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression(C=1e6, max_iter=1000)
        lr.fit(z.reshape(-1, 1), y, sample_weight=w)
        return {"a": float(lr.coef_[0, 0]), "b": float(lr.intercept_[0])}
    if method in KNOTTED:
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(z, y, sample_weight=w)
        if method == "isotonic":
            return {"x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()}
        # Centred isotonic regression (Oron & Flournoy, 2017): one knot per block of the pooled fit, at the
        # block's mean logit, joined by straight lines. The step function serves every logit of a block the
        # same probability, a tie that costs AUC; between the knots this map is strictly increasing, so the
        # served order is the model's, with the blocks' rates kept.
        values, block = np.unique(iso.predict(z), return_inverse=True)
        mass = np.bincount(block, weights=w)
        held = mass > 0  # a block of zero-weight rows has no centre
        centres = np.bincount(block, weights=w * z)[held] / mass[held]
        return {"x": centres.tolist(), "y": values[held].tolist()}
    return {}


def fit_calibrator(method: str, logits: np.ndarray, y: np.ndarray, weight: np.ndarray | None = None,
                   shift: float = 0.0, folds: int = 5, seed: int = 0) -> Calibrator:
    """Fit ``method`` on held-out ``logits`` / labels. "auto" picks the method of lowest ``folds``-fold
    cross-validated logloss among none, Platt, isotonic and centred isotonic ("cir"; each scored on rows it was
    not fitted on, so an isotonic map cannot win by memorising few positives), then refits it on all rows."""
    if method not in CHOICES:
        raise ValueError(f"--calibrate must be one of {CHOICES}, got {method!r}")
    z = np.asarray(logits, dtype=np.float64).ravel() + shift
    y = np.asarray(y, dtype=np.float64).ravel()
    w = np.ones_like(y) if weight is None else np.asarray(weight, dtype=np.float64).ravel()
    if method != "none" and (len(y) == 0 or y.min() == y.max()):
        raise ValueError(f"{method} calibration needs held-out rows of both classes; got {len(y)} rows "
                         f"with {int(y.sum())} positives")
    info: dict[str, Any] = {"rows": int(len(y)), "positives": int(y.sum())}
    if method == "auto":
        fold = np.random.default_rng(seed).integers(0, folds, len(y))
        scores = {}
        for m in METHODS:
            p = np.empty_like(y)
            for k in range(folds):
                fit_rows, held = fold != k, fold == k
                if y[fit_rows].min() == y[fit_rows].max():
                    p[held] = _sigmoid(z[held])
                    continue
                cal = Calibrator(m, 0.0, _fit(m, z[fit_rows], y[fit_rows], w[fit_rows]))
                p[held] = cal(z[held])
            scores[m] = logloss(y, p, w)
        method = min(METHODS, key=lambda m: (scores[m], METHODS.index(m)))
        info["cv_logloss"] = scores
    return Calibrator(method, shift, _fit(method, z, y, w), info)
