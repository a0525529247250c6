"""Bundle and scorer: exact reload, unseen and missing values, and errors that name the field and row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from ctrkit.data.readers import DataError
from ctrkit.data.synth import make_click_log, split_by_time, synth_schema
from ctrkit.pipeline import train
from ctrkit.schema import Field
from ctrkit.serve.bundle import Bundle, BundleError


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pl.DataFrame, Bundle]:
    """A small DeepFM trained once through the whole pipeline, saved to disk."""
    out = tmp_path_factory.mktemp("run")
    log, _ = make_click_log(n_rows=6000, n_users=300, n_items=200, seed=3)
    tr, va, te = split_by_time(log.drop("p_click"))
    run = train(tr, schema=synth_schema(), valid=va, test=te, model="deepfm", out=out, epochs=2,
                batch_size=512, progress=False)
    return out, te, run.bundle


def test_outputs_written(trained: tuple[Path, pl.DataFrame, Bundle]) -> None:
    out, _, _ = trained
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]) >= {"auc", "logloss", "ece", "pred_actual_ratio", "n", "positives"}
    assert set(metrics["train"]) >= {"seconds", "samples_per_s", "epochs"}
    assert metrics["test"]["n"] == 600
    for part in ("schema.yaml", "encoder/encoder.json", "encoder/vocab.parquet", "weights.safetensors",
                 "model.json", "metrics.json"):
        assert (out / "bundle" / part).exists(), part
    assert "torch" in json.loads((out / "bundle" / "model.json").read_text())["versions"]


def test_reload_reproduces_predictions(trained: tuple[Path, pl.DataFrame, Bundle]) -> None:
    out, test_df, in_memory = trained
    before = in_memory.predict(test_df)
    reloaded = Bundle.load(out / "bundle")
    after = reloaded.predict(test_df)
    assert np.max(np.abs(before - after)) < 1e-6
    # dict records give the same scores as the frame
    records = test_df.head(20).to_dicts()
    assert np.max(np.abs(reloaded.predict(records) - after[:20])) < 1e-6
    # and pandas frames too
    assert np.max(np.abs(reloaded.predict(test_df.head(20).to_pandas()) - after[:20])) < 1e-6


def test_metrics_match_evaluate(trained: tuple[Path, pl.DataFrame, Bundle]) -> None:
    out, test_df, bundle = trained
    metrics, report = bundle.evaluate(test_df)
    saved = json.loads((out / "metrics.json").read_text())["test"]
    assert metrics["auc"] == pytest.approx(saved["auc"], abs=1e-9)
    assert report.bad_rows == 0 and report.rows == test_df.height


def test_unseen_and_missing_values_score(trained: tuple[Path, pl.DataFrame, Bundle]) -> None:
    _, _, bundle = trained
    enc = bundle.encoder
    rec = {"user_id": "never-seen", "item_id": "i1", "age_group": "18-24", "genre": "action", "hour": 3,
           "weekday": 2, "position": 1}
    p = bundle.predict(rec)
    assert p.shape == (1,) and 0.0 < p[0] < 1.0
    frame = pl.DataFrame({k: [v] for k, v in rec.items()}).with_columns(
        pl.lit(None, pl.String).alias("gender"), pl.lit(None, pl.String).alias("device"),
        pl.lit(None, pl.Float64).alias("price"), pl.lit(None, pl.Float64).alias("user_activity"))
    from ctrkit.data.readers import coerce_chunk

    typed, _ = coerce_chunk(frame.with_columns(pl.lit(1, pl.Int64).alias("_line")), bundle._features,
                            with_label=False)
    ids, dense = enc.transform_frame(typed)
    names = enc.sparse_names
    assert ids[0, names.index("user_id")] == enc.offsets["user_id"] + 1  # OOV id
    assert ids[0, names.index("gender")] == enc.offsets["gender"] + 0  # missing id
    assert np.isnan(dense[0]).all()  # missing numerics stay NaN for the model's missing vector
    assert bundle.predict(frame)[0] == pytest.approx(p[0], abs=1e-7)


def test_required_field_absent_names_it(trained: tuple[Path, pl.DataFrame, Bundle]) -> None:
    out, test_df, _ = trained
    copy = out.parent / "required"
    shutil.copytree(out / "bundle", copy, dirs_exist_ok=True)
    b = Bundle.load(copy)
    b.schema.fields[b.schema.input_columns.index("device")].required = True
    with pytest.raises(DataError, match=r"record 1: required field 'device'"):
        b.predict([test_df.row(0, named=True), {**test_df.row(1, named=True), "device": None}])


def test_wrong_type_names_field_and_row(trained: tuple[Path, pl.DataFrame, Bundle]) -> None:
    _, test_df, bundle = trained
    rows = test_df.head(3).to_dicts()
    rows[2]["price"] = "cheap"
    with pytest.raises(DataError, match=r"record 2: field 'price' expects a number, got 'cheap'"):
        bundle.predict(rows)
    bad = test_df.head(3).with_columns(pl.col("price").cast(pl.String)).with_columns(
        pl.when(pl.int_range(pl.len()) == 1).then(pl.lit("n/a")).otherwise(pl.col("price")).alias("price"))
    with pytest.raises(DataError, match=r"record 1: field 'price': not a number"):
        bundle.predict(bad)
    with pytest.raises(DataError, match="record 0: field 'hour' has a list value"):
        bundle.predict([{**rows[0], "hour": [1, 2]}])


def test_other_schema_is_refused(trained: tuple[Path, pl.DataFrame, Bundle]) -> None:
    _, _, bundle = trained
    other = pl.DataFrame({"user": ["a"], "ad": ["b"], "clicked": [1]})
    with pytest.raises(DataError, match=r"lacks the feature columns \['user_id', 'item_id'"):
        bundle.predict(other)


def test_file_with_bad_row_names_line(trained: tuple[Path, pl.DataFrame, Bundle], tmp_path: Path) -> None:
    _, test_df, bundle = trained
    path = tmp_path / "score.csv"
    test_df.head(5).drop("timestamp").write_csv(path)
    lines = path.read_text().splitlines()
    fields = lines[3].split(",")
    fields[test_df.drop("timestamp").columns.index("price")] = "oops"
    lines[3] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"line 4: field 'price': not a number"):
        bundle.predict_file(path)


def test_tampered_bundles_are_refused(trained: tuple[Path, pl.DataFrame, Bundle], tmp_path: Path) -> None:
    out, _, _ = trained
    broken = tmp_path / "b1"
    shutil.copytree(out / "bundle", broken)
    (broken / "weights.safetensors").unlink()
    with pytest.raises(BundleError, match="weights.safetensors is missing"):
        Bundle.load(broken)
    wrong = tmp_path / "b2"
    shutil.copytree(out / "bundle", wrong)
    meta = json.loads((wrong / "model.json").read_text())
    meta["config"]["hidden"] = [8, 8]
    (wrong / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="has shape"):
        Bundle.load(wrong)
    swapped = tmp_path / "b3"
    shutil.copytree(out / "bundle", swapped)
    schema = synth_schema()
    schema.fields.append(Field(name="extra"))
    schema.save(swapped / "schema.yaml")
    with pytest.raises(BundleError):
        Bundle.load(swapped)


def test_training_rejects_are_counted_and_kept(tmp_path: Path) -> None:
    log, _ = make_click_log(n_rows=2000, n_users=100, n_items=50, seed=1)
    path = tmp_path / "train.csv"
    log.drop("p_click").write_csv(path)
    lines = path.read_text().splitlines()
    lines[10] = lines[10].rsplit(",", 2)[0]  # a short row
    cols = lines[20].split(",")
    cols[log.columns.index("price")] = "abc"
    lines[20] = ",".join(cols)
    cols = lines[30].split(",")
    cols[log.columns.index("click")] = "7"
    lines[30] = ",".join(cols)
    path.write_text("\n".join(lines) + "\n")
    side = tmp_path / "bad.tsv"
    run = train(path, schema=synth_schema(), model="lr", epochs=1, bad_rows=side, progress=False)
    rep = run.reports["train"]
    assert rep["bad_rows"] == 3 and rep["rows"] == 2000
    kept = side.read_text().splitlines()
    assert len(kept) == 3
    assert any("not a number" in k for k in kept) and any("label" in k for k in kept)
    assert any("expected" in k and "fields" in k for k in kept)
    assert run.metrics["train"]["rows"] + run.metrics["valid"]["n"] == 1997


def test_seeded_runs_repeat(tmp_path: Path) -> None:
    log, _ = make_click_log(n_rows=3000, n_users=100, n_items=50, seed=2)
    tr, va, te = split_by_time(log.drop("p_click"))
    a = train(tr, schema=synth_schema(), valid=va, test=te, model="fm", epochs=2, seed=5, progress=False)
    b = train(tr, schema=synth_schema(), valid=va, test=te, model="fm", epochs=2, seed=5, progress=False)
    assert a.metrics["test"]["auc"] == b.metrics["test"]["auc"]
    wa = a.bundle.model.state_dict()
    wb = b.bundle.model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
