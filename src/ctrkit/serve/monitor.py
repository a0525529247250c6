"""Calibration and drift monitoring: rolling pred/actual overall and per segment, PSI of pCTR against training,
and PSI of every input column against the training rows (what moved when pCTR moves).

pred/actual is the sum of predicted click probabilities over the clicks that happened (1.0 is perfect
calibration); a ratio outside the band [0.8, 1.2] is an alert once the window holds ``min_clicks`` clicks, so
that a handful of clicks cannot raise one. PSI compares the distribution of live pCTR with the distribution of
the bundle's validation pCTR over the reference's decile bins: sum (a - e) ln(a / e); the usual reading is
< 0.1 stable, 0.1-0.25 a moderate shift, > 0.25 a major one. An input column is compared the same way: a
categorical field over its most frequent training ids, its OOV id (values training never kept) and the rest; a
numeric or stat column over its training deciles and a bin for missing values.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ctrkit.data.readers import DataError

BAND = (0.8, 1.2)
PSI_FLOOR = 1e-4
MAJOR = 0.25  # the usual reading of a PSI above this: a major shift


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
    return _psi(reference["shares"], np.bincount(np.searchsorted(edges, p, side="right"), minlength=len(edges) + 1)
                / len(p))


def _psi(expected: Sequence[float], actual: np.ndarray) -> float:
    """sum (a - e) ln(a / e) over bins, shares floored at :data:`PSI_FLOOR`."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), PSI_FLOOR)
    a = np.maximum(actual, PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def _column_shares(ref: Mapping[str, Any], column: np.ndarray) -> np.ndarray:
    """Shares of ``column``'s rows in the bins of a :func:`feature_reference` entry: per id then "other" (a sparse
    field), or per quantile bin then "missing" (a dense column)."""
    if "ids" in ref:
        ids = np.asarray(ref["ids"], dtype=np.int64)
        order = np.argsort(ids)
        pos = np.searchsorted(ids[order], column)
        hit = (pos < len(ids)) & (ids[order][np.minimum(pos, len(ids) - 1)] == column) if len(ids) else \
            np.zeros(len(column), bool)
        slot = np.where(hit, order[np.minimum(pos, max(len(ids) - 1, 0))], len(ids))
        return np.bincount(slot, minlength=len(ids) + 1) / max(len(column), 1)
    x = np.asarray(column, dtype=np.float64)
    edges = np.asarray(ref["edges"], dtype=np.float64)
    slot = np.where(np.isnan(x), len(edges) + 1, np.searchsorted(edges, x, side="right"))
    return np.bincount(slot, minlength=len(edges) + 2) / max(len(x), 1)


def feature_reference(encoder: Any, ids: np.ndarray, dense: np.ndarray, top: int = 10,
                      bins: int = 10) -> dict[str, dict[str, list[Any]]]:
    """What live input columns are compared with, from encoded training rows: per sparse field the ids of its
    ``top`` most frequent values and its OOV id (for a field with a vocabulary), each with its share, then the rest;
    per dense column (numeric fields, stats) its inner decile edges, each bin's share, then the missing share."""
    out: dict[str, dict[str, list[Any]]] = {}
    oov = encoder.oov_ids()
    for j, name in enumerate(encoder.sparse_names):
        col = np.asarray(ids[:, j], dtype=np.int64)
        values, counts = np.unique(col, return_counts=True)
        chosen = [int(v) for v in values[np.argsort(-counts, kind="stable")[:top]]]
        if name in oov and oov[name] not in chosen:
            chosen.append(oov[name])
        ref: dict[str, list[Any]] = {"ids": chosen}
        out[name] = {**ref, "shares": _column_shares(ref, col).tolist()}
    for j, name in enumerate(encoder.dense_names):
        x = np.asarray(dense[:, j], dtype=np.float64)
        seen = x[~np.isnan(x)]
        edges = np.unique(np.quantile(seen, np.linspace(0, 1, bins + 1)[1:-1])).tolist() if len(seen) else []
        out[name] = {"edges": edges, "shares": _column_shares({"edges": edges}, x).tolist()}
    return out


def feature_psi(reference: Mapping[str, Mapping[str, Any]], names: Sequence[str], columns: np.ndarray
                ) -> dict[str, float]:
    """PSI of each column of ``columns`` (named ``names``, as a :func:`feature_reference` was made) against it;
    NaN without rows."""
    return {n: _psi(reference[n]["shares"], _column_shares(reference[n], columns[:, j])) if len(columns)
            else float("nan") for j, n in enumerate(names) if n in reference}


def ratio_row(pred: float, clicks: float, impressions: int, min_clicks: int,
              band: tuple[float, float] = BAND) -> dict[str, Any]:
    """One line of a calibration table: sums, the ratio and whether it is an alert (never without a click, whose
    ratio is undefined, whatever ``min_clicks`` says)."""
    ratio = pred / clicks if clicks else float("nan")
    alert = bool(clicks and clicks >= min_clicks and not band[0] <= ratio <= band[1])
    return {"impressions": int(impressions), "clicks": int(clicks), "pred": float(pred), "ratio": float(ratio),
            "alert": alert}


@dataclass
class _Imp:
    pctr: float
    segment: tuple[str, ...]
    clicked: bool = False


INPUT_ROWS = 20_000  # scored rows the live input PSI reads: ten bins a column need thousands, not a window's 100k


class LiveMonitor:
    """The last ``window`` impressions served (pCTR, clicked or not), the last ``window`` pCTRs scored and, with a
    ``features`` reference (:func:`feature_reference`, columns ``names``), the encoded input columns of the last
    :data:`INPUT_ROWS` scored rows; thread-safe."""

    def __init__(self, window: int = 100_000, segments: Sequence[str] = (),
                 reference: Mapping[str, Sequence[float]] | None = None, min_clicks: int = 30,
                 band: tuple[float, float] = BAND, features: Mapping[str, Mapping[str, Any]] | None = None,
                 names: Sequence[str] = ()) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window, self.segments, self.reference = window, tuple(segments), reference
        self.min_clicks, self.band = min_clicks, band
        self._imps: OrderedDict[str, _Imp] = OrderedDict()
        self._scored = np.zeros(window)
        self._n_scored = 0
        self._lock = threading.Lock()
        self.watch_inputs(features, names)

    def watch_inputs(self, features: Mapping[str, Mapping[str, Any]] | None, names: Sequence[str]) -> None:
        """Compare the scored rows' input columns ``names`` (sparse fields then dense columns, as encoded) with
        ``features``, or stop where it is None (a bundle without one): the rows kept so far are let go."""
        with self._lock:
            self.features, self.names = (features or None), tuple(names)
            self._inputs = np.zeros((0, len(self.names))) if self.features else None
            self._n_inputs = 0

    @property
    def watches_inputs(self) -> bool:
        """Whether :meth:`inputs` keeps anything (the caller may then skip encoding rows only for it)."""
        return self.features is not None

    def inputs(self, ids: np.ndarray, dense: np.ndarray) -> None:
        """Remember the encoded input columns of scored rows (ids [n, sparse], dense [n, dense columns])."""
        if self.features is None or len(ids) == 0:
            return
        cols = np.concatenate([np.asarray(ids, dtype=np.float64), np.asarray(dense, dtype=np.float64)], axis=1)
        with self._lock:
            buf = self._inputs
            if buf is None or buf.shape[1] != cols.shape[1]:
                return  # rows of another bundle than the one watched (a swap in flight)
            if len(buf) < INPUT_ROWS:
                buf = self._inputs = np.zeros((INPUT_ROWS, cols.shape[1]))
            end = self._n_inputs + len(cols)
            keep = min(len(cols), INPUT_ROWS)
            buf[np.arange(end - keep, end) % INPUT_ROWS] = cols[len(cols) - keep:]
            self._n_inputs = end

    def scored(self, pctr: np.ndarray) -> None:
        """Remember the pCTR of every scored record (shown or not): PSI compares these with training, since
        the shown items are a selection and would differ from the training distribution by design."""
        p = np.asarray(pctr, dtype=np.float64)
        with self._lock:
            end = self._n_scored + len(p)
            keep = min(len(p), self.window)  # value number j lives in slot j % window
            self._scored[np.arange(end - keep, end) % self.window] = p[len(p) - keep:]
            self._n_scored = end

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
            scored = self._scored[:min(self._n_scored, self.window)].copy()
            columns = None if self._inputs is None else self._inputs[:min(self._n_inputs, INPUT_ROWS)].copy()
            features, names = self.features, self.names
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
        out["scored"] = len(scored)
        out["psi"] = psi(self.reference, scored) if self.reference and len(scored) else None
        out["inputs"] = (feature_psi(features, names, columns) if features is not None and columns is not None
                         and len(columns) else {})
        out["input_rows"] = 0 if columns is None else len(columns)
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
    if value is not None and value > MAJOR:
        lines.append(f"PSI {value:.3f} of live pCTR against training: a major shift (> {MAJOR})")
    for name, v in sorted(snapshot.get("inputs", {}).items(), key=lambda kv: -kv[1]):
        if v > MAJOR:
            lines.append(f"input {name}: PSI {v:.3f} against training (major shift)")
    return lines


def monitor_log(log: str | Path, bundle: Any, segments: Sequence[str] = (), windows: int = 10,
                min_clicks: int = 30) -> dict[str, Any]:
    """pred/actual and PSI per time window of an event log, overall and per segment value.

    Impressions and their clicks come from :func:`ctrkit.serve.events.attributed_impressions` (the attribution
    of ``ctrkit.measure``); the pCTR is the one logged when the item was served, or the bundle's score where
    the log has none. The reference distribution for PSI is the bundle's validation pCTR; where the bundle holds
    its training rows' :func:`feature_reference`, every input column's PSI is reported too (``features``, a
    column past 0.25 overall or in a window is an alert). A multi-task bundle
    (labels such as [click, conversion]) is also checked per head where the log has the label: the first head
    against clicks, the second against the conversions attributed to each impression (``heads``).
    """
    from ctrkit.serve.events import attributed_impressions

    if windows < 1:
        raise ValueError(f"--windows must be >= 1, got {windows}")
    if min_clicks < 0:
        raise ValueError(f"--min-clicks must be >= 0, got {min_clicks}")
    names = bundle.schema.label_columns
    data = attributed_impressions(log, label=names[0], conversion=names[1] if len(names) > 1 else None)
    data = data.sort("timestamp")
    missing = [s for s in segments if s not in data.columns]
    if missing:
        raise DataError(f"{log}: no column {missing[0]!r} to segment by; columns are {data.columns}")
    scores = bundle.predict(data) if len(names) > 1 or "pctr" not in data.columns or data["pctr"].null_count() \
        else None
    heads = {n: (scores if scores.ndim == 1 else scores[:, j]) if scores is not None else data["pctr"].to_numpy()
             for j, n in enumerate(names) if n in data.columns}
    if "pctr" in data.columns and not data["pctr"].null_count():
        heads[names[0]] = data["pctr"].to_numpy()  # what was served
    reference = bundle.metrics.get("pctr_reference")
    t = data["timestamp"].dt.epoch("us").to_numpy() / 1e6
    edges = np.linspace(t.min(), t.max(), windows + 1) if len(t) else np.zeros(windows + 1)
    which = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, windows - 1)
    p, c = heads[names[0]], data[names[0]].to_numpy().astype(np.float64)
    rows = []
    for w in range(windows):
        ix = which == w
        row = {"window": w, "start": float(edges[w]), "end": float(edges[w + 1]),
               **ratio_row(p[ix].sum(), c[ix].sum(), int(ix.sum()), min_clicks),
               "psi": psi(reference, p[ix]) if reference and ix.any() else None}
        for name in segments:
            seg = data[name].cast(pl.String).fill_null("(missing)").to_numpy()
            row[name] = {v: ratio_row(p[ix & (seg == v)].sum(), c[ix & (seg == v)].sum(),
                                      int((ix & (seg == v)).sum()), min_clicks) for v in np.unique(seg[ix])}
        rows.append(row)
    overall: dict[str, Any] = {"overall": ratio_row(p.sum(), c.sum(), len(p), min_clicks), "segments": {},
                               "psi": psi(reference, p) if reference else None}
    for name in segments:
        seg = data[name].cast(pl.String).fill_null("(missing)").to_numpy()
        overall["segments"][name] = {v: ratio_row(p[seg == v].sum(), c[seg == v].sum(), int((seg == v).sum()),
                                                  min_clicks) for v in np.unique(seg)}
    lines = alerts(overall)
    for r in rows:
        snap = {"overall": r, "segments": {n: r[n] for n in segments}, "psi": r["psi"]}
        lines += [f"window {r['window']}: {a}" for a in alerts(snap)]
    per_head: dict[str, Any] = {}
    for name, ph in heads.items():
        y = data[name].to_numpy().astype(np.float64)
        per_head[name] = {"total": ratio_row(ph.sum(), y.sum(), len(y), min_clicks),
                          "windows": [ratio_row(ph[which == w].sum(), y[which == w].sum(), int((which == w).sum()),
                                                min_clicks) for w in range(windows)]}
        if name != names[0]:
            lines += [f"head {name}: {a}" for a in alerts({"overall": per_head[name]["total"]})]
            lines += [f"head {name}, window {w}: {a}" for w, r in enumerate(per_head[name]["windows"])
                      for a in alerts({"overall": r})]
    features = _feature_drift(bundle, data, which, windows)
    for name, f in features.items():
        if f["total"] > MAJOR:
            lines.append(f"input {name}: PSI {f['total']:.3f} against training (major shift)")
        lines += [f"window {w}: input {name}: PSI {v:.3f} against training (major shift)"
                  for w, v in enumerate(f["windows"]) if v > MAJOR]
    return {"log": str(log), "impressions": len(p), "clicks": int(c.sum()), "band": list(BAND),
            "reference": bool(reference), "total": overall, "windows": rows, "heads": per_head,
            "features": features, "alerts": lines}


def _feature_drift(bundle: Any, data: pl.DataFrame, which: np.ndarray, windows: int) -> dict[str, dict[str, Any]]:
    """Per input column: PSI against the bundle's training rows over the whole log and per window, largest first
    (empty for a bundle without a feature reference)."""
    reference = bundle.metrics.get("feature_reference")
    if not reference or len(data) == 0:
        return {}
    ids, dense = bundle.encode(data)
    names = list(bundle.encoder.sparse_names) + list(bundle.encoder.dense_names)
    columns = np.concatenate([ids.astype(np.float64), dense.astype(np.float64)], axis=1)
    total = feature_psi(reference, names, columns)
    per = [feature_psi(reference, names, columns[which == w]) for w in range(windows)]
    out = {n: {"total": total[n], "windows": [p[n] for p in per]} for n in total}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["total"]))


def html_report(result: Mapping[str, Any], path: str | Path) -> Path:
    """A self-contained HTML page: pred/actual and PSI per window with the band, segment tables, alerts."""
    import html as esc

    from ctrkit.measure.report import _plt, _png

    plt = _plt()
    rows = result["windows"]
    x = [r["window"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    axes[0].plot(x, [r["ratio"] for r in rows], "o-", label="pred/actual")
    axes[0].axhspan(BAND[0], BAND[1], color="green", alpha=0.12, label=f"band [{BAND[0]}, {BAND[1]}]")
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set_xlabel("time window")
    axes[0].set_ylabel("pred / actual")
    axes[0].legend()
    axes[1].bar(x, [r["psi"] if r["psi"] is not None else 0.0 for r in rows])
    axes[1].axhline(0.1, color="orange", lw=0.8, label="0.1 moderate")
    axes[1].axhline(0.25, color="red", lw=0.8, label="0.25 major")
    axes[1].set_xlabel("time window")
    axes[1].set_ylabel("PSI vs training pCTR")
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    chart = _png(fig)

    def table(head: list[str], body: list[list[Any]]) -> str:
        th = "".join(f"<th>{esc.escape(h)}</th>" for h in head)
        tr = "".join("<tr>" + "".join(f"<td>{esc.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in body)
        return f"<table><tr>{th}</tr>{tr}</table>"

    win = table(["window", "impressions", "clicks", "pred", "pred/actual", "PSI", "alert"],
                [[r["window"], r["impressions"], r["clicks"], r["pred"], r["ratio"], r["psi"],
                  "ALERT" if r["alert"] or (r["psi"] or 0.0) > MAJOR else ""] for r in rows])
    segs = "".join(
        f"<h3>by {esc.escape(name)}</h3>" + table(
            [name, "impressions", "clicks", "pred", "pred/actual", "alert"],
            [[v, r["impressions"], r["clicks"], r["pred"], r["ratio"], "ALERT" if r["alert"] else ""]
             for v, r in vals.items()])
        for name, vals in result["total"]["segments"].items())
    heads = "".join(
        f"<h3>head {esc.escape(name)}</h3>" + table(
            ["window", "impressions", "events", "pred", "pred/actual", "alert"],
            [[w, r["impressions"], r["clicks"], r["pred"], r["ratio"], "ALERT" if r["alert"] else ""]
             for w, r in enumerate(h["windows"])])
        for name, h in list(result.get("heads", {}).items())[1:])
    feats = result.get("features") or {}
    def worst(values: list[float]) -> tuple[float | None, int | None]:
        seen = [(v, w) for w, v in enumerate(values) if v == v]  # windows without rows have NaN
        return max(seen) if seen else (None, None)

    inputs = table(["input column", "PSI, whole log", "largest window PSI", "in window", "alert"],
                   [[n, f["total"], *worst(f["windows"]),
                     "ALERT" if f["total"] > MAJOR or any(v > MAJOR for v in f["windows"]) else ""]
                    for n, f in feats.items()]) if feats else "<p>The bundle holds no reference of its inputs.</p>"
    al = "".join(f"<li>{esc.escape(a)}</li>" for a in result["alerts"]) or "<li>none</li>"
    t = result["total"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>ctrkit monitor</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}.alerts li{{color:#b00}}</style></head><body>
<h1>Calibration and drift: {esc.escape(str(result['log']))}</h1>
<p>{result['impressions']:,} impressions, {result['clicks']:,} clicks; overall pred/actual
<b>{_fmt(t['overall']['ratio'])}</b>, PSI against the training pCTR <b>{_fmt(t['psi'])}</b>.</p>
<h2>Alerts</h2><ul class="alerts">{al}</ul>
{chart}<h2>Per window</h2>{win}{heads}<h2>Segments (whole log)</h2>{segs}
<h2>Inputs: PSI against the training rows</h2>{inputs}</body></html>"""
    out = Path(path)
    out.write_text(page)
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.4f}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)
