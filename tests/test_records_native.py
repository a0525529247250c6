"""The compiled record path (ctrkit.data._records): the same ids and dense values as the reference path
(records_frame -> coerce_chunk -> Encoder.transform_frame) for every plain record, None for anything else, and
from JSON bytes nothing that a JSON reader would read otherwise."""

from __future__ import annotations

import json
import string

import numpy as np
import orjson
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctrkit.data import encode as encode_module
from ctrkit.data.encode import Encoder
from ctrkit.data.readers import DataError
from ctrkit.schema import Field, Schema
from ctrkit.validate import coerce_chunk, plain_rows, records_frame

native = pytest.importorskip("ctrkit.data._records", reason="the compiled module is built only with a C compiler")

SCHEMA = Schema(fields=[
    Field(name="c1"),
    Field(name="c2", min_count=2),
    Field(name="h", hash_buckets=7),
    Field(name="req", required=True),
    Field(name="n1", kind="numeric", transform="log1p_standardize"),
    Field(name="n2", kind="numeric", transform="standardize"),
    Field(name="n3", kind="numeric", transform="bucketize", n_buckets=4),
    Field(name="n4", kind="numeric", transform="none", required=True),
], label="y")
POOL = ["a", "b", "12", "-3", "", " a", "α", "日本", "x" * 20, "0"]


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    rng = np.random.default_rng(0)
    n = 400
    cat = lambda: pl.Series(rng.choice(POOL, n).tolist(), dtype=pl.String)  # noqa: E731
    num = rng.lognormal(0, 2, n)
    frame = pl.DataFrame({"c1": cat(), "c2": cat(), "h": cat(), "req": cat(), "n1": num, "n2": -num,
                          "n3": rng.normal(size=n), "n4": rng.normal(size=n), "y": rng.integers(0, 2, n)})
    return Encoder(SCHEMA).fit(frame)


def reference(enc: Encoder, records: object, context: dict | None = None,
              extra: tuple[str, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """What Bundle.predict's path gives: the typed frame of the validation layer, encoded."""
    df = records_frame(records, SCHEMA, context, extra).select(SCHEMA.input_columns)
    df = df.hstack([pl.Series("_line", np.arange(df.height))])
    good, bad = coerce_chunk(df, Schema(fields=SCHEMA.fields, label="y"), with_label=False)
    if bad.height:
        raise DataError(bad["_reason"][0])
    for f in SCHEMA.fields:
        if f.required and good[f.name].null_count():
            raise DataError(f"required field {f.name!r} is missing")
    return enc.transform_frame(good)


def same(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> None:
    assert got[0].dtype == want[0].dtype
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])  # NaN equals NaN here


category = st.one_of(st.sampled_from(POOL), st.text(max_size=5), st.integers(-10**6, 10**6), st.none(),
                     st.integers(-2**63, 2**63 - 1))
number = st.one_of(st.floats(-1e30, 1e30), st.integers(-10**6, 10**6),
                   st.integers(-2**63, 2**63 - 1), st.none())
plain_record = st.fixed_dictionaries({
    "c1": category, "c2": category, "h": category, "req": category.filter(lambda v: v is not None),
    "n1": number, "n2": number, "n3": number, "n4": number.filter(lambda v: v is not None)})
odd = st.one_of(st.booleans(), st.floats(), st.just("3.5"), st.just([1]), st.just({"a": 1}), st.just(2**70))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(plain_record, min_size=1, max_size=20))
def test_plain_records_encode_as_the_reference_path(encoder: Encoder, records: list[dict]) -> None:
    got = encoder.encode_records(records)
    assert got is not None  # plain records are taken, not sent back
    same(got, reference(encoder, records))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(plain_record, min_size=1, max_size=8), st.data())
def test_any_record_is_encoded_as_the_reference_path_or_sent_back(encoder: Encoder, records: list[dict],
                                                                    data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(records) - 1))
    field = data.draw(st.sampled_from(SCHEMA.input_columns + ["unknown"]))
    change = data.draw(st.one_of(odd, st.just("drop"), category, number))
    if change == "drop":
        records[i].pop(field, None)
    else:
        records[i][field] = change
    extra = data.draw(st.sampled_from([None, (), ("bid",)]))
    got = encoder.encode_records(records, extra=extra)
    try:
        want = reference(encoder, records, extra=extra)
    except DataError:
        assert got is None  # the reference path names what is wrong
        return
    if got is not None:
        same(got, want)


def test_context_fills_what_records_lack_and_a_record_wins(encoder: Encoder) -> None:
    ctx = {"c1": "a", "n1": 2.0, "req": "b", "n4": 1}
    records = [{"c2": "12", "h": None, "n2": 1.5, "n3": 0.2}, {"c1": "b", "c2": 12, "h": "α", "n2": None,
                                                               "n3": -1, "req": "0"}]
    got = encoder.encode_records(records, ctx)
    assert got is not None
    same(got, reference(encoder, records, ctx))
    assert encoder.encode_records(records, {**ctx, "unknown": 1}) is None  # the reference path's error


@pytest.mark.parametrize("record", [
    {"c1": True}, {"c1": 1.5}, {"n1": "2.5"}, {"n1": float("nan")}, {"n1": float("inf")}, {"n1": 10**30},
    {"req": None}, {"n4": None}, {"c1": ["a"]}, {"c1": "\ud800"}, {"unknown": 1},
])
def test_anything_not_plain_is_sent_back(encoder: Encoder, record: dict) -> None:
    base = {"c1": "a", "c2": "b", "h": "c", "req": "d", "n1": 1.0, "n2": 2.0, "n3": 3.0, "n4": 4.0}
    rec = {**base, **record}
    assert encoder.encode_records([rec], extra=()) is None
    assert encoder.encode_records([{k: v for k, v in base.items() if k != "c1"}]) is None  # a field missing
    assert encoder.encode_records("not records") is None and encoder.encode_records([1]) is None


def test_without_the_compiled_module_the_reference_path_serves(encoder: Encoder,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encode_module, "_records", None)
    fresh = Encoder.__new__(Encoder)
    fresh.__dict__.update({**encoder.__dict__, "_plan": None})
    assert fresh.records_plan() is None and fresh.encode_records([{"c1": "a"}]) is None
    assert fresh.encode_json(b'{"candidates": []}', "candidates") is None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(plain_record, min_size=1, max_size=12), st.sampled_from(["orjson", "ascii", "indent"]),
       st.lists(st.one_of(st.none(), st.integers(0, 100), st.floats(0, 1e6)), min_size=12, max_size=12))
def test_json_bodies_encode_as_their_parsed_records(encoder: Encoder, records: list[dict], writer: str,
                                                    bids: list) -> None:
    ctx = {k: records[0].pop(k) for k in ("c1", "n1")}
    for r in records[1:]:  # a context field is given by the context or by every record, or it is mixed
        r.pop("c1")
    for r, b in zip(records, bids):
        if b is not None:
            r["bid"] = b
    doc = {"context": ctx, "candidates": records, "k": 3}
    body = (orjson.dumps(doc) if writer == "orjson" else json.dumps(doc).encode() if writer == "ascii"  # \uXXXX
            else json.dumps(doc, indent=1, ensure_ascii=False).encode())
    got = encoder.encode_json(body, "candidates", ("bid",))
    want = encoder.encode_records(records, ctx, ("bid",))
    if not any(isinstance(v, int) and abs(v) >= 10**18 for r in records for v in r.values()):
        assert got is not None and want is not None  # escaped text too: only 19-digit integers are sent back
    if got is None:
        return
    assert orjson.loads(got.rest) == {"context": ctx, "k": 3}
    assert [orjson.loads(body[a:b]) for a, b in got.spans.tolist()] == records
    np.testing.assert_array_equal(got.extras[:, 0], [np.nan if r.get("bid") is None else r["bid"] for r in records])
    fin = encoder.finish_json(got, ctx)
    assert fin is not None and want is not None
    same(fin, want)


@pytest.fixture(scope="module")
def body() -> bytes:
    recs = [{"c1": "a", "c2": "12", "h": "日本", "req": "b", "n1": 1.5, "n2": -2, "n3": None, "n4": 1e-7, "bid": 2},
            {"c2": -3, "h": "", "req": "x", "n1": None, "n2": 0.25, "n3": 3, "n4": 0, "c1": None}]
    return orjson.dumps({"k": 2, "candidates": recs, "context": {"c1": "zz"}, "explore": {"epsilon": 0.5}})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_a_mangled_body_is_never_read_otherwise_than_by_a_json_reader(encoder: Encoder, body: bytes,
                                                                       data: st.DataObject) -> None:
    mangled = bytearray(body)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(mangled)))
        what = data.draw(st.sampled_from(["delete", "insert", "repeat"]))
        if what == "delete" and at < len(mangled):
            del mangled[at]
        elif what == "insert":
            mangled[at:at] = data.draw(st.sampled_from([b"{", b"}", b"[", b"]", b",", b":", b'"', b"\\", b" ", b"0",
                                                        b"-", b".", b"e", b"n", b"\x80", b'"c1":1,']))
        else:
            mangled[at:at] = mangled[at:at + data.draw(st.integers(1, 12))]
    raw = bytes(mangled)
    got = encoder.encode_json(raw, "candidates", ("bid",))
    if got is None:
        return
    try:
        rest = orjson.loads(got.rest)
    except orjson.JSONDecodeError:
        return  # the server then reads the whole body with the JSON reader
    doc = orjson.loads(raw)  # accepted: a JSON reader must read the body too, to the same records
    assert {k: v for k, v in doc.items() if k != "candidates"} == rest
    ctx = rest.get("context") if isinstance(rest.get("context"), dict) else None
    fin = encoder.finish_json(got, ctx)
    if fin is not None:
        same(fin, encoder.encode_records(doc["candidates"], ctx, ("bid",)))


@pytest.mark.parametrize("raw", [
    b'{"candidates": [{"c1": "a\\x"}]}', b'{"candidates": [{"c1": "\\ud800"}]}', b'{"candidates": [{"c1": "\\udc00x"}]}',
    b'{"candidates": [{"c1": "\\u00g1"}]}', b'{"candidates": [{"c1": "\\u12"}]}', b'{"candidates": [{"c\\u0031": "a"}]}',
    b'{"candidates": [{"c1": "a", "c1": "b"}]}', b'{"candidates": [{"c1": true}]}',
    b'{"candidates": [{"c1": 1.5}]}', b'{"candidates": [{"n1": "1"}]}', b'{"candidates": [{"n1": 1e999}]}',
    b'{"candidates": [{"zz": 1}]}', b'{"candidates": [], "candidates": []}', b'{"candidates": {}}',
    b'{"other": 1}', b'[]', b'{"candidates": [{"c1": "\xff"}]}', b'{"candidates": [{"c1": "a"} {"c1": "b"}]}',
    b'{"candidates": [{"c1": "a",}]}', b'{"candidates": [{"c1": 12345678901234567890}]}', b"",
])
def test_json_that_is_not_plain_is_sent_back(encoder: Encoder, raw: bytes) -> None:
    assert encoder.encode_json(raw, "candidates", ("bid",)) is None


def test_json_records_lacking_a_field_take_the_context(encoder: Encoder) -> None:
    recs = [{"c2": "12", "h": None, "req": "b", "n1": 1.0, "n2": 2.0, "n3": 3.0}] * 3
    got = encoder.encode_json(orjson.dumps({"candidates": recs}), "candidates")
    assert got is not None and got.missing[:, [0, 7]].all() and not got.missing[:, 1:7].any()
    assert encoder.finish_json(got, {"c1": "a"}) is None  # n4 is in no record and not in the context
    ctx = {"c1": "a", "n4": 0.5}
    same(encoder.finish_json(got, ctx), reference(encoder, recs, ctx))
    too_many = encoder.encode_json(orjson.dumps({"candidates": recs}), "candidates", max_records=2)
    assert too_many is None


def test_plain_rows_type_as_the_validation_layer(encoder: Encoder) -> None:
    recs = [{"c1": 12, "c2": "", "h": None, "req": "α", "n1": 3, "n3": 1.5, "n4": -1}]
    ctx = {"c1": "ignored", "n2": 7}
    typed = coerce_chunk(records_frame(recs, SCHEMA, ctx).with_row_index("_line"),
                         Schema(fields=SCHEMA.fields, label="y"), with_label=False)[0]
    want = typed.select(pl.col(f.name).cast(pl.Float64) if f.kind == "numeric" else pl.col(f.name)
                        for f in SCHEMA.fields).to_dicts()
    assert plain_rows(recs, SCHEMA, ctx) == want
    assert plain_rows(recs, SCHEMA, ctx)[0]["c1"] == "12" and plain_rows(recs, SCHEMA, ctx)[0]["n2"] == 7.0


def test_vocab_table_finds_each_entry_and_refuses_bad_input() -> None:
    words = ["", "a", "ab", "日本", "x" * 40] + [f"w{i}" for i in range(1000)]
    data = "".join(words).encode()
    offsets = np.cumsum([0] + [len(w.encode()) for w in words]).astype(np.int64)
    table = native.VocabTable(data, offsets)
    assert len(table) == len(words)
    assert [table.find(w) for w in words] == list(range(len(words)))
    assert table.find("w1000") == -1 and table.find("abc") == -1
    with pytest.raises(ValueError, match="repeats"):
        native.VocabTable(b"aa", np.array([0, 1, 2], np.int64))
    with pytest.raises(ValueError, match="rise"):
        native.VocabTable(b"ab", np.array([0, 3], np.int64))
    assert len(native.VocabTable(b"", np.array([0], np.int64))) == 0
    letters = "".join(string.ascii_letters).encode()
    assert native.VocabTable(letters, np.arange(len(letters) + 1, dtype=np.int64)).find("Z") == 51
