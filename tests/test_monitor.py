"""Monitor: PSI against a literal formula, rolling pred/actual with its alert band, and the log report."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctrkit.serve.events import EventLog
from ctrkit.serve.monitor import LiveMonitor, html_report, monitor_log, psi, ratio_row, reference_distribution


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
