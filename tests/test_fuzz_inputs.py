"""Random bytes, CSV-shaped text and JSON records fed to the readers, the encoder, schema inference and
``Bundle.predict``: the only exceptions are ctrkit's own error types, and every score is a finite probability."""

from __future__ import annotations

import gzip
import math
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctrkit.data.encode import Encoder, EncoderError
from ctrkit.data.readers import iter_chunks
from ctrkit.data.synth import make_click_log, synth_schema
from ctrkit.pipeline import train
from ctrkit.schema import Field, Schema, SchemaError, infer
from ctrkit.serve.bundle import Bundle, BundleError
from ctrkit.validate import DataError

CTRKIT_ERRORS = (DataError, SchemaError, EncoderError, BundleError)
SCHEMA = Schema(fields=[Field(name="u"), Field(name="x", kind="numeric"),
                        Field(name="b", kind="numeric", transform="bucketize", n_buckets=4)],
                label="click", time="ts")
COLUMNS = ["ts", "u", "x", "b", "click"]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TOKENS = st.one_of(
    st.sampled_from(["", "0", "1", "-1", "2", "0.5", "inf", "-inf", "nan", "NaN", "1e400", "-1e-400", "NA", "null",
                     "2026-01-01", "2026-01-01T10:00:00", "1700000000", '"quoted"', '"a,b"', '"', "  7 ", "\r",
                     "é", "\u200b", "x" * 70]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=8),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-10**20, 10**20).map(str),
)


def _check_chunks(path: Path) -> None:
    """Read ``path`` through the readers: typed chunks with finite-or-missing numbers, or a ctrkit error."""
    try:
        for chunk in iter_chunks(path, SCHEMA):
            for name in ("x", "b"):
                values = chunk[name].drop_nulls().to_numpy()
                assert np.isfinite(values).all()
            assert set(chunk["click"].to_list()) <= {0.0, 1.0}
    except CTRKIT_ERRORS:
        pass


@SETTINGS
@given(st.binary(max_size=600), st.sampled_from(["f.csv", "f.tsv", "f.csv.gz", "f.parquet", "f.libfm", "f.txt"]))
def test_random_bytes_give_ctrkit_errors_only(data, name):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        _check_chunks(path)
        try:
            infer(path)
        except CTRKIT_ERRORS:
            pass


@SETTINGS
@given(st.lists(st.lists(TOKENS, min_size=3, max_size=7), max_size=30), st.booleans(), st.sampled_from([",", "\t"]))
def test_csv_shaped_text_is_typed_or_refused(rows, gz, sep):
    text = "\n".join([sep.join(COLUMNS)] + [sep.join(r) for r in rows]) + "\n"
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("f.csv" if sep == "," else "f.tsv")
        data = text.encode("utf-8", errors="surrogatepass")
        path.write_bytes(data)
        _check_chunks(path)
        gz_path = path.with_name(path.name + ".gz")
        gz_path.write_bytes(gzip.compress(data)[: None if gz else max(len(data) // 2, 1)])
        _check_chunks(gz_path)
        try:
            enc = Encoder(SCHEMA).fit(path)
        except CTRKIT_ERRORS:
            return
        for chunk in iter_chunks(path, SCHEMA):
            ids, dense = enc.transform_frame(chunk)
            assert (ids >= 0).all() and (ids < enc.n_ids).all()
            assert not np.isinf(dense).any()  # NaN is the missing marker; never an infinity


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    log, _ = make_click_log(n_rows=1500, n_users=50, n_items=30, seed=5)
    return train(log.drop("p_click"), schema=synth_schema(), model="lr", epochs=1, progress=False).bundle


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True, allow_infinity=True),
              st.text(max_size=10), st.sampled_from(["inf", "nan", "1e400", "", " 3 ", "-0"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=5)


@SETTINGS
@given(st.data())
def test_json_records_score_finite_or_raise_ctrkit_errors(bundle, data):
    names = bundle.schema.input_columns
    keys = st.one_of(st.sampled_from(names), st.text(max_size=8))
    record = st.one_of(
        st.fixed_dictionaries({n: JSON_VALUES for n in names}),  # every field present: values vary
        st.dictionaries(keys, JSON_VALUES, max_size=len(names) + 2),  # keys vary too
    )
    records = data.draw(st.one_of(record, st.lists(record, max_size=5), JSON_VALUES))
    try:
        p = bundle.predict(records)
    except CTRKIT_ERRORS:
        return
    assert np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    if isinstance(records, list):
        assert len(p) == len(records)


@SETTINGS
@given(st.lists(st.tuples(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4)), min_size=1,
                max_size=20))
def test_frames_with_any_floats_score_finite_or_raise(bundle, values):
    base = {n: [None] * len(values) for n in bundle.schema.input_columns}
    base["price"] = [v for v, _ in values]
    base["user_id"] = [u for _, u in values]
    frame = pl.DataFrame(base, schema={n: (pl.Float64 if n in ("price", "user_activity") else pl.String)
                                       for n in base})
    try:
        p = bundle.predict(frame)
    except DataError as exc:
        assert "not a finite number" in str(exc)
        assert any(not math.isfinite(v) for v, _ in values)
        return
    assert all(math.isfinite(v) for v, _ in values)
    assert np.isfinite(p).all()
