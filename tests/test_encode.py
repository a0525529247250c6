"""Encoder: exact ids on a literal example, fit on train only, persistence, encode_files splits and streaming."""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctrkit.data.dataset import EncodedData
from ctrkit.data.encode import MISSING, OOV, Encoder, EncoderError, _numeric, encode_files
from ctrkit.data.readers import read_frame
from ctrkit.data.synth import make_click_log, synth_schema
from ctrkit.schema import Field, Schema

SCHEMA = Schema(fields=[
    Field("c"),
    Field("d", min_count=2),
    Field("h", hash_buckets=4),
    Field("x", kind="numeric"),
    Field("b", kind="numeric", transform="bucketize", n_buckets=4),
], label="y")

TRAIN = pl.DataFrame({
    "c": ["a", "b", "a", None, "c", "a", "b", ""],
    "d": ["x", "y", "x", "z", "y", "x", "w", "w"],
    "h": ["a", "b", "c", None, "", "a", "b", "c"],
    "x": [0.0, 1.0, 3.0, 7.0, None, 0.0, 1.0, 3.0],
    "b": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
    "y": [1, 0, 1, 0, 1, 0, 1, 0],
})


def _fit() -> Encoder:
    return Encoder(SCHEMA).fit(TRAIN)


def test_literal_example_exact_ids():
    enc = _fit()
    # c: missing 0, OOV 1, then a (3), b (2), c (1); d: x (3), then w and y (2 each, by value); z is rare -> OOV
    assert enc.vocab["c"].to_list() == ["a", "b", "c"]
    assert enc.vocab["d"].to_list() == ["x", "w", "y"]
    assert enc.sparse_names == ["c", "d", "h", "b"] and enc.dense_names == ["x"]
    assert enc.field_sizes() == [5, 5, 5, 5]
    assert enc.offsets == {"c": 0, "d": 5, "h": 10, "b": 15}
    assert enc.n_ids == 20
    np.testing.assert_allclose(enc.boundaries["b"], [2.75, 4.5, 6.25])
    frame, _ = read_frame(TRAIN, SCHEMA)
    ids, dense = enc.transform_frame(frame)
    # crc32("a") % 4 + 1 == 4, crc32("b") % 4 + 1 == 2, crc32("c") % 4 + 1 == 4: pinned, they never change
    expected = np.array([
        [2, 5 + 2, 10 + 4, 15 + 1],
        [3, 5 + 4, 10 + 2, 15 + 1],
        [2, 5 + 2, 10 + 4, 15 + 2],
        [0, 5 + 1, 10 + 0, 15 + 2],
        [4, 5 + 4, 10 + 0, 15 + 3],
        [2, 5 + 2, 10 + 4, 15 + 3],
        [3, 5 + 3, 10 + 2, 15 + 4],
        [0, 5 + 3, 10 + 4, 15 + 4],
    ], dtype=np.int32)
    np.testing.assert_array_equal(ids, expected)
    assert ids.dtype == np.int32 and dense.dtype == np.float32
    k = np.array([0, 1, 2, 3, 0, 1, 2])  # log1p(x) / log(2) for the present values
    mean, std = k.mean() * np.log(2), k.std() * np.log(2)
    want = (np.log1p(np.array([0, 1, 3, 7, np.nan, 0, 1, 3])) - mean) / std
    np.testing.assert_allclose(dense[:, 0], want.astype(np.float32), rtol=1e-5, equal_nan=True)


def test_unseen_and_missing_values():
    enc = _fit()
    frame, _ = read_frame(pl.DataFrame({"c": ["zzz", None, ""], "d": ["z", "w", None], "h": ["q", "", None],
                                        "x": [None, 1.0, 2.0], "b": [None, 100.0, -5.0], "y": [0, 0, 0]}), SCHEMA)
    ids, dense = enc.transform_frame(frame)
    assert ids[:, 0].tolist() == [OOV, MISSING, MISSING]
    assert ids[:, 1].tolist() == [5 + OOV, 5 + 3, 5 + MISSING]
    assert ids[:, 2].tolist() == [10 + 4, 10 + MISSING, 10 + MISSING]
    assert ids[:, 3].tolist() == [15 + MISSING, 15 + 4, 15 + 1]
    assert np.isnan(dense[0, 0]) and not np.isnan(dense[1, 0])


def test_unseen_flags_the_rows_of_an_out_of_vocabulary_value_per_field():
    """Cold-start rows: a value never seen ("zzz") or rarer than min_count ("z"); missing is not unseen, and the
    hashed field ``h`` and the bucketized ``b`` have no vocabulary to miss."""
    enc = _fit()
    frame, _ = read_frame(pl.DataFrame({"c": ["zzz", None, "a", "b"], "d": ["z", "w", None, "q"],
                                        "h": ["q", "", None, "a"], "x": [None, 1.0, 2.0, 3.0],
                                        "b": [None, 100.0, -5.0, 2.0], "y": [0, 0, 0, 1]}), SCHEMA)
    ids, _ = enc.transform_frame(frame)
    got = {name: mask.tolist() for name, mask in enc.unseen(ids)}
    assert got == {"c": [True, False, False, False], "d": [True, False, False, True]}


def test_save_load_round_trip(tmp_path):
    enc = _fit()
    enc.save(tmp_path / "enc")
    back = Encoder.load(tmp_path / "enc")
    frame, _ = read_frame(TRAIN, SCHEMA)
    for a, b in zip(enc.transform_frame(frame), back.transform_frame(frame)):
        np.testing.assert_array_equal(a, b)
    assert back.fingerprint() == enc.fingerprint() and back.field_sizes() == enc.field_sizes()
    assert back.counts["c"].tolist() == [3, 2, 1]


def test_saved_encoder_gives_the_same_ids_in_another_process(tmp_path):
    enc = _fit()
    enc.save(tmp_path / "enc")
    TRAIN.write_parquet(tmp_path / "t.parquet")
    code = ("import sys, numpy as np; from ctrkit.data.encode import Encoder; from ctrkit.data.readers import read_frame;"
            "e = Encoder.load(sys.argv[1]); f, _ = read_frame(sys.argv[2], e.schema);"
            "np.save(sys.argv[3], e.transform_frame(f)[0])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "enc"), str(tmp_path / "t.parquet"),
                    str(tmp_path / "ids.npy")], check=True)
    frame, _ = read_frame(TRAIN, SCHEMA)
    np.testing.assert_array_equal(np.load(tmp_path / "ids.npy"), enc.transform_frame(frame)[0])


def test_load_checks_files(tmp_path):
    with pytest.raises(EncoderError, match="no encoder.json"):
        Encoder.load(tmp_path)
    enc = _fit()
    enc.save(tmp_path / "enc")
    meta = json.loads((tmp_path / "enc" / "encoder.json").read_text())
    meta["sizes"]["c"] = 9
    (tmp_path / "enc" / "encoder.json").write_text(json.dumps(meta))
    with pytest.raises(EncoderError, match="'c'"):
        Encoder.load(tmp_path / "enc")
    with pytest.raises(EncoderError, match="not fitted"):
        Encoder(SCHEMA).field_sizes()


def _write_csv(df: pl.DataFrame, path: Path) -> Path:
    df.with_columns(pl.col(pl.Datetime).dt.strftime("%Y-%m-%dT%H:%M:%S%.fZ")).write_csv(path)
    return path


@pytest.fixture(scope="module")
def log_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("log")
    df, _ = make_click_log(n_rows=6000, n_users=800, n_items=300, seed=5)
    df = df.drop("p_click")
    return {"all": _write_csv(df, d / "all.csv"), "train": _write_csv(df[:5000], d / "train.csv"),
            "valid": _write_csv(df[5000:], d / "valid.csv"), "frame": df}


def test_fit_only_on_train(log_files, tmp_path):
    s = synth_schema()
    res = encode_files(s, log_files["train"], tmp_path / "out", valid=log_files["valid"])
    enc = res.encoder
    train_users = set(log_files["frame"][:5000]["user_id"].to_list())
    valid_only = set(log_files["frame"][5000:]["user_id"].to_list()) - train_users
    assert valid_only, "the fixture should have users seen only in validation"
    assert not valid_only & set(enc.vocab["user_id"].to_list())
    assert enc.train_rows == 5000 and len(res.data["train"]) == 5000 and len(res.data["valid"]) == 1000
    valid_frame, _ = read_frame(log_files["valid"], s)
    ids, _ = enc.transform_frame(valid_frame)
    np.testing.assert_array_equal(np.asarray(res.data["valid"].ids), ids)
    # training rows take the dense-index path inside encode_files: the same ids as a plain transform
    train_frame, _ = read_frame(log_files["train"], s)
    np.testing.assert_array_equal(np.asarray(res.data["train"].ids), enc.transform_frame(train_frame)[0])
    col = enc.sparse_names.index("user_id")
    is_new = valid_frame["user_id"].is_in(list(valid_only)).to_numpy()
    assert (ids[is_new, col] == enc.offsets["user_id"] + OOV).all()
    assert res.rows == 6000 and res.reports["valid"].rows == 1000


def test_time_split_holds_out_the_latest_rows(log_files, tmp_path):
    s = synth_schema()
    res = encode_files(s, log_files["all"], tmp_path / "out", valid_fraction=0.2)
    assert len(res.data["train"]) + len(res.data["valid"]) == 6000
    assert abs(len(res.data["valid"]) - 1200) <= 2
    assert res.encoder.train_rows == len(res.data["train"])
    # the held-out rows are the last ones in time: their labels are the tail of the file's
    labels = log_files["frame"]["click"].to_numpy().astype(np.float32)
    np.testing.assert_array_equal(np.asarray(res.data["valid"].label), labels[-len(res.data["valid"]):])


def test_time_split_keeps_rows_without_a_time_in_training(log_files, tmp_path):
    s = synth_schema()
    gap = pl.int_range(pl.len()) % 10 == 3  # 600 rows without a time, marked by a user of their own
    df = log_files["frame"].with_columns(pl.when(gap).then(None).otherwise(pl.col(s.time)).alias(s.time),
                                         pl.when(gap).then(pl.lit("no-time")).otherwise(pl.col("user_id"))
                                         .alias("user_id"))
    res = encode_files(s, _write_csv(df, tmp_path / "gaps.csv"), tmp_path / "out", valid_fraction=0.2)
    assert len(res.data["train"]) + len(res.data["valid"]) == 6000 and res.reports["train"].bad_rows == 0
    # the cut is the 80% quantile of the times there are
    times = df[s.time].drop_nulls().dt.epoch("us").to_numpy()
    assert len(res.data["valid"]) == int((times >= np.quantile(times, 0.8)).sum())
    enc = res.encoder
    no_time = enc.offsets["user_id"] + 2 + enc.vocab["user_id"].to_list().index("no-time")
    col = enc.sparse_names.index("user_id")
    assert (np.asarray(res.data["train"].ids)[:, col] == no_time).sum() == 600
    assert (np.asarray(res.data["valid"].ids)[:, col] == no_time).sum() == 0


def test_time_split_without_any_time_says_so(log_files, tmp_path):
    s = synth_schema()
    df = log_files["frame"].with_columns(pl.lit(None, pl.String).alias(s.time))
    with pytest.raises(EncoderError, match=f"no row has a value in the time field '{s.time}'"):
        encode_files(s, _write_csv(df, tmp_path / "none.csv"), tmp_path / "out", valid_fraction=0.2)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.one_of(st.none(), st.integers(-2**52, 2**52), st.integers(0, 6)), max_size=40),
                min_size=1, max_size=5),
       st.floats(0, 1), st.integers(1, 30))
def test_kth_in_bounded_memory_equals_numpy(columns, q, in_memory):
    import ctrkit.data.encode as encode

    series = [pl.Series(c, dtype=pl.Int64) for c in columns]
    values = np.array([v for c in columns for v in c if v is not None], dtype=np.int64)
    if len(values) == 0:
        return
    k = int(q * (len(values) - 1))
    old, encode._SELECT_IN_MEMORY = encode._SELECT_IN_MEMORY, in_memory  # forces the binning passes
    try:
        got = encode._kth(lambda: iter(series), k)
    finally:
        encode._SELECT_IN_MEMORY = old
    assert got == int(np.partition(values, k)[k])


@pytest.mark.parametrize("times", [[5] * 100, [1] * 50 + [2] * 50, list(range(95)) + [95] * 5, [3, None] * 50])
def test_time_split_holds_out_exactly_the_fraction_even_with_ties(times, tmp_path):
    n = len(times)
    df = pl.DataFrame({"a": [str(i % 7) for i in range(n)], "click": [i % 2 for i in range(n)],
                       "ts": pl.Series(times, dtype=pl.Int64)})
    s = Schema(fields=[Field(name="a")], label="click", time="ts")
    res = encode_files(s, df, tmp_path / "out", valid_fraction=0.1)
    timed = sum(t is not None for t in times)
    assert len(res.data["valid"]) == round(timed * 0.1)
    assert len(res.data["train"]) == n - round(timed * 0.1)


def test_random_split_is_seeded(log_files, tmp_path):
    s = Schema(fields=synth_schema().fields, label="click")
    a = encode_files(s, log_files["all"], tmp_path / "a", valid_fraction=0.25, seed=1)
    b = encode_files(s, log_files["all"], tmp_path / "b", valid_fraction=0.25, seed=1)
    c = encode_files(s, log_files["all"], tmp_path / "c", valid_fraction=0.25, seed=2)
    assert 1300 < len(a.data["valid"]) < 1700
    np.testing.assert_array_equal(np.asarray(a.data["valid"].ids), np.asarray(b.data["valid"].ids))
    assert len(c.data["valid"]) != len(a.data["valid"]) or not np.array_equal(
        np.asarray(a.data["valid"].ids), np.asarray(c.data["valid"].ids))


def test_streaming_in_small_blocks_gives_the_same_result(log_files, tmp_path):
    s = synth_schema()
    s.fields.append(Field("user_activity_b", kind="numeric", transform="bucketize", n_buckets=5))
    df = log_files["frame"].with_columns(pl.col("user_activity").alias("user_activity_b"))
    s.fields[0] = Field("user_id", hash_buckets=97)
    path = _write_csv(df, tmp_path / "all.csv")
    one = encode_files(s, path, tmp_path / "one", valid_fraction=0.1)
    many = encode_files(s, path, tmp_path / "many", valid_fraction=0.1, block_bytes=20_000)
    assert one.encoder.n_ids == many.encoder.n_ids
    for k in ("train", "valid"):
        np.testing.assert_array_equal(np.asarray(one.data[k].ids), np.asarray(many.data[k].ids))
        np.testing.assert_allclose(np.asarray(one.data[k].dense), np.asarray(many.data[k].dense), rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(one.data[k].label), np.asarray(many.data[k].label))


@pytest.mark.parametrize("valid", [None, "valid"])
def test_parts_spilled_to_disk_give_the_same_datasets(log_files, tmp_path, monkeypatch, valid):
    import ctrkit.data.encode as encode

    s = synth_schema()  # with a time field: without `valid` the parts are rewritten once the cutoff is known
    kw = {"valid": log_files[valid]} if valid else {"valid_fraction": 0.2}
    held = encode_files(s, log_files["train"], tmp_path / "held", **kw)
    monkeypatch.setattr(encode, "HOLD_BYTES", 0)
    monkeypatch.setattr(encode, "_SELECT_IN_MEMORY", 100)  # the time cut is found by binning passes over files
    spilled = encode_files(s, log_files["train"], tmp_path / "spilled", block_bytes=50_000, **kw)
    for k in ("train", "valid"):
        for a in ("ids", "dense", "label"):
            np.testing.assert_array_equal(np.asarray(getattr(held.data[k], a)), np.asarray(getattr(spilled.data[k], a)))
    assert not [p for p in (tmp_path / "spilled").iterdir() if p.name.startswith("ctrkit-enc-")]


@pytest.mark.parametrize("hold", [None, 0])
def test_training_rows_completed_in_place_equal_a_plain_transform(tmp_path, monkeypatch, hold):
    """Every field kind (vocabulary, hashed, bucketized, dense) written by the fit pass and completed after it
    gives bit-identical ids and dense values to encoding the rows with the finished encoder."""
    import ctrkit.data.encode as encode

    rng = np.random.default_rng(3)
    n = 600

    def frame() -> pl.DataFrame:
        words = np.array(["a", "b", "c", "d", "e", "", "zz"])
        return pl.DataFrame({
            "c": rng.choice(words, n), "d": rng.choice(words[:4], n), "h": rng.choice(words, n),
            "x": np.where(rng.random(n) < 0.1, np.nan, rng.lognormal(0, 2, n)),
            "b": rng.normal(0, 3, n).round(2), "y": rng.integers(0, 2, n)}).with_columns(
            pl.col("x").fill_nan(None))

    frame().write_csv(tmp_path / "train.csv")
    frame().write_csv(tmp_path / "valid.csv")
    if hold is not None:
        monkeypatch.setattr(encode, "HOLD_BYTES", hold)
    res = encode_files(SCHEMA, tmp_path / "train.csv", tmp_path / "out", valid=tmp_path / "valid.csv",
                       block_bytes=2_000)
    for k in ("train", "valid"):
        rows, _ = read_frame(tmp_path / f"{k}.csv", SCHEMA)
        ids, dense = res.encoder.transform_frame(rows)
        np.testing.assert_array_equal(np.asarray(res.data[k].ids), ids)
        np.testing.assert_array_equal(np.asarray(res.data[k].dense), dense)
        np.testing.assert_array_equal(np.asarray(res.data[k].label), rows["y"].to_numpy())
    assert len(np.unique(np.asarray(res.data["train"].ids)[:, 3])) > 3  # the bucketized field was binned


def test_encode_files_matches_transform_and_writes_bad_rows(log_files, tmp_path):
    text = Path(log_files["valid"]).read_text().splitlines()
    text.insert(5, "garbage,line")
    bad_valid = tmp_path / "valid.csv"
    bad_valid.write_text("\n".join(text) + "\n")
    s = synth_schema()
    res = encode_files(s, log_files["train"], tmp_path / "out", valid=bad_valid, test=log_files["valid"],
                       bad_rows=tmp_path / "bad.tsv")
    assert res.reports["valid"].bad_rows == 1 and res.reports["valid"].rows == 1001
    assert (tmp_path / "bad_valid.tsv").read_text().count("\n") == 2  # the header and the row
    assert not (tmp_path / "bad.tsv").exists()
    np.testing.assert_array_equal(np.asarray(res.data["valid"].ids), np.asarray(res.data["test"].ids))
    assert EncodedData.open(tmp_path / "out" / "test").meta["report"]["rows"] == 1000
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith("ctrkit-enc-")]


def test_group_ids_are_stable(log_files):
    s = synth_schema()
    frame, _ = read_frame(log_files["valid"], s)
    enc = Encoder(s).fit(frame)
    g = enc.group_ids(frame)
    assert g is not None and g.dtype == np.int64
    same = frame["user_id"].to_numpy()
    assert len(set(zip(same.tolist(), g.tolist()))) == frame["user_id"].n_unique()


def test_encode_files_literal_ids_for_unseen_and_empty_values(tmp_path):
    """Values never seen in training are OOV and empty ones missing, even where training had no empty value."""
    schema = Schema(fields=[Field("c"), Field("d", min_count=2)], label="y")
    (tmp_path / "train.csv").write_text("c,d,y\na,x,1\nb,x,0\na,w,1\n")
    (tmp_path / "valid.csv").write_text("c,d,y\na,x,0\n,,1\nz,w,0\nb,q,1\n")
    res = encode_files(schema, tmp_path / "train.csv", tmp_path / "out", valid=tmp_path / "valid.csv")
    # c: a=2 (count 2), b=3; offsets c 0, d 4 (c has 2 + 2 ids); d: x=2, w below min_count -> OOV
    np.testing.assert_array_equal(np.asarray(res.data["train"].ids), [[2, 6], [3, 6], [2, 5]])
    np.testing.assert_array_equal(np.asarray(res.data["valid"].ids),
                                  [[2, 6], [MISSING, 4 + MISSING], [OOV, 4 + OOV], [3, 4 + OOV]])
    # the returned encoder (its lookup tables built from the vocabulary alone) agrees
    frame, _ = read_frame(tmp_path / "valid.csv", schema)
    np.testing.assert_array_equal(res.encoder.transform_frame(frame)[0], np.asarray(res.data["valid"].ids))


def test_no_training_rows(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("c,d,h,x,b,y\na,b,c,1,2,7\n")
    with pytest.raises(EncoderError, match="no training rows"):
        encode_files(SCHEMA, path, tmp_path / "out", valid=path)
    # the training dataset the fit pass had begun is not left half written
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


TEXT = st.one_of(st.none(), st.text(max_size=12), st.sampled_from(["a", "b", "", " ", "é", "日本", "\x00"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(train=st.lists(TEXT, min_size=1, max_size=40), other=st.lists(TEXT, min_size=1, max_size=40),
       min_count=st.integers(1, 3), buckets=st.sampled_from([None, 1, 7]))
def test_any_strings_get_ids_in_their_field_range(train, other, min_count, buckets):
    schema = Schema(fields=[Field("v", min_count=min_count, hash_buckets=buckets), Field("w")], label="y")
    fit = pl.DataFrame({"v": train, "w": ["k"] * len(train), "y": [0] * len(train)},
                       schema={"v": pl.String, "w": pl.String, "y": pl.Int64})
    enc = Encoder(schema).fit(fit)
    values = train + other
    frame, _ = read_frame(pl.DataFrame({"v": values, "w": ["k"] * len(values), "y": [1] * len(values)},
                                       schema={"v": pl.String, "w": pl.String, "y": pl.Int64}), schema)
    ids, _ = enc.transform_frame(frame)
    size = enc.field_sizes()[0]
    assert ((ids[:, 0] >= 0) & (ids[:, 0] < size)).all()
    assert (ids[:, 1] >= size).all() and (ids[:, 1] < enc.n_ids).all()
    seen: dict[object, int] = {}
    for v, i in zip(values, ids[:, 0].tolist()):
        assert seen.setdefault(v, i) == i
        if v is None or v == "":
            assert i == MISSING
    if buckets is None:
        counts = pl.Series(train, dtype=pl.String).value_counts()
        for v, n in counts.iter_rows():
            if v not in (None, "") and n >= min_count:
                assert seen[v] >= 2


def test_hash_table_matches_a_dict():
    from ctrkit.data.encode import _HashTable

    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(0, 2**64, 5000, dtype=np.uint64))
    # keys sharing their top bits force probing; 0 is a valid key too
    keys = np.unique(np.concatenate([keys, np.arange(40, dtype=np.uint64), (keys[:30] | np.uint64(7))]))
    table = _HashTable(keys[:100], np.arange(100, dtype=np.int32), default=-1)
    table.insert(keys[100:], np.arange(100, len(keys), dtype=np.int32))  # grows several times
    want = dict(zip(keys.tolist(), range(len(keys))))
    query = np.concatenate([keys, rng.integers(0, 2**64, 3000, dtype=np.uint64)])
    got = table.lookup(query)
    assert got.tolist() == [want.get(k, -1) for k in query.tolist()]
    assert 2 * table.n <= len(table.rec)


def test_hash_table_intern_numbers_new_keys_densely():
    from ctrkit.data.encode import _HashTable

    rng = np.random.default_rng(1)
    table = _HashTable(np.zeros(0, np.uint64), np.zeros(0, np.int32), default=-1)
    want: dict[int, int] = {}
    for size in (50, 3000, 20_000, 10):  # repeats within and across calls; the table grows on the way
        keys = rng.integers(0, 400, size).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        keys[: size // 10] = np.uint64(0)  # 0 is a key like any other
        n0 = len(want)
        ids, first = table.intern(keys)
        new = set(keys.tolist()) - set(want)
        # the new keys get exactly the ids n0, n0+1, ...; `first` points at one of each, in id order
        assert sorted(keys[first].tolist()) == sorted(new) and ids[first].tolist() == list(range(n0, n0 + len(new)))
        want.update(zip(keys[first].tolist(), ids[first].tolist()))
        assert ids.tolist() == [want[k] for k in keys.tolist()]
        assert table.n == len(want) and 2 * table.n <= len(table.rec)
    assert table.lookup(np.array(list(want), np.uint64)).tolist() == list(want.values())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text(max_size=70)), max_size=60), st.integers(0, 5))
def test_crc32_equals_zlib(values, cut):
    from ctrkit.data.encode import _crc32

    series = pl.concat([pl.Series(values[:cut], dtype=pl.String), pl.Series(values[cut:], dtype=pl.String)],
                       rechunk=False).slice(min(cut, 2))  # several chunks, and an offset into the first
    want = [zlib.crc32((v or "").encode()) for v in series.to_list()]
    assert _crc32(series).tolist() == want
    assert _crc32(series, vector_bytes=8).tolist() == want  # strings over 8 bytes go to zlib one by one


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.none(), st.just(""), st.text(min_size=1, max_size=12)), max_size=80),
       st.integers(1, 50))
def test_hash_buckets_are_crc32_of_each_value(values, n):
    from ctrkit.data.encode import _hash_buckets

    want = [MISSING if not v else zlib.crc32(v.encode()) % n + 1 for v in values]
    assert _hash_buckets(pl.Series(values, dtype=pl.String), n).tolist() == want


def test_numeric_values_literal():
    frame = pl.DataFrame({"x": [1.5, None, float("nan"), -2.0], "k": [3, None, 1, 0],
                          "b": [True, None, False, True]})
    np.testing.assert_array_equal(_numeric(frame, "x"), [1.5, np.nan, np.nan, -2.0])
    np.testing.assert_array_equal(_numeric(frame, "k"), [3.0, np.nan, 1.0, 0.0])
    np.testing.assert_array_equal(_numeric(frame, "b"), [1.0, np.nan, 0.0, 1.0])
    assert _numeric(frame.clear(), "x").shape == (0,)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)), max_size=30),
                min_size=1, max_size=4), st.integers(0, 9), st.integers(0, 40))
def test_numeric_values_equal_polars_conversion(parts, start, length):
    """Nulls become NaN wherever the column starts in its buffers: several chunks, a slice, none missing."""
    chunks = [pl.Series("x", p, dtype=pl.Float64) for p in parts]
    column = pl.concat(chunks, rechunk=False).slice(start, length)
    np.testing.assert_array_equal(_numeric(pl.DataFrame(column), "x"), column.to_numpy())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(train=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=30),
       other=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=30))
def test_vocabulary_ids_of_all_fields_at_once_equal_a_dict_per_field(train, other):
    """The one lookup of every vocabulary field's values (salted per field) against a literal dict per field:
    value -> offset + 2 + its place in the vocabulary, unseen -> OOV, null and "" -> missing."""
    schema = Schema(fields=[Field("v"), Field("w"), Field("h", hash_buckets=3)], label="y")
    cols = {"v": [a for a, _ in train], "w": [b for _, b in train], "h": [a for a, _ in train]}
    enc = Encoder(schema).fit(pl.DataFrame({**cols, "y": [0] * len(train)},
                                           schema={"v": pl.String, "w": pl.String, "h": pl.String, "y": pl.Int64}))
    rows = train + other
    frame, _ = read_frame(pl.DataFrame({"v": [a for a, _ in rows], "w": [b for _, b in rows],
                                        "h": [a for a, _ in rows], "y": [1] * len(rows)},
                                       schema={"v": pl.String, "w": pl.String, "h": pl.String, "y": pl.Int64}), schema)
    ids, _ = enc.transform_frame(frame)
    for j, name in enumerate(("v", "w")):
        lookup = {v: enc.offsets[name] + 2 + i for i, v in enumerate(enc.vocab[name].to_list())}
        want = [enc.offsets[name] + MISSING if v in (None, "") else lookup.get(v, enc.offsets[name] + OOV)
                for v in frame[name].to_list()]
        assert ids[:, j].tolist() == want


def test_a_hashed_id_space_wider_than_int32_gets_int64_ids(tmp_path):
    # the literal example with "h" hashed into 3e9 buckets: vocabulary and bucketized fields first, "h" last
    wide = Schema(fields=[Field("c"), Field("d", min_count=2), Field("h", hash_buckets=3_000_000_000),
                          Field("x", kind="numeric"),
                          Field("b", kind="numeric", transform="bucketize", n_buckets=4)], label="y")
    res = encode_files(wide, TRAIN, tmp_path / "out", valid_fraction=0.0)
    enc = res.encoder
    assert enc.wide_ids and enc.id_dtype == np.int64 and not _fit().wide_ids
    assert enc.offsets == {"c": 0, "d": 5, "b": 10, "h": 15} and enc.n_ids == 15 + 3_000_000_001
    frame, _ = read_frame(TRAIN, wide)
    ids, _ = enc.transform_frame(frame)
    h = [15 + (MISSING if not v else zlib.crc32(v.encode()) % 3_000_000_000 + 1) for v in TRAIN["h"]]
    assert ids.dtype == np.int64 and ids[:, 2].tolist() == h
    np.testing.assert_array_equal(ids[:, [0, 1]], _fit().transform_frame(frame)[0][:, [0, 1]])
    far = next(f"v{i}" for i in range(1000) if zlib.crc32(f"v{i}".encode()) % 3_000_000_000 >= 1 << 31)
    far_ids, _ = enc.transform_frame(read_frame(TRAIN.with_columns(h=pl.lit(far)), wide)[0])
    assert far_ids[0, 2] == 15 + zlib.crc32(far.encode()) % 3_000_000_000 + 1 > np.iinfo(np.int32).max
    data = EncodedData.open(tmp_path / "out" / "train")
    assert data.meta["wide_ids"] and data.ids.dtype == np.int64 and (tmp_path / "out" / "train" / "ids.i64").exists()
    np.testing.assert_array_equal(np.asarray(data.ids), ids)
    from ctrkit.data.dataset import BatchIterator

    assert next(iter(BatchIterator(data, 4))).ids.dtype == torch.int64


def test_an_int32_id_space_that_overflows_says_so(monkeypatch):
    sizes = Schema(fields=[Field("c"), Field("h", hash_buckets=(1 << 29) + 1), Field("g", hash_buckets=1 << 29)],
                   label="y")
    assert Encoder(sizes).wide_ids  # 2^30 hashed buckets in all: int64
    import ctrkit.data.encode as encode

    monkeypatch.setattr(encode, "WIDE_BUCKETS", 1 << 40)  # as if int32 ids had been chosen for 3e9 buckets
    wide = Schema(fields=[Field("c"), Field("h", hash_buckets=3_000_000_000)], label="y")
    with pytest.raises(EncoderError, match="passes 2\\^31 at field 'h'"):
        Encoder(wide).fit(TRAIN.select("c", "h", "y"))
