"""The serving fast path: dict records read in one pass equal the record-by-record reading (values and errors),
and the scorer's model paths (torch, torch folded, ONNX fp32, ONNX INT8 exported into the bundle) give the
bundle's answers."""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctrkit.data.synth import make_click_log, split_by_time, synth_schema
from ctrkit.schema import Field, Schema
from ctrkit.validate import DataError, _scalar_series, _scalar_text, coerce_chunk, records_frame

SCHEMA = Schema(fields=[Field("u"), Field("c"), Field("x", kind="numeric"),
                        Field("b", kind="numeric", transform="bucketize", n_buckets=3)], label="y")
NAMES = [f.name for f in SCHEMA.fields]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                   st.text(max_size=5), st.sampled_from(["", " 3 ", "1e400", "nan", "7"]),
                   st.lists(st.integers(0, 3), max_size=2))


def _typed(records: Any, context: dict[str, Any] | None = None, extra: tuple[str, ...] | None = None
           ) -> tuple[pl.DataFrame, pl.DataFrame] | str:
    """The validation layer's typed (good, bad) frames of dict records, or the error it raised."""
    try:
        df = records_frame(records, SCHEMA, context, extra)
        return coerce_chunk(df.select(NAMES).with_row_index("_line"), SCHEMA, with_label=False)
    except DataError as exc:
        return f"DataError: {exc}"


def _same(a: tuple[pl.DataFrame, pl.DataFrame] | str, b: tuple[pl.DataFrame, pl.DataFrame] | str) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, str):
        assert a == b
    else:
        assert a[0].equals(b[0]) and a[1].equals(b[1]), (a, b)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), n=st.integers(1, 6), keys=st.sets(st.sampled_from([*NAMES, "bid", "zz"]), min_size=1),
       ctx=st.dictionaries(st.sampled_from(NAMES), VALUES, max_size=2), extra=st.sampled_from([None, ("bid",)]))
def test_records_read_in_one_pass_equal_record_by_record(data: st.DataObject, n: int, keys: set[str],
                                                         ctx: dict[str, Any], extra: tuple[str, ...] | None
                                                         ) -> None:
    """Same-keyed dicts take the one-pass path; the same records as read-only mappings take the record by record
    path: equal typed frames, or the same error naming the record and field."""
    rows = [{k: data.draw(VALUES) for k in sorted(keys)} for _ in range(n)]
    _same(_typed(rows, ctx, extra), _typed([MappingProxyType(r) for r in rows], ctx, extra))


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(field=st.sampled_from(SCHEMA.fields), values=st.lists(VALUES.filter(lambda v: not isinstance(v, list)),
                                                             min_size=1, max_size=8))
def test_columns_built_at_once_equal_the_text_of_each_value(field: Field, values: list[Any]) -> None:
    """A column built in one call types to what the literal text of each value (as a file would hold it) types
    to."""
    literal = pl.Series(field.name, [_scalar_text(v, i, field.name) for i, v in enumerate(values)], dtype=pl.String)
    schema = Schema(fields=[field], label="y")
    built = coerce_chunk(pl.DataFrame([_scalar_series(field, values)]), schema, with_label=False)
    want = coerce_chunk(pl.DataFrame([literal]), schema, with_label=False)
    assert built[0].equals(want[0]) and built[1].equals(want[1])


def test_one_pass_errors_name_record_and_field() -> None:
    rows = [{"u": "a", "c": "b", "x": 1.0, "b": 2}, {"u": "a", "c": "b", "x": "cheap", "b": 2}]
    good, bad = _typed(rows)  # type: ignore[misc]
    assert good.height == 1 and bad.row(0, named=True)["_reason"] == "field 'x': not a number"
    assert "record 1" in _typed([rows[0], {"u": "a", "c": "b", "x": 1.0}])  # type: ignore[operator]
    assert "unknown field(s) ['bid']" in _typed([{**rows[0], "bid": 1.0}], extra=())  # type: ignore[operator]
    assert "field 'c' has a list value" in _typed([{**rows[0], "c": [1]}])  # type: ignore[operator]


# -- the scorer's model paths ---------------------------------------------------------------------------------
def _error(fn: Any, records: Any) -> str:
    with pytest.raises(DataError) as exc:
        fn(records)
    return str(exc.value)



@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pl.DataFrame]:
    """A DeepFM bundle with its ONNX graphs exported into the folder (INT8 kept whatever its AUC), and records."""
    pytest.importorskip("onnxruntime", reason="ONNX export needs the 'onnx' extra: pip install 'ctrkit[onnx]'")
    pytest.importorskip("onnxscript", reason="ONNX export needs the 'onnx' extra: pip install 'ctrkit[onnx]'")
    from ctrkit.pipeline import train
    from ctrkit.serve.export import export_bundle

    out = tmp_path_factory.mktemp("scorer")
    log, _ = make_click_log(n_rows=3000, n_users=100, n_items=80, seed=4)
    tr, va, te = split_by_time(log.drop("p_click"))
    train(tr, schema=synth_schema(), valid=va, model="deepfm", out=out / "m", epochs=1, batch_size=512,
          progress=False)
    export_bundle(out / "m" / "bundle", valid=te, max_auc_drop=1.0)
    return out / "m" / "bundle", te.select(synth_schema().input_columns).head(300)


def test_export_into_the_bundle_is_in_its_manifest(exported: tuple[Path, pl.DataFrame]) -> None:
    from ctrkit.serve.bundle import Bundle, BundleError

    path, _ = exported
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert {"model.onnx", "model.int8.onnx", "onnx.json"} <= set(files)
    Bundle.load(path)  # the manifest checks the graphs like every other file
    tampered = path.parent / "tampered"
    import shutil

    shutil.copytree(path, tampered)
    (tampered / "model.int8.onnx").write_bytes(b"not a graph")
    with pytest.raises(BundleError, match="model.int8.onnx"):
        Bundle.load(tampered)


PATHS = {"torch", "torch folded", "torch bf16", "torch folded bf16", "onnx fp32", "onnx int8"}


@pytest.fixture()
def bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scorer believes the CPU has bf16 units (the path runs anywhere; only its speed needs them)."""
    import ctrkit.serve.scorer as scorer_module

    monkeypatch.setattr(scorer_module, "cpu_has_bf16", lambda: True)


def test_every_path_gives_the_bundles_probabilities(exported: tuple[Path, pl.DataFrame], bf16_cpu: None) -> None:
    from ctrkit.serve.bundle import Bundle
    from ctrkit.serve.scorer import Scorer

    path, records = exported
    bundle = Bundle.load(path)
    scorer = Scorer(bundle, path, rows=200, reps=3, keep_paths=True)
    assert set(scorer.timings_ms) == PATHS and scorer.skipped == {}
    assert scorer.backend == min(scorer.timings_ms, key=scorer.timings_ms.__getitem__)
    dicts = records.to_dicts()
    dicts[0]["item_id"] = "never-seen"
    want = bundle.predict(dicts)
    for backend, tol in (("torch", 0.0), ("torch folded", 1e-5), ("onnx fp32", 1e-5), ("onnx int8", 0.05),
                         ("torch bf16", 0.02), ("torch folded bf16", 0.02)):
        scorer.backend = backend
        assert np.max(np.abs(scorer.predict(dicts) - want)) <= tol, backend
        bad = [*dicts[:3], {**dicts[3], "price": "cheap"}]
        assert _error(scorer.predict, bad) == _error(bundle.predict, bad)
        assert "record 3" in _error(scorer.predict, bad)
    assert set(Scorer(bundle, None, rows=200, reps=3).describe()["probe_ms"]) == {"torch", "torch folded"}
    lean = Scorer(bundle, path, rows=200, reps=3)  # the paths that lost the timing are let go
    held = {"torch folded": lean.folded, "torch bf16": lean.bf16, "torch folded bf16": lean.folded_bf16,
            **lean.sessions}
    assert {k for k, v in held.items() if v is not None} == ({lean.backend} if lean.backend != "torch" else set())
    assert np.max(np.abs(lean.predict(dicts) - want)) <= 0.05


def test_a_swap_to_the_same_shapes_keeps_the_timings(exported: tuple[Path, pl.DataFrame],
                                                     monkeypatch: pytest.MonkeyPatch, bf16_cpu: None) -> None:
    """A reloaded bundle of the same model and layout is checked (folded form and fp32 graph against torch) and
    its serving path warmed up, but not timed again; other threads are timed afresh."""
    from ctrkit.serve.bundle import Bundle
    from ctrkit.serve.scorer import WARMUP_CALLS, Scorer

    path, _ = exported
    first = Scorer(Bundle.load(path), path, rows=200, reps=3)
    calls: list[str] = []
    real = Scorer._probabilities
    monkeypatch.setattr(Scorer, "_probabilities", lambda self, p, *a: calls.append(p) or real(self, p, *a))
    again = Scorer(Bundle.load(path), path, rows=200, reps=3, like=first)
    assert again.timings_ms == first.timings_ms and again.backend == first.backend
    # the checks, then the serving path's warm-up calls
    assert sorted(calls) == sorted(["onnx fp32", "torch", "torch folded", *[first.backend] * WARMUP_CALLS])
    calls.clear()
    Scorer(Bundle.load(path), path, threads=2, rows=200, reps=3, like=first)
    assert len(calls) == 3 + 3 * len(first.timings_ms)


def test_bf16_is_offered_only_where_it_was_kept_and_the_cpu_has_it(exported: tuple[Path, pl.DataFrame],
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    import shutil

    import ctrkit.serve.scorer as scorer_module
    from ctrkit.serve.bundle import Bundle
    from ctrkit.serve.scorer import Scorer

    path, _ = exported
    monkeypatch.setattr(scorer_module, "cpu_has_bf16", lambda: False)
    scorer = Scorer(Bundle.load(path), path, rows=200, reps=3)
    assert "torch bf16" not in scorer.timings_ms and scorer.skipped == {
        "torch bf16": "this CPU has no bf16 units", "torch folded bf16": "this CPU has no bf16 units"}
    monkeypatch.setattr(scorer_module, "cpu_has_bf16", lambda: True)
    dropped = tmp_path / "dropped"
    shutil.copytree(path, dropped)
    record = json.loads((dropped / "onnx.json").read_text())
    for key, name, other in (("bf16", "torch bf16", "torch folded bf16"),
                             ("bf16_folded", "torch folded bf16", "torch bf16")):
        (dropped / "onnx.json").write_text(json.dumps({**record, key: False}))
        timed = Scorer(Bundle.load(path), dropped, rows=200, reps=3).timings_ms
        assert name not in timed and other in timed


def test_server_scores_on_the_chosen_path(exported: tuple[Path, pl.DataFrame], bf16_cpu: None) -> None:
    pytest.importorskip("fastapi", reason="the server needs the 'serve' extra: pip install 'ctrkit[serve]'")
    from fastapi.testclient import TestClient

    from ctrkit.serve.app import ServerConfig, create_app
    from ctrkit.serve.bundle import Bundle

    path, records = exported
    with TestClient(create_app(ServerConfig(bundle=path))) as client:
        scoring = client.get("/health").json()["scoring"]
        assert scoring["backend"] in scoring["probe_ms"] and set(scoring["probe_ms"]) == PATHS
        p = client.post("/score", json={"records": records.to_dicts()}).json()["pctr"]
        assert np.max(np.abs(np.asarray(p) - Bundle.load(path).predict(records))) <= 0.05
        spec = client.get("/openapi.json").json()
        assert "RankRequest" in spec["components"]["schemas"]
        assert spec["paths"]["/rank"]["post"]["requestBody"]["content"]["application/json"]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_file_scored_in_chunks_equals_bundle_predict(exported: tuple[Path, pl.DataFrame], tmp_path: Path,
                                                     suffix: str) -> None:
    """Streamed in chunks of 64 rows with kept columns: one row per input row, in order, the bundle's scores;
    a bad row in a late chunk is counted and reported like `ctrkit predict` and leaves no output."""
    from ctrkit.serve.bundle import Bundle
    from ctrkit.serve.scorer import Scorer

    path, records = exported
    bundle = Bundle.load(path)
    src = tmp_path / "in.csv"
    records.with_row_index("id").write_csv(src)
    seen: list[int] = []
    out = tmp_path / f"scores{suffix}"
    report = Scorer(bundle, None).score_file(src, out, ["id", "user_id"], seen.append, chunk_rows=64)
    got = pl.read_csv(out) if suffix == ".csv" else pl.read_parquet(out)
    assert got.columns == ["id", "user_id", "pctr"] and sum(seen) == report.rows == records.height
    assert got["id"].cast(pl.Int64).to_list() == list(range(records.height))
    assert np.allclose(got["pctr"].to_numpy(), bundle.predict(records), atol=1e-7)
    bad = records.with_columns(pl.col("price").cast(pl.String))
    bad[250, "price"] = "cheap"
    bad.write_csv(src)
    with pytest.raises(DataError, match=r"1 row\(s\) cannot be scored: .* line 252: field 'price': not a number"):
        Scorer(bundle, None).score_file(src, tmp_path / f"bad{suffix}", chunk_rows=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.csv", out.name])
