"""Retrain from the event log: promotes a better model, keeps the base otherwise; relevance by regression EM."""

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
from ctrkit.measure.attribution import AttributionConfig
from ctrkit.pipeline import train
from ctrkit.schema import Schema
from ctrkit.serve.events import EventLog
from hypothesis import given, settings
from hypothesis import strategies as st

from ctrkit.serve.bundle import Bundle
from ctrkit.serve.retrain import (_theta_at, clustered_mean, examination, examination_given_relevance,
                                  logloss_gap, relevance_rows, retrain, WEIGHT)


def _log_from(df: pl.DataFrame, path: Path, shuffle_clicks: bool = False) -> None:
    """Write rows of a synthetic click log as served impressions plus click events.

    ``shuffle_clicks`` shuffles the clicks of the first 80% of rows, the part retrain fits on: the candidate learns
    noise while the held-out 20% stays real (a calibrated noise model would win a holdout of noise on logloss).
    """
    clicks = df["click"].to_numpy().copy()
    if shuffle_clicks:
        n_fit = int(0.8 * len(clicks))
        clicks[:n_fit] = np.random.default_rng(0).permutation(clicks[:n_fit])
    rows = df.drop("click", "p_click").with_columns(
        (pl.col("timestamp").dt.epoch("us") / 1e6).alias("timestamp"),
        pl.col("hour").cast(pl.String), pl.col("weekday").cast(pl.String), pl.col("position").cast(pl.Int64))
    events = []
    for i, r in enumerate(rows.to_dicts()):
        events.append({**r, "event_id": f"imp{i}", "kind": "impression", "impression_id": f"imp{i}",
                       "request_id": f"r{i}", "propensity": 0.5 if i % 2 else 1.0})
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
    out, df = world  # the base learns the real clicks here, not in another test: xdist may run that one elsewhere
    train(df.slice(300, 3000).drop("p_click"), schema=synth_schema(), model="lr", out=out / "strong", epochs=3,
          progress=False)
    _log_from(df.slice(300, 2000), out / "noise", shuffle_clicks=True)
    res = CliRunner().invoke(app, ["retrain", "--events", str(out / "noise"), "--base",
                                   str(out / "strong" / "bundle"), "--out", str(out / "worse"), "--epochs", "2"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "worse.retrain.json").read_text())
    assert not report["promoted"] and not (out / "worse").exists() and "kept the base" in res.output


def test_retrain_ips_learns_relevance_and_ope_gates_promotion(world: tuple[Path, pl.DataFrame]) -> None:
    out, df = world
    part = df.slice(300, 3000)
    _log_from(part, out / "ipslog")
    res = CliRunner().invoke(app, ["retrain", "--events", str(out / "ipslog"), "--base", str(out / "weak" / "bundle"),
                                   "--out", str(out / "rel"), "--ips", "--em-steps", "1", "--epochs", "2"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "rel.retrain.json").read_text())
    exam = {int(k): v for k, v in report["examination"].items()}
    assert report["ips"] and exam[min(exam)] == 1.0 and all(0 < v <= 1 for v in exam.values())
    assert report["rows"]["train"] > 0.8 * report["rows"]["log"]  # unclicked rows split in two
    # the candidates of each logged top slot: the shown row and two others, under the request's id
    rng = np.random.default_rng(0)
    feats = part.drop("click", "p_click", "timestamp").with_columns(pl.col("hour").cast(pl.String),
                                                                    pl.col("weekday").cast(pl.String))
    top = np.flatnonzero(part["position"].to_numpy() == part["position"].min())
    cands = pl.concat([feats[[int(i), *rng.integers(0, feats.height, 2).tolist()]]
                       .with_columns(pl.lit(f"r{i}").alias("request_id")) for i in top])
    cands.write_parquet(out / "cands.parquet")
    res = CliRunner().invoke(app, ["measure", "ope", str(out / "ipslog"), "--bundle", str(out / "weak" / "bundle"),
                                   "--candidates", str(out / "cands.parquet"), "--json"])
    assert res.exit_code == 0, res.output
    ope = json.loads(res.stdout)
    assert {e["estimator"] for e in ope["estimates"]} == {"ips", "snips", "dr"}
    assert ope["requests"] == len(top) and 0 < ope["agreement"] <= 1
    res = CliRunner().invoke(app, ["measure", "ope", str(out / "ipslog")])
    assert res.exit_code != 0 and "--candidates" in res.output
    res = CliRunner().invoke(app, ["retrain", "--events", str(out / "ipslog"), "--base", str(out / "weak" / "bundle"),
                                   "--out", str(out / "gated"), "--candidates", str(out / "cands.parquet"),
                                   "--epochs", "2"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "gated.retrain.json").read_text())
    assert "off-policy top-slot CTR (DR" in report["reason"] and report["candidate"]["ope"]["requests"] > 0
    dr = [next(e for e in report[k]["ope"]["estimates"] if e["estimator"] == "dr")["value"]
          for k in ("base", "candidate")]
    assert report["promoted"] == (report["candidate"]["logloss"] < report["base"]["logloss"] and dr[1] > dr[0])


def test_relevance_rows_examination_and_theta_literal() -> None:
    rows = pl.DataFrame({"position": [1, 2, 2, 1], "click": [1, 0, 1, 0]})
    step = relevance_rows(rows, "click", {1: 1.0, 2: 0.5}, np.full(4, 0.4))
    # a non-click at position 2: relevant but unexamined with r = 0.4 * 0.5 / (1 - 0.5 * 0.4) = 0.25
    got = sorted(zip(step["position"].to_list(), step["click"].to_list(), step[WEIGHT].to_list()))
    assert got == [(1, 0, 1.0), (1, 1, 1.0), (2, 0, 0.75), (2, 1, 0.25), (2, 1, 1.0)]
    # E[click | x, k] = theta_k gamma(x): position 1 has 1 click over gamma 0.8; position 2 1 click over 1.6
    assert examination_given_relevance(rows, "click", np.array([0.5, 0.9, 0.7, 0.3])) == {1: 1.0, 2: 0.5}
    # ... or over 0.2, a ratio of 4 clipped to 1
    assert examination_given_relevance(rows, "click", np.array([0.5, 0.1, 0.1, 0.3])) == {1: 1.0, 2: 1.0}
    explored = rows.with_columns(pl.Series("explored", [True, True, True, False]))
    assert examination(explored, "click") == {1: 1.0, 2: 0.5}  # CTR 1 at 1, 1/2 at 2 on explored slots
    assert examination(rows.drop("position"), "click") == {}
    theta = _theta_at(pl.DataFrame({"position": [1, 3, 9, None]}), {1: 1.0, 2: 0.5, 4: 0.3})
    assert np.allclose(theta, [1.0, 0.4, 0.3, 1.0])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5), st.booleans(), st.floats(0.0, 1.0)), min_size=1, max_size=40))
def test_relevance_rows_keep_each_row_whole(cells: list[tuple[int, bool, float]]) -> None:
    rows = pl.DataFrame({"position": [c[0] for c in cells], "click": [int(c[1]) for c in cells]})
    exam = {k: 1.0 / k for k in range(1, 6)}
    step = relevance_rows(rows, "click", exam, np.array([c[2] for c in cells]))
    assert step[WEIGHT].sum() == pytest.approx(len(cells)) and (step[WEIGHT] > 0).all()
    assert (step.filter(pl.col("click") == 1)[WEIGHT].sum() >= rows["click"].sum() - 1e-9)


def test_examination_given_relevance_undoes_a_ranker_s_confounding() -> None:
    rng = np.random.default_rng(3)
    n = 60000
    gamma = rng.uniform(0.05, 0.6, n)
    pos = np.clip(6 - np.ceil(gamma * 10).astype(int) + rng.integers(0, 2, n), 1, 5)  # good items on top
    theta = 1.0 / pos
    rows = pl.DataFrame({"position": pos, "click": (rng.random(n) < theta * gamma).astype(np.int8)})
    naive = examination(rows, "click")  # CTR by position: examination times the ranker's selection
    fixed = examination_given_relevance(rows, "click", gamma)
    assert max(abs(fixed[k] - 1.0 / k) for k in range(2, 6)) < 0.05
    assert max(abs(naive[k] - 1.0 / k) for k in range(2, 6)) > 0.1


def test_not_worse_with_refit_promotes_the_refit_and_refuses_a_worse_candidate(
        world: tuple[Path, pl.DataFrame]) -> None:
    out, df = world
    _log_from(df.slice(300, 3000), out / "good")
    res = retrain(out / "good", out / "weak" / "bundle", out / "good_new", epochs=2, rule="not_worse", refit=True,
                  keep_candidate=True)
    assert res.promoted and res.rows["refit"] == res.rows["log"] > res.rows["train"]
    assert "paired logloss difference" in res.reason and "refit on all" in res.reason
    served, gated = Bundle.load(out / "good_new"), Bundle.load(str(res.candidate_path))
    rows = df.slice(3300, 200).drop("p_click")
    assert not np.allclose(served.predict(rows), gated.predict(rows))  # the refit, not the gated candidate
    _log_from(df.slice(300, 2000), out / "noise2", shuffle_clicks=True)
    res = retrain(out / "noise2", out / "good_new", out / "worse2", epochs=2, rule="not_worse", refit=True)
    gap = res.candidate["logloss_gap"]
    assert not res.promoted and gap["value"] > 1.645 * gap["se"] > 0 and not (out / "worse2").exists()
    assert "refit" not in res.rows and "kept the base" in res.reason
    with pytest.raises(ValueError, match="rule"):
        retrain(out / "good", out / "weak" / "bundle", out / "x", rule="maybe")
    with pytest.raises(ValueError, match="epochs must be >= 1, got 0"):
        retrain(out / "good", out / "weak" / "bundle", out / "x", epochs=0)
    with pytest.raises(ValueError, match="is the base bundle itself"):
        retrain(out / "good", out / "weak" / "bundle", out / "weak" / "bundle")
    (out / "mine").mkdir()
    (out / "mine" / "notes.txt").write_text("keep me")  # a promotion replaced whatever folder --out named
    with pytest.raises(ValueError, match="exists and is not a bundle"):
        retrain(out / "good", out / "weak" / "bundle", out / "mine")
    assert (out / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="work folder .* is not empty"):
        retrain(out / "good", out / "weak" / "bundle", out / "x", work=out / "mine")
    assert (out / "mine" / "notes.txt").read_text() == "keep me"
    assert not list(out.glob(".worse2.work-*")), "a candidate's run folder outlived its retrain"
    # the attribution rules are the caller's: clicks 5 s after their impression, a 1 s click window, no clicks
    with pytest.raises(DataError, match="too few"):
        retrain(out / "good", out / "weak" / "bundle", out / "x", attribution=AttributionConfig(click_window_s=1.0))


def test_logloss_gap_is_paired_and_clustered(world: tuple[Path, pl.DataFrame]) -> None:
    out, df = world
    weak = Bundle.load(out / "weak" / "bundle")
    rows = df.slice(300, 500).with_columns((pl.int_range(500) // 10).cast(pl.String).alias("request_id"))
    assert logloss_gap(weak, weak, rows, "click") == (0.0, 0.0)
    # two requests: row differences (1, 3) and (2, 6) -> request sums 4 and 8 over 2 rows each
    mean, se = clustered_mean(np.array([1.0, 3.0, 2.0, 6.0]), np.ones(4), np.array(["a", "a", "b", "b"]))
    assert mean == pytest.approx(3.0) and se == pytest.approx(np.sqrt(((4 - 6) ** 2 + (8 - 6) ** 2) / 2) / 2)
    mean, se = clustered_mean(np.array([1.0, 3.0, 2.0, 6.0]), np.ones(4), None)
    assert mean == pytest.approx(3.0) and se == pytest.approx(np.std([1.0, 3.0, 2.0, 6.0], ddof=1) / 2)


def test_retrain_keeps_the_ensemble_size_of_the_base(world: tuple[Path, pl.DataFrame]) -> None:
    """The candidate follows the base's recipe: an ensemble base gets an ensemble candidate of as many members."""
    from ctrkit.models.ensemble import Ensemble

    out, df = world
    train(df.head(300).drop("p_click"), schema=synth_schema(), model="lr", out=out / "weak2", epochs=1,
          ensemble=2, progress=False)
    _log_from(df.slice(300, 1500), out / "log2")
    res = retrain(out / "log2", out / "weak2" / "bundle", out / "new2", epochs=1, keep_candidate=True)
    assert res.candidate_path is not None
    candidate = Bundle.load(res.candidate_path)
    assert isinstance(candidate.model, Ensemble) and len(candidate.model.members) == 2


def test_retrain_of_a_distilled_base_says_the_candidate_learns_the_labels(world: tuple[Path, pl.DataFrame]) -> None:
    """A teacher reads the ids of its own training rows only, so the candidate of a distilled base learns the
    log's labels, and the retrain's reason says so."""
    out, df = world
    rows = df.head(300).drop("p_click")
    train(rows, schema=synth_schema(), model="lr", out=out / "teacher3", epochs=1, ensemble=2, progress=False)
    train(rows, schema=synth_schema(), model="lr", out=out / "student3", epochs=1, progress=False,
          distill=out / "teacher3" / "bundle")
    _log_from(df.slice(300, 1500), out / "log3")
    res = retrain(out / "log3", out / "student3" / "bundle", out / "new3", epochs=1, keep_candidate=True)
    assert f"the base was distilled from {out / 'teacher3' / 'bundle'}, the candidate learns the labels" in res.reason
    assert "distill" not in Bundle.load(res.candidate_path).metrics["train"]  # type: ignore[arg-type]


def test_retrain_counts_rolling_stats_at_the_logged_impression_times(world: tuple[Path, pl.DataFrame],
                                                                      tmp_path: Path) -> None:
    out, df = world  # the schema's time column is `ts`; the server logs each impression's `timestamp`
    schema = Schema.from_dict(synth_schema().to_dict() | {"time": "ts", "stats": ["user_id"]})
    train(df.head(600).drop("p_click").rename({"timestamp": "ts"}), schema=schema, model="lr",
          out=tmp_path / "base", epochs=1, progress=False)
    _log_from(df.slice(600, 2400), tmp_path / "log")
    res = CliRunner().invoke(app, ["retrain", "--events", str(tmp_path / "log"), "--base",
                                   str(tmp_path / "base" / "bundle"), "--out", str(tmp_path / "new"), "--epochs", "2",
                                   "--rule", "not_worse"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "new.retrain.json").read_text())["promoted"]
    base, new = Bundle.load(tmp_path / "base" / "bundle"), Bundle.load(tmp_path / "new")
    # the candidate fits on the older 80% of the log, of which the newest 10% validates: its counts end at the
    # newest impression it trained on
    trained = df.slice(600, 1920 - 192)
    assert new.encoder.snapshot.end == trained["timestamp"].dt.epoch("us").max() + 1 > base.encoder.snapshot.end
    assert new.metrics["encode"]["stats"]["stats"][0]["impressions"] == new.metrics["train"]["rows"]
