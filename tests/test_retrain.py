"""Retrain from the event log: promotes a better model, keeps the base otherwise; IPS resampling by propensity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from ctrkit.cli import app
from ctrkit.data.readers import DataError
from ctrkit.data.synth import make_click_log, synth_schema
from ctrkit.pipeline import train
from ctrkit.serve.events import EventLog
from ctrkit.serve.retrain import examination, ips_resample, ips_weights


def _log_from(df: pl.DataFrame, path: Path, shuffle_clicks: bool = False) -> None:
    """Write rows of a synthetic click log as served impressions plus click events."""
    clicks = df["click"].to_numpy()
    if shuffle_clicks:
        clicks = np.random.default_rng(0).permutation(clicks)
    rows = df.drop("click", "p_click").with_columns(
        (pl.col("timestamp").dt.epoch("us") / 1e6).alias("timestamp"),
        pl.col("hour").cast(pl.String), pl.col("weekday").cast(pl.String), pl.col("position").cast(pl.Int64))
    events = []
    for i, r in enumerate(rows.to_dicts()):
        events.append({**r, "event_id": f"imp{i}", "kind": "impression", "impression_id": f"imp{i}",
                       "propensity": 0.5 if i % 2 else 1.0})
        if clicks[i]:
            events.append({"event_id": f"c{i}", "kind": "click", "impression_id": f"imp{i}",
                           "timestamp": r["timestamp"] + 5.0})
    with EventLog(path) as log:
        log.append(events)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pl.DataFrame]:
    out = tmp_path_factory.mktemp("retrain")
    df, _ = make_click_log(n_rows=6000, n_users=150, n_items=60, seed=4)
    train(df.head(300).drop("p_click"), schema=synth_schema(), model="lr", out=out / "weak", epochs=1,
          progress=False)
    return out, df


def test_retrain_promotes_a_better_model(world: tuple[Path, pl.DataFrame]) -> None:
    out, df = world
    _log_from(df.slice(300), out / "log")
    res = CliRunner().invoke(app, ["retrain", "--events", str(out / "log"), "--base", str(out / "weak" / "bundle"),
                                   "--out", str(out / "new"), "--epochs", "3"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "new.retrain.json").read_text())
    assert report["promoted"] and report["candidate"]["logloss"] < report["base"]["logloss"]
    assert report["rows"]["holdout"] == pytest.approx(0.2 * report["rows"]["log"], abs=1)
    assert (out / "new" / "model.json").exists() and "promoted" in res.output
    res = CliRunner().invoke(app, ["monitor", str(out / "log"), "--bundle", str(out / "weak" / "bundle"),
                                   "--segments", "device", "--windows", "3", "--out", str(out / "m.html"),
                                   "--json"])
    assert res.exit_code == 0, res.output
    mon = json.loads(res.stdout)
    assert len(mon["windows"]) == 3 and set(mon["total"]["segments"]["device"]) >= {"mobile", "desktop"}
    assert mon["impressions"] == 5700 and (out / "m.html").read_text().startswith("<!doctype html>")


def test_retrain_keeps_the_base_when_the_candidate_is_worse(world: tuple[Path, pl.DataFrame]) -> None:
    out, df = world
    _log_from(df.slice(300, 2000), out / "noise", shuffle_clicks=True)
    res = CliRunner().invoke(app, ["retrain", "--events", str(out / "noise"), "--base",
                                   str(out / "new"), "--out", str(out / "worse"), "--epochs", "2"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "worse.retrain.json").read_text())
    assert not report["promoted"] and not (out / "worse").exists() and "kept the base" in res.output


def test_ips_weights_follow_propensity_and_examination() -> None:
    rng = np.random.default_rng(3)
    n = 40000
    pos = rng.integers(1, 5, n)
    explored = rng.random(n) < 0.5
    exam = 1.0 / pos
    click = (rng.random(n) < 0.3 * exam).astype(np.int8)  # relevance 0.3 everywhere: CTR_k / CTR_1 = 1 / k
    rows = pl.DataFrame({"position": pos, "explored": explored, "click": click,
                         "propensity": np.where(explored, 0.25, 1.0)})
    est = examination(rows, "click")
    assert est[1] == 1.0 and all(abs(est[k] - 1.0 / k) < 0.06 for k in (2, 3, 4))
    w = ips_weights(rows, "click", max_weight=100.0)
    k4 = (pos == 4) & (click == 1) & ~explored
    assert np.allclose(w[k4], 1.0 / est[4]) and np.allclose(w[(click == 0) & explored], 4.0)
    drawn = ips_resample(rows, w, seed=1)
    assert drawn.height == n and (drawn["propensity"] == 0.25).mean() > 0.7
    assert examination(rows.drop("explored"), "click") == {}
    with pytest.raises(DataError, match="propensity"):
        ips_weights(rows.drop("propensity"), "click")
    with pytest.raises(DataError, match=r"\(0, 1\]"):
        ips_weights(rows.with_columns(pl.lit(0.0).alias("propensity")), "click")
