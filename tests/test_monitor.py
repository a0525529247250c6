"""Monitor: PSI against a literal formula, rolling pred/actual with its alert band, and the log report."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctrkit.serve.events import EventLog
from ctrkit.serve.monitor import (LiveMonitor, feature_psi, feature_reference, html_report, monitor_log, psi,
                                  ratio_row, reference_distribution)


def test_psi_against_the_formula() -> None:
    ref = {"edges": [0.1, 0.2], "shares": [0.5, 0.3, 0.2]}
    p = np.array([0.05, 0.15, 0.15, 0.25])  # shares 0.25, 0.5, 0.25
    expected = sum((a - e) * math.log(a / e) for a, e in ((0.25, 0.5), (0.5, 0.3), (0.25, 0.2)))
    assert math.isclose(psi(ref, p), expected, rel_tol=1e-12)
    assert math.isnan(psi(ref, np.array([])))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=300))
def test_reference_of_itself_has_no_shift(values: list[float]) -> None:
    ref = reference_distribution(np.array(values))
    assert math.isclose(sum(ref["shares"]), 1.0) and list(ref["edges"]) == sorted(ref["edges"])
    assert abs(psi(ref, np.array(values))) < 1e-9


def test_live_monitor_window_ratio_and_alerts() -> None:
    mon = LiveMonitor(window=100, segments=("device",), min_clicks=5)
    for i in range(150):
        mon.impression(f"i{i}", 0.1, {"device": "mobile" if i % 2 else "desktop"})
    assert not mon.click("i0")  # fell out of the window
    for i in range(50, 150, 5):  # 20 clicks on 100 impressions of pCTR 0.1: pred/actual 10 / 20 = 0.5
        assert mon.click(f"i{i}")
    snap = mon.snapshot()
    assert snap["overall"]["impressions"] == 100 and snap["overall"]["clicks"] == 20
    assert math.isclose(snap["overall"]["ratio"], 0.5) and snap["overall"]["alert"]
    assert set(snap["segments"]["device"]) == {"mobile", "desktop"}
    assert any("overall pred/actual 0.500" in a for a in snap["alerts"])
    assert snap["psi"] is None and snap["scored"] == 0
    ref = reference_distribution(np.linspace(0.01, 0.3, 1000))
    drift = LiveMonitor(window=50, reference=ref)
    drift.scored(np.linspace(0.01, 0.3, 120))  # wraps around the ring: the last 50 are kept
    assert drift.snapshot()["scored"] == 50
    assert math.isclose(drift.snapshot()["psi"], psi(ref, np.linspace(0.01, 0.3, 120)[-50:]))
    more = np.random.default_rng(0).uniform(0.0, 0.05, 40)  # a different distribution: PSI must see it
    drift.scored(more)
    kept = np.concatenate([np.linspace(0.01, 0.3, 120)[-10:], more])  # the last 50 values
    assert math.isclose(drift.snapshot()["psi"], psi(ref, kept))
    assert not math.isclose(psi(ref, kept), psi(ref, np.concatenate([np.linspace(0.01, 0.3, 120)[-20:-10], more])))
    quiet = LiveMonitor(window=10, min_clicks=5)
    quiet.impression("a", 0.5, {})
    quiet.click("a")
    assert not quiet.snapshot()["overall"]["alert"]  # 1 click cannot raise an alert


def test_ratio_rows_alert_outside_the_band_once_enough_clicks() -> None:
    assert ratio_row(30.0, 20, 1000, min_clicks=10) == {"impressions": 1000, "clicks": 20, "pred": 30.0,
                                                         "ratio": 1.5, "alert": True}
    assert not ratio_row(30.0, 20, 1000, min_clicks=30)["alert"]  # too few clicks to tell
    assert not ratio_row(21.0, 20, 1000, min_clicks=10)["alert"]  # 1.05 is inside [0.8, 1.2]
    empty = ratio_row(5.0, 0, 1000, min_clicks=0)  # no click: no ratio, and no alert even at min_clicks 0
    assert math.isnan(empty["ratio"]) and not empty["alert"]


def test_monitor_log_alerts_when_traffic_shifts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    events = []
    for i in range(4000):
        late = i >= 2000
        p = rng.uniform(0.02, 0.2) * (3.0 if late else 1.0)  # the second half is scored much higher ...
        clicked = rng.random() < (p / 3.0 if late else p)   # ... than it clicks
        seg = "a" if i % 2 else "b"
        events.append({"event_id": f"imp{i}", "kind": "impression", "impression_id": f"imp{i}",
                       "timestamp": 1.7e9 + i, "pctr": p, "position": 1, "segment": seg})
        if clicked:
            events.append({"event_id": f"clk{i}", "kind": "click", "impression_id": f"imp{i}",
                           "timestamp": 1.7e9 + i + 1})
    with EventLog(tmp_path / "log") as log:
        log.append(events)
    ref = reference_distribution(rng.uniform(0.02, 0.2, 5000))
    bundle = SimpleNamespace(metrics={"pctr_reference": ref}, predict=None,
                             schema=SimpleNamespace(label_columns=["click"]))
    res = monitor_log(tmp_path / "log", bundle, segments=["segment"], windows=4)
    w = res["windows"]
    assert res["impressions"] == 4000
    assert 0.8 <= w[0]["ratio"] <= 1.2 and not w[0]["alert"] and w[0]["psi"] < 0.1
    assert w[3]["ratio"] > 2.0 and w[3]["alert"] and w[3]["psi"] > 0.25
    assert any(a.startswith("window 3: overall") for a in res["alerts"])
    assert any("segment=a" in a for a in res["alerts"])
    page = html_report(res, tmp_path / "m.html").read_text()
    assert "ALERT" in page and "data:image/png;base64" in page
    psi_only = {**res, "windows": [{**w[0], "alert": False, "psi": 0.3}], "total": {**res["total"], "segments": {}}}
    assert "ALERT" in html_report(psi_only, tmp_path / "p.html").read_text().split("Per window")[1].split("<h2>")[0]
    with pytest.raises(ValueError, match="no column 'nope'"):
        monitor_log(tmp_path / "log", bundle, segments=["nope"])
    with pytest.raises(ValueError, match="--windows must be >= 1, got 0"):
        monitor_log(tmp_path / "log", bundle, windows=0)
    with pytest.raises(ValueError, match="--min-clicks must be >= 0, got -1"):
        monitor_log(tmp_path / "log", bundle, min_clicks=-1)


def test_monitor_log_checks_every_head_of_a_multi_task_bundle(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    events, p_conv, convs = [], [], 0
    for i in range(3000):
        late = i >= 1500
        pc, pv = rng.uniform(0.05, 0.3), rng.uniform(0.01, 0.05)  # pCTR and pCTCVR of the two heads
        clicked = rng.random() < pc
        converted = clicked and rng.random() < (pv / pc) * (0.3 if late else 1.0)  # late: a third converts
        events.append({"event_id": f"imp{i}", "kind": "impression", "impression_id": f"imp{i}",
                       "timestamp": 1.7e9 + i, "position": 1, "pc": pc, "pv": pv})
        if clicked:
            events.append({"event_id": f"clk{i}", "kind": "click", "impression_id": f"imp{i}",
                           "timestamp": 1.7e9 + i + 1})
        if converted:
            events.append({"event_id": f"cv{i}", "kind": "conversion", "impression_id": f"imp{i}",
                           "timestamp": 1.7e9 + i + 2})
            convs += 1
        p_conv.append(pv)
    with EventLog(tmp_path / "log") as log:
        log.append(events)
    bundle = SimpleNamespace(metrics={}, schema=SimpleNamespace(label_columns=["click", "conversion"]),
                             predict=lambda df: np.column_stack([df["pc"].to_numpy(), df["pv"].to_numpy()]))
    res = monitor_log(tmp_path / "log", bundle, windows=2, min_clicks=5)
    conv = res["heads"]["conversion"]
    assert conv["total"]["clicks"] == convs and conv["total"]["pred"] == pytest.approx(sum(p_conv))
    assert conv["total"]["ratio"] == pytest.approx(sum(p_conv) / convs)
    assert 0.8 <= conv["windows"][0]["ratio"] <= 1.2 and conv["windows"][1]["ratio"] > 2.0
    assert res["heads"]["click"]["total"] == res["total"]["overall"]
    assert any(a.startswith("head conversion, window 1:") for a in res["alerts"])
    assert not any("head conversion, window 0" in a for a in res["alerts"])
    assert "head conversion" in html_report(res, tmp_path / "m.html").read_text()


def test_feature_reference_and_psi_literal() -> None:
    enc = SimpleNamespace(sparse_names=["u"], dense_names=["x"], oov_ids=lambda: {"u": 1})
    ids = np.array([[5], [5], [5], [6], [7], [8], [5], [6], [9], [3]])
    dense = np.array([[0.0], [1.0], [2.0], [3.0], [np.nan], [5.0], [6.0], [7.0], [8.0], [9.0]])
    ref = feature_reference(enc, ids, dense, top=2, bins=3)
    # the two most frequent ids, then the OOV id (none here), then the rest
    assert ref["u"] == {"ids": [5, 6, 1], "shares": [0.4, 0.2, 0.0, 0.4]}
    edges = np.quantile([0, 1, 2, 3, 5, 6, 7, 8, 9], [1 / 3, 2 / 3]).tolist()
    assert ref["x"]["edges"] == edges
    assert ref["x"]["shares"] == pytest.approx([0.3, 0.3, 0.3, 0.1])  # three bins, then missing
    assert feature_psi(ref, ["u", "x"], np.column_stack([ids[:, 0], dense[:, 0]])) == {"u": 0.0, "x": 0.0}
    live = np.array([[1, 0.0], [1, 0.0], [5, np.nan], [6, 9.0]])  # half at OOV (unseen values), half missing
    got = feature_psi(ref, ["u", "x"], live)
    want_u = sum((a - e) * math.log(a / e) for a, e in ((0.25, 0.4), (0.25, 0.2), (0.5, 1e-4), (1e-4, 0.4)))
    want_x = sum((a - e) * math.log(a / e) for a, e in ((0.5, 0.3), (1e-4, 0.3), (0.25, 0.3), (0.25, 0.1)))
    assert got["u"] == pytest.approx(want_u, rel=1e-12) and got["x"] == pytest.approx(want_x, rel=1e-12)
    assert math.isnan(feature_psi(ref, ["u", "x"], live[:0])["u"])


def test_live_monitor_compares_the_last_scored_rows_inputs_with_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """The live input PSI is feature_psi over the last INPUT_ROWS scored rows (a literal check), its alerts name
    the column, and a bundle without a reference (or rows of another width) leaves nothing kept."""
    import ctrkit.serve.monitor as monitor_module

    monkeypatch.setattr(monitor_module, "INPUT_ROWS", 6)
    enc = SimpleNamespace(sparse_names=["u"], dense_names=["x"], oov_ids=lambda: {"u": 1})
    ids = np.array([[5], [5], [5], [6], [7], [8], [5], [6], [9], [3]])
    dense = np.array([[0.0], [1.0], [2.0], [3.0], [np.nan], [5.0], [6.0], [7.0], [8.0], [9.0]])
    ref = feature_reference(enc, ids, dense, top=2, bins=3)
    mon = LiveMonitor(window=100, features=ref, names=["u", "x"])
    assert mon.watches_inputs and mon.snapshot()["inputs"] == {}
    mon.inputs(ids[:4], dense[:4])
    mon.inputs(np.array([[1], [1], [1], [1]]), np.array([[50.0], [50.0], [50.0], [50.0]]))  # unseen, far right
    snap = mon.snapshot()
    assert snap["input_rows"] == 6
    last6 = np.column_stack([np.r_[ids[2:4, 0], [1, 1, 1, 1]], np.r_[dense[2:4, 0], [50.0] * 4]])
    assert snap["inputs"] == feature_psi(ref, ["u", "x"], last6)
    assert snap["inputs"]["u"] > 0.25 and snap["inputs"]["x"] > 0.25
    assert f"input u: PSI {snap['inputs']['u']:.3f} against training (major shift)" in snap["alerts"]
    mon.inputs(np.zeros((2, 3)), np.zeros((2, 1)))  # another bundle's rows, in flight during a swap: not kept
    assert mon.snapshot()["inputs"] == snap["inputs"]
    mon.watch_inputs(None, ())
    mon.inputs(ids, dense)
    assert not mon.watches_inputs and mon.snapshot()["inputs"] == {} and mon.snapshot()["input_rows"] == 0


def test_monitor_log_names_the_input_that_moved(tmp_path: Path) -> None:
    """The second half of the log is served items priced ten times higher: the price column's PSI is an alert in
    that window only."""
    from ctrkit.data.synth import make_click_log, synth_schema
    from ctrkit.pipeline import train
    from ctrkit.serve.bundle import Bundle

    log, _ = make_click_log(n_rows=3000, n_users=100, n_items=60, seed=3)
    log = log.drop("p_click")
    train(log.head(2000), schema=synth_schema(), model="lr", epochs=1, out=tmp_path / "run", progress=False)
    bundle = Bundle.load(tmp_path / "run" / "bundle")
    assert set(bundle.metrics["feature_reference"]) == set(bundle.encoder.sparse_names + bundle.encoder.dense_names)
    served = log.tail(1000).with_columns(pl.when(pl.int_range(pl.len()) >= 500).then(pl.col("price") * 10)
                                         .otherwise(pl.col("price")).alias("price"))
    events = []
    for i, r in enumerate(served.drop("click").to_dicts()):
        stamp = r.pop("timestamp").timestamp()
        events.append({**r, "hour": str(r["hour"]), "weekday": str(r["weekday"]), "event_id": f"i{i}",
                       "kind": "impression", "impression_id": f"i{i}", "timestamp": stamp})
    with EventLog(tmp_path / "log") as sink:
        sink.append(events)
    res = monitor_log(tmp_path / "log", bundle, windows=2)
    price = res["features"]["price"]
    assert price["windows"][1] > 0.25 > price["windows"][0]
    assert any(a.startswith("window 1: input price: PSI") for a in res["alerts"])
    assert not any(a.startswith("window 0: input price") for a in res["alerts"])
    # weekday moves too, for real: the served days fall on five weekdays, the training days on all seven
    assert res["features"]["weekday"]["total"] > 0.25
    assert all(f["total"] < 0.1 for n, f in res["features"].items() if n not in ("price", "weekday"))
    page = html_report(res, tmp_path / "m.html").read_text()
    assert "Inputs: PSI against the training rows" in page and "price" in page
