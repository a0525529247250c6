"""The training report: one self-contained HTML page (plots embedded as PNG) per ``ctrkit train`` run.

It shows the learning curves, the reliability of the probabilities before and after calibration, the
distribution of pCTR by label, AUC and pred/actual per segment of the ``--report-by`` fields, and the run's
settings and data summary. The numbers come from ``metrics.json`` and ``report_data.npz`` (labels, logits
and segment ids of the held-out rows, no pickles) in the run folder, so ``ctrkit report RUN`` re-renders it.
"""

from __future__ import annotations

import base64
import html
import io
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ctrkit.evaluate.calibrate import Calibrator
from ctrkit.evaluate.metrics import auc, calibration_bins

REPORT_ROWS = 200_000  # held-out rows kept for the report (a seeded sample beyond)
TOP_SEGMENTS = 20
PLOTS = ("learning-curves", "reliability", "pctr-histogram", "segments")


def _segment_names(encoder: Any, field: str) -> np.ndarray:
    """Display names of a sparse field's local ids: missing, OOV, then its vocabulary (or buckets)."""
    size = encoder.sizes[field]
    vocab = encoder.vocab.get(field)
    if vocab is not None:
        return np.array(["(missing)", "(other)"] + [str(v) for v in vocab.to_list()])
    return np.array(["(missing)"] + [f"bucket {k}" for k in range(1, size)])


def save_report_data(out: Path, outputs: dict[str, dict[str, Any]], calibrator: Calibrator, encoder: Any,
                     report_by: list[str], seed: int = 0) -> Path:
    """Write ``out/report_data.npz``: per held-out split its labels, weights, logits and the ``report_by``
    segment of each row; ``out/report_segments.json`` names the segments."""
    arrays: dict[str, np.ndarray] = {}
    for split, o in outputs.items():
        n = len(o["label"])
        keep = np.arange(n)
        if n > REPORT_ROWS:
            keep = np.sort(np.random.default_rng(seed).choice(n, REPORT_ROWS, replace=False))
        arrays[f"{split}/label"] = o["label"][keep]
        arrays[f"{split}/logits"] = o["logits"][keep]
        if o["weight"] is not None:
            arrays[f"{split}/weight"] = o["weight"][keep]
        for field in report_by:
            j = encoder.sparse_names.index(field)
            arrays[f"{split}/by/{field}"] = o["ids"][keep, j] - encoder.offsets[field]
    names = {f: _segment_names(encoder, f).tolist() for f in report_by}
    (out / "report_segments.json").write_text(json.dumps(names))
    np.savez_compressed(out / "report_data.npz", **arrays)
    return out / "report_data.npz"


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(name: str, fig: Any, caption: str) -> str:
    return (f'<figure id="{name}"><img alt="{name}" src="data:image/png;base64,{_png(fig)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(rows: list[list[Any]], head: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if np.isnan(v) else f"{v:.5g}"
        return html.escape(str(v))

    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + f"</tr>{body}</table>"


def _learning_curves(train: dict[str, Any]) -> Any:
    """Loss and validation AUC by epoch: of the model, or of each member of an ensemble (one colour each)."""
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
    runs = train.get("members") or [train]
    for k, run in enumerate(runs):
        history, best = run.get("history", []), run.get("best_epoch", 0)
        tag = f"member {k + 1}: " if len(runs) > 1 else ""
        ep = [r["epoch"] for r in history]
        a1.plot(ep, [r.get("train_loss", np.nan) for r in history], "o-", color=f"C{2 * k}",
                label=f"{tag}train loss")
        if history and "valid" in history[0]:
            a1.plot(ep, [r["valid"]["logloss"] for r in history], "o--", color=f"C{2 * k + 1}",
                    label=f"{tag}valid logloss")
            a2.plot(ep, [r["valid"]["auc"] for r in history], "o-", color=f"C{2 * k}", label=f"{tag}valid AUC")
        for a in (a1, a2) if best else ():
            a.axvline(best, color=f"C{2 * k}", ls=":", lw=1, label=f"{tag}best epoch {best}")
    for a in (a1, a2):
        a.set_xlabel("epoch")
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    a1.set_title("loss")
    a2.set_title("validation AUC")
    return fig


def _reliability(y: np.ndarray, curves: dict[str, np.ndarray], w: np.ndarray | None) -> Any:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    top = 0.0
    for i, (name, p) in enumerate(curves.items()):
        b = calibration_bins(y, p, 15, "quantile", w)
        ok = b["count"] > 0
        ax.plot(b["mean_pred"][ok], b["rate"][ok], "o-", ms=4, color=f"C{i}", label=name)
        top = max(top, float(np.nanmax(b["mean_pred"][ok])), float(np.nanmax(b["rate"][ok])))
    top = top * 1.05 or 1.0
    ax.plot([0, top], [0, top], color="grey", ls="--", lw=1, label="perfect")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("mean predicted pCTR (15 equal-mass bins)")
    ax.set_ylabel("observed click rate")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _histogram(y: np.ndarray, p: np.ndarray) -> Any:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    lo = max(float(p.min()), 1e-6)
    bins = np.geomspace(lo, max(float(p.max()), lo * 10), 40)
    for label, color in ((0, "C0"), (1, "C3")):
        sel = p[y == label]
        if len(sel):
            ax.hist(sel, bins=bins, density=True, alpha=0.55, color=color, label=f"label {label} ({len(sel):,})")
    ax.set_xscale("log")
    ax.set_xlabel("served pCTR")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return fig


def segment_table(y: np.ndarray, p: np.ndarray, seg: np.ndarray, names: list[str],
                  w: np.ndarray | None = None, top: int = TOP_SEGMENTS) -> list[list[Any]]:
    """[segment, rows, clicks, AUC, pred/actual] of the ``top`` largest segments, largest first."""
    w = np.ones_like(y) if w is None else w
    counts = np.bincount(seg, minlength=len(names))
    rows = []
    for k in np.argsort(-counts, kind="stable")[:top]:
        if counts[k] == 0:
            break
        m = seg == k
        clicks = float(np.dot(w[m], y[m]))
        ratio = float(np.dot(w[m], p[m]) / clicks) if clicks else float("nan")
        rows.append([names[k] if k < len(names) else f"id {k}", int(counts[k]), int(y[m].sum()),
                     auc(y[m], p[m], w[m]), ratio])
    return rows


def _segments_plot(field: str, rows: list[list[Any]]) -> Any:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 3.2))
    labels = [str(r[0])[:18] for r in rows]
    ax.bar(range(len(rows)), [r[4] for r in rows], color="C1")
    ax.axhline(1.0, color="grey", ls="--", lw=1)
    ax.set_xticks(range(len(rows)), labels, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("pred / actual")
    ax.set_title(f"served pred/actual by {field} (largest segments)")
    return fig


def render_report(run: str | Path) -> Path:
    """Write ``RUN/report.html`` from the run's ``metrics.json`` and ``report_data.npz``."""
    import matplotlib

    matplotlib.use("Agg")
    run = Path(run)
    for part in ("metrics.json", "report_data.npz"):
        if not (run / part).exists():
            raise FileNotFoundError(f"{run} is not a training run folder: {part} is missing")
    metrics = json.loads((run / "metrics.json").read_text())
    cal = Calibrator.from_dict(metrics.get("calibration") or {})
    seg_file = run / "report_segments.json"
    names = json.loads(seg_file.read_text()) if seg_file.exists() else {}
    data = np.load(run / "report_data.npz", allow_pickle=False)
    split = "test" if "test/label" in data.files else "valid"
    tr = metrics.get("train", {})
    parts = [f"<h1>ctrkit training report: {html.escape(metrics.get('model', {}).get('name', '?'))}</h1>"]
    rows = [[k] + [metrics[k].get(c, float("nan")) for c in
                   ("auc", "logloss", "ece", "pred_actual_ratio", "logloss_raw", "ece_raw",
                    "pred_actual_ratio_raw", "n", "positives")] for k in ("valid", "test") if k in metrics]
    parts.append("<h2>Held-out metrics</h2>" + _table(rows, ["split", "AUC", "logloss", "ECE", "pred/actual",
                                                            "logloss raw", "ECE raw", "pred/actual raw", "rows",
                                                            "clicks"]))
    fitted = (f"then a {html.escape(cal.method)} map fitted on the validation rows" if cal.method != "none"
              else "no calibration map")
    parts.append(f"<p>Served = the bundle's probabilities (correction shift {cal.shift:+.4f} in logit, {fitted}); "
                 "raw = the network's own sigmoid. Validation figures of the served probabilities are in-sample "
                 "for a calibration map; the test rows were used by nothing.</p>")
    parts.append("<h2>Learning curves</h2>" + _img("learning-curves", _learning_curves(tr),
        f"early stopping monitored {tr.get('monitor', '?')}; the best epoch's weights were kept"))
    y, z = data[f"{split}/label"], data[f"{split}/logits"]
    w = data[f"{split}/weight"] if f"{split}/weight" in data.files else None
    served, raw = cal(z), 1.0 / (1.0 + np.exp(-z))
    curves = {"raw network": raw}
    if cal.shift and cal.method != "none":
        curves["corrected only"] = cal.raw(z)
    curves[f"served ({cal.method})"] = served
    parts.append(f"<h2>Reliability on the {split} rows</h2>"
                 + _img("reliability", _reliability(y, curves, w), "observed click rate against mean prediction")
                 + _img("pctr-histogram", _histogram(y, served), f"served pCTR of the {split} rows by label"))
    seg_html = []
    for field, seg_names in names.items():
        key = f"{split}/by/{field}"
        if key in data.files:
            rows = segment_table(y, served, data[key], seg_names, w)
            seg_html.append(f"<h3>{html.escape(field)}</h3>" + _img("segments", _segments_plot(field, rows), "")
                            + _table(rows, [field, "rows", "clicks", "AUC", "pred/actual"]))
    parts.append("<h2>Segments</h2>" + ("".join(seg_html) or "<p>No --report-by fields were named.</p>"))
    cold = metrics.get(split, {}).get("cold_start") or {}
    cold_rows = [[field, f"{c['share']:.1%}", c["unseen"]["rows"], c["unseen"]["clicks"], c["unseen"]["auc"],
                  c["seen"]["auc"], c["unseen"]["pred_actual_ratio"], c["seen"]["pred_actual_ratio"],
                  c["unseen"]["logloss"], c["seen"]["logloss"]] for field, c in cold.items()]
    parts.append(f"<h2>Cold start on the {split} rows</h2><p>Rows whose value of a field training never kept "
                 "(unseen, or rarer than its min_count: the field's out-of-vocabulary id) against the rows whose "
                 "value it kept.</p>"
                 + (_table(cold_rows, ["field", "share unseen", "unseen rows", "their clicks", "AUC unseen",
                                       "AUC seen", "pred/actual unseen", "pred/actual seen", "logloss unseen",
                                       "logloss seen"])
                    if cold_rows else "<p>Every value of every field was seen in training.</p>"))
    cfg = tr.get("config", {})
    settings = [[k, v] for k, v in cfg.items()] + [[f"model.{k}", v] for k, v in
                                                   metrics.get("model", {}).get("config", {}).items()]
    settings += [["calibration", cal.method], ["neg_sample_rate", tr.get("neg_sample_rate", 1.0)],
                 ["adaptive defaults", json.dumps(tr.get("auto", {}).get("reasons", []))]]
    if (d := tr.get("distill")) is not None:  # trained on a teacher's probabilities, not on the labels alone
        auc = "" if d.get("teacher_test_auc") is None else f", test AUC {d['teacher_test_auc']:.5f}"
        transfer = f", {d['transfer_rows']:,} transfer rows" if d.get("transfer_rows") else ""
        settings.append(["distilled from", f"{d['teacher']} ({d['model']}{auc}), teacher's share of each target "
                                           f"{d['weight']}{transfer}"])
    data_rows = [[k, v.get("rows"), v.get("bad_rows")] for k, v in metrics.get("data", {}).items()]
    parts.append("<h2>Settings</h2>" + _table(settings, ["setting", "value"]))
    parts.append("<h2>Data</h2>" + _table(data_rows, ["file", "rows read", "bad rows"])
                 + f"<p>training rows {tr.get('rows_before_sampling', tr.get('rows'))} "
                 f"({tr.get('rows')} after sampling, {tr.get('positives')} clicks); "
                 f"ids {metrics.get('encode', {}).get('n_ids')}; "
                 f"{tr.get('epochs')} epochs in {tr.get('seconds')} s.</p>")
    stats = metrics.get("encode", {}).get("stats")
    if stats:
        when = stats["as_of"]
        iso = (datetime.fromtimestamp(when / 1e6, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
               if 6.3e14 < when < 4.1e15 else f"time {when}")  # epoch microseconds of 1990 .. 2100
        rows = [[", ".join(s["columns"]), s["window"] or "all history", s["prior"], s["ids_with_history"],
                 s["impressions"]] for s in stats["stats"]]
        parts.append("<h2>Rolling statistics</h2>" + _table(rows, ["features", "window", "prior",
                                                                   "ids with history", "impressions"])
                     + f"<p>Training rows count only the rows before their own time; validation, test and served "
                     f"rows read the counts as of {iso} (training click rate {stats['click_rate']:.4f}).</p>")
    style = ("body{font-family:sans-serif;max-width:1180px;margin:24px auto;color:#222}"
             "table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ccc;"
             "padding:3px 8px;text-align:right}th{background:#f2f2f2}figure{display:inline-block;margin:6px}"
             "figcaption{font-size:12px;color:#555}h2{border-bottom:1px solid #ddd}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>ctrkit report</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
    (run / "report.html").write_text(page)
    return run / "report.html"
