"""Calibration and drift monitoring: rolling pred/actual overall and per segment, PSI of pCTR against training.

pred/actual is the sum of predicted click probabilities over the clicks that happened (1.0 is perfect
calibration); a ratio outside the band [0.8, 1.2] is an alert once the window holds ``min_clicks`` clicks, so
that a handful of clicks cannot raise one. PSI compares the distribution of live pCTR with the distribution of
the bundle's validation pCTR over the reference's decile bins: sum (a - e) ln(a / e); the usual reading is
< 0.1 stable, 0.1-0.25 a moderate shift, > 0.25 a major one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

BAND = (0.8, 1.2)
PSI_FLOOR = 1e-4


def reference_distribution(p: np.ndarray, bins: int = 10) -> dict[str, list[float]]:
    """Quantile bin edges of ``p`` (inner edges only) and the share of ``p`` in each bin."""
    p = np.asarray(p, dtype=np.float64)
    if len(p) == 0:
        raise ValueError("a reference distribution needs at least one prediction")
    edges = np.unique(np.quantile(p, np.linspace(0, 1, bins + 1)[1:-1]))
    shares = np.bincount(np.searchsorted(edges, p, side="right"), minlength=len(edges) + 1) / len(p)
    return {"edges": edges.tolist(), "shares": shares.tolist()}


def psi(reference: Mapping[str, Sequence[float]], p: np.ndarray) -> float:
    """Population stability index of ``p`` against ``reference`` (NaN when ``p`` is empty)."""
    p = np.asarray(p, dtype=np.float64)
    if len(p) == 0:
        return float("nan")
    edges = np.asarray(reference["edges"], dtype=np.float64)
    expected = np.maximum(np.asarray(reference["shares"], dtype=np.float64), PSI_FLOOR)
    actual = np.bincount(np.searchsorted(edges, p, side="right"), minlength=len(edges) + 1) / len(p)
    actual = np.maximum(actual, PSI_FLOOR)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def ratio_row(pred: float, clicks: float, impressions: int, min_clicks: int,
              band: tuple[float, float] = BAND) -> dict[str, Any]:
    """One line of a calibration table: sums, the ratio and whether it is an alert."""
    ratio = pred / clicks if clicks else float("nan")
    alert = bool(clicks >= min_clicks and not band[0] <= ratio <= band[1])
    return {"impressions": int(impressions), "clicks": int(clicks), "pred": float(pred), "ratio": float(ratio),
            "alert": alert}


@dataclass
class _Imp:
    pctr: float
    segment: tuple[str, ...]
    clicked: bool = False


class LiveMonitor:
    """The last ``window`` impressions served, their pCTR and whether they were clicked; thread-safe."""

    def __init__(self, window: int = 100_000, segments: Sequence[str] = (),
                 reference: Mapping[str, Sequence[float]] | None = None, min_clicks: int = 30,
                 band: tuple[float, float] = BAND) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window, self.segments, self.reference = window, tuple(segments), reference
        self.min_clicks, self.band = min_clicks, band
        self._imps: OrderedDict[str, _Imp] = OrderedDict()
        self._lock = threading.Lock()

    def impression(self, impression_id: str, pctr: float, record: Mapping[str, Any]) -> None:
        """Remember a served impression (the oldest falls out of the window)."""
        seg = tuple(str(record.get(s)) for s in self.segments)
        with self._lock:
            self._imps[impression_id] = _Imp(float(pctr), seg)
            while len(self._imps) > self.window:
                self._imps.popitem(last=False)

    def click(self, impression_id: str) -> bool:
        """Mark an impression clicked; False when it is not in the window."""
        with self._lock:
            imp = self._imps.get(impression_id)
            if imp is None:
                return False
            imp.clicked = True
            return True

    def snapshot(self) -> dict[str, Any]:
        """pred/actual overall and per segment value, PSI against the reference, alerts."""
        with self._lock:
            imps = list(self._imps.values())
        p = np.fromiter((i.pctr for i in imps), np.float64, len(imps))
        c = np.fromiter((i.clicked for i in imps), np.float64, len(imps))
        out: dict[str, Any] = {"overall": ratio_row(p.sum(), c.sum(), len(imps), self.min_clicks, self.band),
                               "segments": {}}
        for j, name in enumerate(self.segments):
            groups: dict[str, list[int]] = {}
            for k, i in enumerate(imps):
                groups.setdefault(i.segment[j], []).append(k)
            out["segments"][name] = {v: ratio_row(p[ix].sum(), c[ix].sum(), len(ix), self.min_clicks, self.band)
                                     for v, ix in sorted(groups.items())}
        out["psi"] = psi(self.reference, p) if self.reference and len(p) else None
        out["alerts"] = alerts(out)
        return out


def alerts(snapshot: Mapping[str, Any]) -> list[str]:
    """Human-readable alert lines of a snapshot."""
    lines = []
    o = snapshot["overall"]
    if o["alert"]:
        lines.append(f"overall pred/actual {o['ratio']:.3f} is outside [{BAND[0]}, {BAND[1]}] "
                     f"({o['clicks']} clicks)")
    for name, rows in snapshot.get("segments", {}).items():
        for value, r in rows.items():
            if r["alert"]:
                lines.append(f"{name}={value}: pred/actual {r['ratio']:.3f} is outside [{BAND[0]}, {BAND[1]}] "
                             f"({r['clicks']} clicks)")
    value = snapshot.get("psi")
    if value is not None and value > 0.25:
        lines.append(f"PSI {value:.3f} of live pCTR against training: a major shift (> 0.25)")
    return lines
