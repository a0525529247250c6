"""Rolling click statistics: each training row sees only strictly earlier rows, every other row (valid, test, served)
the snapshot at the end of training; both against a literal loop over the rows."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctrkit.data.encode import Encoder, EncoderError, _hash_buckets, _records, encode_files
from ctrkit.data.readers import read_frame
from ctrkit.data.rolling import STATS_FILE, as_of, features, totals
from ctrkit.schema import Schema, SchemaError, Stat, window_span

DAY = 86_400


def _literal_as_of(keys, times, labels, timed, window):
    imps, clicks = [], []
    for i in range(len(keys)):
        n = c = 0
        for j in range(len(keys)):
            if timed[i] and timed[j] and keys[j] == keys[i] and times[j] < times[i] and (
                    window is None or times[j] >= times[i] - window):
                n += 1
                c += labels[j]
        imps.append(n)
        clicks.append(c)
    return imps, clicks


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 12), st.integers(0, 1), st.booleans()),
                     max_size=40),
       window=st.one_of(st.none(), st.integers(1, 6)))
def test_as_of_counts_only_strictly_earlier_rows_of_the_same_key(rows, window):
    keys = np.array([r[0] for r in rows], np.int64)
    times = np.array([r[1] for r in rows], np.int64)
    labels = np.array([r[2] for r in rows], np.float32)
    timed = np.array([r[3] for r in rows], bool)
    imps, clicks = as_of(keys, times, labels, timed, window)
    want_imps, want_clicks = _literal_as_of(keys, times, labels, timed, window)
    assert imps.tolist() == want_imps
    assert clicks.tolist() == want_clicks


def test_as_of_literal_example():
    keys = np.array([0, 0, 1, 0, 0, 1])
    times = np.array([5, 1, 1, 5, 9, 3])
    labels = np.array([1, 1, 0, 0, 1, 1], np.float32)
    imps, clicks = as_of(keys, times, labels, np.ones(6, bool))
    # rows at the same time (0 and 3) never see each other's labels
    assert imps.tolist() == [1, 0, 0, 1, 3, 1]
    assert clicks.tolist() == [1, 0, 0, 1, 2, 0]
    imps, clicks = as_of(keys, times, labels, np.ones(6, bool), window=4)  # [t - 4, t)
    assert imps.tolist() == [1, 0, 0, 1, 2, 1]
    assert clicks.tolist() == [1, 0, 0, 1, 1, 0]


def test_as_of_with_times_too_far_apart_for_one_int64_key():
    """Four keys over times 2^61 apart: the (key, time) bisection falls back to time ranks, with the same answer."""
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 4, 60)
    times = rng.integers(0, 4, 60) * (1 << 61) + rng.integers(0, 3, 60)
    labels = rng.integers(0, 2, 60).astype(np.float32)
    timed = np.ones(60, bool)
    for window in (2, 1 << 61):
        imps, clicks = as_of(keys, times, labels, timed, window)
        want_imps, want_clicks = _literal_as_of(keys, times, labels, timed, window)
        assert imps.tolist() == want_imps and clicks.tolist() == want_clicks


def test_totals_and_features_literal():
    imps, clicks = totals(np.array([0, 2, 2, 2]), np.array([1, 2, 3, 4]), np.array([1, 0, 1, 1], np.float32),
                          np.array([True, True, True, False]), size=4, since=2)
    assert imps.tolist() == [0, 0, 2, 0] and clicks.tolist() == [0, 0, 1, 0]
    f = features(np.array([0, 10]), np.array([0.0, 5.0]), prior=10.0, rate=0.1)
    assert f[0, 0] == pytest.approx(math.log(0.1 / 0.9), abs=1e-6)  # no history: the training rate
    assert f[1, 0] == pytest.approx(math.log(0.3 / 0.7), abs=1e-6)  # (5 + 10 * 0.1) / (10 + 10)
    assert f[:, 1].tolist() == pytest.approx([0.0, math.log(11)])


def test_schema_stats_round_trip_and_errors():
    sch = Schema.from_dict({"label": "y", "time": "t", "fields": ["u", "i"], "crosses": [["u", "i"]],
                            "stats": ["u", {"field": "u_x_i", "window": "7d", "prior": 5}]})
    assert sch.stat_columns == ["u_ctr", "u_n", "u_x_i_ctr_7d", "u_x_i_n_7d"]
    again = Schema.from_yaml(sch.to_yaml())
    assert again.stats == sch.stats and again.fingerprint() == sch.fingerprint()
    assert Schema.from_dict({"label": "y", "time": "t", "fields": ["u", "i"]}).fingerprint() != sch.fingerprint()
    assert window_span("7d") == 7 * DAY * 1_000_000 and window_span("90") == 90
    base = {"label": "y", "time": "t", "fields": ["u", {"name": "h", "hash_buckets": 8},
                                                    {"name": "w", "hash_buckets": 1 << 25},
                                                    {"name": "x", "kind": "numeric"}, "x_ctr"]}
    for stats, said in [(["u"], "needs a `time` column"), (["x"], "not a categorical field"),
                        ([{"field": "w"}], "not a categorical field"), ([{"field": "u", "window": "7 days"}], "window"),
                        ([{"field": "u", "prior": 0}], "prior"), ([{"field": "u", "span": 3}], "unknown keys"),
                        (["u", "u"], "already a column"), ([3], "a field name or a mapping")]:
        data = dict(base, stats=stats)
        if said == "needs a `time` column":
            data.pop("time")
        with pytest.raises(SchemaError, match=said):
            Schema.from_dict(data)
    with pytest.raises(SchemaError, match="already a column"):
        Schema.from_dict({"label": "y", "time": "t", "fields": ["x", "x_ctr"], "stats": ["x"]})
    assert Stat("u", window=" 2h ").columns == ("u_ctr_2h", "u_n_2h")


# ---- end to end through the encoder -------------------------------------------------------------------

STATS = [Stat("user"), Stat("item", window="3d", prior=4.0)]


def _log(n: int, seed: int) -> pl.DataFrame:
    """A click log over 10 days whose users and items have their own rates; several rows share a minute; x is
    the row's number."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, 30, n)
    item = rng.integers(0, 12, n)
    p = 0.05 + 0.4 * (user % 4 == 0) + 0.2 * (item % 3 == 0)
    t = 1_700_000_000 + np.sort(rng.integers(0, 10 * DAY // 60, n)) * 60
    return pl.DataFrame({"user": [f"u{u}" for u in user], "item": [f"i{i}" for i in item],
                         "x": np.arange(n, dtype=float), "ts": t, "click": (rng.random(n) < p).astype(int)})


def _schema(min_count: int = 1, buckets: int | None = None) -> Schema:
    user = {"name": "user", "min_count": min_count} | ({"hash_buckets": buckets} if buckets else {})
    return Schema.from_dict({"label": "click", "time": "ts", "time_format": "epoch_s",
                             "fields": [user, "item",
                                        {"name": "x", "kind": "numeric", "transform": "none"}],
                             "stats": [s.to_dict() for s in STATS]})


def _reference(train: pl.DataFrame, rows: pl.DataFrame, as_of_own_time: bool, min_count: int,
               buckets: int | None = None) -> np.ndarray:
    """Unscaled stat features of ``rows`` by a loop over ``train``: each row's history before its own time, or
    the whole of training up to its end (within the window) for held-out rows. Values rarer than ``min_count``
    among the training users share one key, as the encoder's OOV id does; hashed users count per bucket."""
    kept = {u for u, n in train["user"].value_counts().iter_rows() if n >= min_count}
    if buckets:
        train = train.with_columns(pl.Series("user", _hash_buckets(train["user"], buckets)))
        rows = rows.with_columns(pl.Series("user", _hash_buckets(rows["user"], buckets)))
        kept = set(train["user"])
    rate = train["click"].mean()
    end = train["ts"].max() + 1
    out = []
    for r in rows.iter_rows(named=True):
        row = []
        for s in STATS:
            span = window_span(s.window) // 1_000_000 if s.window else None
            t = r["ts"] if as_of_own_time else end
            key = (lambda v: v if v in kept else None) if s.field == "user" else (lambda v: v)
            n = c = 0
            for h in train.iter_rows(named=True):
                if key(h[s.field]) == key(r[s.field]) and h["ts"] < t and (span is None or h["ts"] >= t - span):
                    n += 1
                    c += h["click"]
            p = (c + s.prior * rate) / (n + s.prior)
            row += [math.log(p / (1 - p)), math.log1p(n)]
        out.append(row)
    return np.array(out)


def _unscale(enc: Encoder, dense: np.ndarray) -> np.ndarray:
    cols = enc.schema.stat_columns
    mean = np.array([enc.moments[c][0] for c in cols])
    std = np.array([enc.moments[c][1] for c in cols])
    return np.asarray(dense[:, -len(cols):], np.float64) * std + mean


@pytest.mark.parametrize("split, buckets", [("given", None), ("time", None), ("random", None), ("time", 7)])
def test_training_rows_see_their_past_and_held_out_rows_the_snapshot(tmp_path, split, buckets):
    log, test = _log(400, 1), _log(60, 2).with_columns(pl.col("ts") + 20 * DAY)
    log.write_csv(tmp_path / "log.csv")
    test.write_csv(tmp_path / "test.csv")
    kwargs = {"valid": tmp_path / "test.csv"} if split == "given" else {"split": split, "valid_fraction": 0.2}
    res = encode_files(_schema(min_count=2, buckets=buckets), tmp_path / "log.csv", tmp_path / "enc",
                       test=tmp_path / "test.csv", seed=3, **kwargs)
    enc = res.encoder
    assert enc.dense_names == ["x", "user_ctr", "user_n", "item_ctr_3d", "item_n_3d"]
    if split == "given":
        train = log
    else:  # x is the row's number (kept as it is), so the held-out rows are known
        rows = np.asarray(res.data["train"].dense[:, 0]).astype(int)
        assert len(rows) + len(res.data["valid"].label) == log.height
        train = log[rows]
        valid_rows = log[np.asarray(res.data["valid"].dense[:, 0]).astype(int)]
        assert valid_rows.height > 50
        np.testing.assert_allclose(_unscale(enc, res.data["valid"].dense),
                                   _reference(train, valid_rows, False, 2, buckets), atol=2e-5)
    for got, rows, own_time in ((res.data["train"], train, True), (res.data["test"], test, False)):
        np.testing.assert_allclose(_unscale(enc, got.dense), _reference(train, rows, own_time, 2, buckets), atol=2e-5)
    # the training rows' columns are standardized with their own moments
    assert np.abs(np.asarray(res.data["train"].dense[:, 1:]).mean(axis=0)).max() < 1e-4


def test_saved_encoder_serves_the_snapshot_the_test_split_was_encoded_with(tmp_path):
    log, test = _log(300, 4), _log(50, 5).with_columns(pl.col("ts") + 20 * DAY)
    res = encode_files(_schema(), log, tmp_path / "enc", test=test)
    res.encoder.save(tmp_path / "saved")
    assert (tmp_path / "saved" / STATS_FILE).exists()
    enc = Encoder.load(tmp_path / "saved")
    ids, dense = enc.transform_frame(read_frame(test, enc.schema)[0])
    np.testing.assert_array_equal(dense, res.data["test"].dense)
    np.testing.assert_array_equal(ids, res.data["test"].ids)
    if _records is not None:  # the compiled path of a request gives the same values
        plain = enc.encode_records(test.drop("click", "ts").to_dicts())
        assert plain is not None
        np.testing.assert_array_equal(plain[1], dense)
    meta = json.loads((tmp_path / "saved" / "encoder.json").read_text())
    last = log["ts"][np.asarray(res.data["train"].dense[:, 0]).astype(int)].max()
    assert meta["snapshot"]["end"] == last * 1_000_000 + 1  # the instant after the latest training row
    (tmp_path / "saved" / STATS_FILE).unlink()
    with pytest.raises(EncoderError, match="stats.parquet is missing"):
        Encoder.load(tmp_path / "saved")


def test_a_row_without_a_time_neither_gets_nor_gives_history(tmp_path):
    log = pl.DataFrame({"user": ["a"] * 4, "item": ["i"] * 4, "x": [0.0] * 4,
                        "ts": [1_700_000_000, None, 1_700_000_100, 1_700_000_200], "click": [1, 1, 0, 1]})
    res = encode_files(_schema(), log, tmp_path / "enc", valid=log.head(1))
    got = _unscale(res.encoder, res.data["train"].dense)
    n_user = np.expm1(got[:, 1]).round().astype(int).tolist()
    assert n_user == [0, 0, 1, 2]


def test_a_bundle_serves_the_test_figures_of_its_run(tmp_path):
    from sklearn.metrics import roc_auc_score

    import ctrkit
    from ctrkit.serve.bundle import Bundle

    log, test = _log(1500, 6), _log(300, 7).with_columns(pl.col("ts") + 11 * DAY)
    log.write_csv(tmp_path / "train.csv")
    test.write_csv(tmp_path / "test.csv")
    _schema().save(tmp_path / "schema.yaml")
    run = ctrkit.train(tmp_path / "train.csv", schema=tmp_path / "schema.yaml", test=tmp_path / "test.csv",
                       model="lr", epochs=2, out=tmp_path / "run", progress=False)
    recorded = run.metrics["encode"]["stats"]
    assert [s["columns"] for s in recorded["stats"]] == [list(s.columns) for s in STATS]
    assert recorded["stats"][0]["impressions"] == run.metrics["train"]["rows"]  # all history, every row timed
    bundle = Bundle.load(tmp_path / "run" / "bundle")
    served = bundle.predict(test.drop("click"))
    np.testing.assert_array_equal(served, bundle.predict(test.drop("click", "ts").to_dicts()))
    assert roc_auc_score(test["click"], served) == pytest.approx(run.metrics["test"]["auc"], abs=1e-12)
    assert "Rolling statistics" in (tmp_path / "run" / "report.html").read_text()
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from ctrkit.serve.app import ServerConfig, create_app

    records = test.drop("click", "ts").head(60).to_dicts()
    with TestClient(create_app(ServerConfig(bundle=tmp_path / "run" / "bundle"))) as client:
        r = client.post("/score", json={"records": records})  # the server's JSON path reads the same snapshot
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["pctr"], served[:60], atol=1e-7)


def _counts_by_id(enc: Encoder, field: str, rows: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Impressions and clicks of each id of ``field`` over ``rows`` by a loop (values outside the vocabulary at
    the OOV id, 1)."""
    ids = {v: k + 2 for k, v in enumerate(enc.vocab[field].to_list())}
    imps, clicks = np.zeros(enc.sizes[field], np.int64), np.zeros(enc.sizes[field])
    for r in rows.iter_rows(named=True):
        k = ids.get(r[field], 1)
        imps[k] += 1
        clicks[k] += r["click"]
    return imps, clicks


def test_rolling_forward_adds_newer_rows_and_recounts_each_window(tmp_path):
    log = _log(600, 8)
    cut = log["ts"][400]
    old, newer = log.filter(pl.col("ts") < cut), log.filter(pl.col("ts") >= cut)
    enc = encode_files(_schema(), old, tmp_path / "enc", valid=old.head(5)).encoder
    overlap = pl.concat([old.tail(30), newer])  # rows already counted come again: the all-history stat skips them
    rolled, changes = enc.rolled(overlap)
    assert rolled is not enc and enc.snapshot.end == old["ts"].max() * 1_000_000 + 1
    end = log["ts"].max() * 1_000_000 + 1
    assert rolled.snapshot.end == end
    user, item = STATS
    np.testing.assert_array_equal(np.stack(rolled.snapshot.tables[user]), np.stack(_counts_by_id(enc, "user", log)))
    in_window = log.filter(pl.col("ts") * 1_000_000 >= end - window_span(item.window))
    np.testing.assert_array_equal(np.stack(rolled.snapshot.tables[item]),
                                  np.stack(_counts_by_id(enc, "item", in_window)))
    assert changes[0] == {"columns": list(user.columns), "rows_added": newer.height, "newcomers": 0}
    assert changes[1]["rows_in_window"] == in_window.height and "warning" not in changes[1]
    late = newer.filter(pl.col("ts") * 1_000_000 >= end - window_span(item.window) // 2)
    assert "not counted" in enc.rolled(late)[1][1]["warning"]  # the data starts inside the window
    # the rolled encoder serves its new counts; the vocabularies and scaling are the same objects
    assert rolled.vocab is enc.vocab and rolled.moments is enc.moments
    typed = read_frame(newer.head(50), enc.schema)[0]
    assert not np.array_equal(rolled.transform_frame(typed)[1], enc.transform_frame(typed)[1])
    plain = Encoder(Schema.from_dict({"label": "click", "fields": ["user"]})).fit(old)
    with pytest.raises(EncoderError, match="no stats"):
        plain.rolled(newer)


def test_ctrkit_refresh_writes_a_new_bundle_version(tmp_path):
    from typer.testing import CliRunner

    import ctrkit
    from ctrkit.cli import app
    from ctrkit.serve.bundle import Bundle

    log = _log(1200, 9)
    old = log.head(900)
    newer = log.tail(300).with_columns(pl.when(pl.int_range(pl.len()) % 6 == 0).then(pl.lit("fresh"))
                                       .otherwise(pl.col("user")).alias("user"))  # a user new since training
    old.write_csv(tmp_path / "old.csv")
    newer.write_csv(tmp_path / "newer.csv")
    _schema().save(tmp_path / "schema.yaml")
    ctrkit.train(tmp_path / "old.csv", schema=tmp_path / "schema.yaml", model="lr", epochs=1, out=tmp_path / "run",
                 progress=False)
    bundle = tmp_path / "run" / "bundle"
    res = CliRunner().invoke(app, ["refresh", str(bundle), str(tmp_path / "newer.csv"), "--out",
                                   str(tmp_path / "v2")])
    assert res.exit_code == 0, res.output
    assert "user_ctr" in res.output and "300 added" in res.output
    v1, v2 = Bundle.load(bundle), Bundle.load(tmp_path / "v2")
    assert v2.info["version"] == 2 and v2.info["parent"] == str(bundle)
    r = v2.metrics["stats_refresh"]
    assert r["rows"] == 300 and r["as_of"] == log["ts"].max() * 1_000_000 + 1
    probe = newer.drop("click").head(40)
    assert not np.allclose(v1.predict(probe), v2.predict(probe))
    fresh = newer.filter(pl.col("user") == "fresh").drop("click", "ts").head(5)
    served = v2.predict(fresh.to_dicts())  # the compiled path leaves a newcomer's rows to the frame path
    np.testing.assert_array_equal(served, v2.predict(fresh))
    assert not np.allclose(served, v1.predict(fresh))  # the new user's own clicks, not the training rate
    if importlib.util.find_spec("fastapi") is not None:  # the server hands the compiled body to the frame path
        from fastapi.testclient import TestClient

        from ctrkit.serve.app import ServerConfig, create_app

        with TestClient(create_app(ServerConfig(bundle=tmp_path / "v2"))) as client:
            r = client.post("/score", json={"records": fresh.to_dicts()})
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(r.json()["pctr"], served, atol=1e-7)
    res = CliRunner().invoke(app, ["refresh", str(bundle), str(tmp_path / "newer.csv"), "--out", str(bundle)])
    assert res.exit_code != 0 and "is the bundle itself" in res.output
    res = CliRunner().invoke(app, ["refresh", str(bundle), str(tmp_path / "nope.csv"), "--out", str(tmp_path / "v3")])
    assert res.exit_code != 0 and "nope.csv" in res.output


@pytest.mark.parametrize("min_count", [1, 2])
def test_values_new_since_training_count_by_themselves_where_training_pooled_none(tmp_path, min_count):
    log = _log(400, 10)
    old = log.head(300)
    newer = log.tail(100).with_columns(pl.when(pl.int_range(pl.len()) < 60).then(pl.lit("new-user"))
                                       .otherwise(pl.col("user")).alias("user"))
    enc = encode_files(_schema(min_count), old, tmp_path / "enc", valid=old.head(5)).encoder
    rolled, changes = enc.rolled(newer)
    user = STATS[0]
    oov_before, oov_after = enc.snapshot.tables[user][0][1], rolled.snapshot.tables[user][0][1]
    new = newer.head(60)
    if min_count == 2:  # rare users were pooled at the OOV id in training: new ones join them
        assert oov_after - oov_before == 60 and not rolled.snapshot.newcomers
        return
    # min_count 1: every training value had its own history, so the new user gets one too, read by its value
    assert oov_after == oov_before == 0 and changes[0]["newcomers"] == 1
    counts = rolled.snapshot.newcomers[user].row(0, named=True)
    assert counts == {"value": "new-user", "impressions": 60, "clicks": float(new["click"].sum())}
    probe = new.head(3).drop("click", "ts")
    _, dense = rolled.transform_frame(read_frame(new.head(3), rolled.schema)[0])
    want = features(np.array([60]), np.array([float(new["click"].sum())]), user.prior, rolled.snapshot.rate)[0]
    np.testing.assert_allclose(_unscale(rolled, dense)[:, :2], np.tile(want, (3, 1)), atol=2e-5)
    assert rolled.encode_records(probe.to_dicts()) is None  # the compiled path keeps no raw value: frames serve
    assert rolled.encode_records(newer.tail(5).drop("click", "ts").to_dicts()) is not None or _records is None
    rolled.save(tmp_path / "saved")
    again = Encoder.load(tmp_path / "saved")
    assert again.snapshot.newcomers[user].equals(rolled.snapshot.newcomers[user])
    rolled_twice, changes = again.rolled(new.with_columns(pl.col("ts") + 20 * DAY))  # counted on, by value
    assert rolled_twice.snapshot.newcomers[user].row(0, named=True)["impressions"] == 120


def test_a_hashed_field_rolls_forward_per_bucket(tmp_path):
    log = _log(500, 11)
    old, newer = log.head(350), log.tail(150)
    enc = encode_files(_schema(buckets=5), old, tmp_path / "enc", valid=old.head(5)).encoder
    rolled, changes = enc.rolled(newer)
    bucket = _hash_buckets(log["user"], 5)
    assert changes[0]["rows_added"] == 150
    np.testing.assert_array_equal(rolled.snapshot.tables[STATS[0]][0], np.bincount(bucket, minlength=6))
    np.testing.assert_array_equal(rolled.snapshot.tables[STATS[0]][1],
                                  np.bincount(bucket, weights=log["click"].to_numpy(), minlength=6))


def test_refresh_reads_the_servers_event_log(tmp_path):
    """`ctrkit serve` logs each impression at the time it served it and the clicks after: a refresh counts them as
    rows of the bundle's schema, whose time column is not the log's `timestamp`."""
    import ctrkit
    from ctrkit.pipeline import refresh_stats
    from ctrkit.serve.events import EventLog

    log = _log(700, 12)
    old, served = log.head(500), log.tail(200)
    ctrkit.train(old, schema=_schema(), model="lr", epochs=1, out=tmp_path / "run", progress=False)
    events = []
    for i, r in enumerate(served.to_dicts()):
        record = {k: v for k, v in r.items() if k not in ("click", "ts")}
        events.append({**record, "event_id": f"i{i}", "kind": "impression", "impression_id": f"i{i}",
                       "request_id": f"r{i}", "position": 1, "timestamp": float(r["ts"])})
        if r["click"]:
            events.append({"event_id": f"c{i}", "kind": "click", "impression_id": f"i{i}",
                           "timestamp": float(r["ts"]) + 5.0})
    with EventLog(tmp_path / "events") as sink:
        sink.append(events)
    from_log = refresh_stats(tmp_path / "run" / "bundle", tmp_path / "events", tmp_path / "v2")
    from_rows = refresh_stats(tmp_path / "run" / "bundle", served, tmp_path / "v2b")
    for st in STATS:
        np.testing.assert_array_equal(np.stack(from_log.encoder.snapshot.tables[st]),
                                      np.stack(from_rows.encoder.snapshot.tables[st]))
    assert from_log.metrics["stats_refresh"]["rows"] == 200
