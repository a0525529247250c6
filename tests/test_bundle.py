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
           "weekday": 2, "position": 1, "gender": None, "device": None, "price": None, "user_activity": None}
    p = bundle.predict(rec)
    assert p.shape == (1,) and 0.0 < p[0] < 1.0
    frame = pl.DataFrame({k: [v] for k, v in rec.items() if v is not None}).with_columns(
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
    with pytest.raises(DataError, match=r"record 2: field 'price': not a number"):
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


@pytest.fixture(scope="module")
def other_run(trained: tuple[Path, pl.DataFrame, Bundle], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second run on another sample of the same kind of log: the same fields, its own vocabulary and weights."""
    out = tmp_path_factory.mktemp("other")
    log, _ = make_click_log(n_rows=6000, n_users=300, n_items=200, seed=4)
    tr, va, te = split_by_time(log.drop("p_click"))
    train(tr, schema=synth_schema(), valid=va, test=te, model="deepfm", out=out, epochs=1, batch_size=512,
          seed=9, progress=False)
    return out / "bundle"


def _resign(folder: Path) -> None:
    """Recompute the manifest's sums as someone covering their tracks would (keeping its run)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {name: _sha(folder / name) for name in manifest["files"] if (folder / name).exists()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flip_weight_byte(b: Path, other: Path) -> None:
    data = bytearray((b / "weights.safetensors").read_bytes())
    data[-5] ^= 0x01
    (b / "weights.safetensors").write_bytes(bytes(data))


def _nan_weights(b: Path, other: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(b / "weights.safetensors"), framework="pt") as fh:
        meta, state = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    key = next(k for k, v in sorted(state.items()) if v.is_floating_point() and v.numel())
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(b / "weights.safetensors"), metadata=meta)
    _resign(b)


def _weights_of_other_run(b: Path, other: Path) -> None:
    shutil.copy(other / "weights.safetensors", b / "weights.safetensors")


def _weights_of_other_run_resigned(b: Path, other: Path) -> None:
    shutil.copy(other / "weights.safetensors", b / "weights.safetensors")
    _resign(b)


def _vocabulary_of_other_run(b: Path, other: Path) -> None:
    shutil.copy(other / "encoder" / "vocab.parquet", b / "encoder" / "vocab.parquet")


def _everything_but_weights_of_other_run(b: Path, other: Path) -> None:
    for name in ("manifest.json", "model.json", "encoder/vocab.parquet"):
        shutil.copy(other / name, b / name)
    _resign(b)


def _deleted(name: str):  # noqa: ANN202 - a small factory of tamperings
    def tamper(b: Path, other: Path) -> None:
        (b / name).unlink()
    tamper.__name__ = f"deleted_{name}"
    return tamper


def _manifest_names(name: str):  # noqa: ANN202
    def tamper(b: Path, other: Path) -> None:
        manifest = json.loads((b / "manifest.json").read_text())
        manifest["files"][name] = "0" * 64
        (b / "manifest.json").write_text(json.dumps(manifest))
    tamper.__name__ = f"manifest_names_{name}"
    return tamper


def _changed_config(b: Path, other: Path) -> None:
    meta = json.loads((b / "model.json").read_text())
    meta["config"]["hidden"] = [8, 8]
    (b / "model.json").write_text(json.dumps(meta))
    _resign(b)


def _extra_file(b: Path, other: Path) -> None:
    (b / "calibrator.json").write_text("{}")


def _damaged_weights(b: Path, other: Path) -> None:
    (b / "weights.safetensors").write_bytes(b"\x00" * 64)
    _resign(b)


TAMPERINGS = [
    (_flip_weight_byte, "weights.safetensors: contents differ from the sha256"),
    (_nan_weights, r"weights.safetensors: weight '.*' has 1 non-finite value"),
    (_weights_of_other_run, "weights.safetensors: contents differ"),
    (_weights_of_other_run_resigned, "weights.safetensors: comes from training run"),
    (_vocabulary_of_other_run, "vocab.parquet: contents differ"),
    (_everything_but_weights_of_other_run, "encoder: vocabulary of 'user_id' has 290 values, metadata says 292"),
    (_deleted("weights.safetensors"), r"weights.safetensors is missing \(listed in manifest.json\)"),
    (_deleted("encoder/encoder.json"), r"encoder/encoder.json is missing"),
    (_deleted("schema.yaml"), r"schema.yaml is missing"),
    (_deleted("manifest.json"), r"manifest.json is missing"),
    (_manifest_names("../x"), r"manifest.json: the file name '../x' leaves the bundle folder"),
    (_manifest_names("/etc/passwd"), r"manifest.json: the file name '/etc/passwd' leaves the bundle folder"),
    (_manifest_names("encoder/../../x"), r"the file name 'encoder/../../x' leaves the bundle folder"),
    (_changed_config, "has shape"),
    (_extra_file, "calibrator.json is not listed in manifest.json"),
    (_damaged_weights, "weights.safetensors: not a readable safetensors file"),
]


@pytest.mark.parametrize("tamper, message", TAMPERINGS, ids=[t.__name__ for t, _ in TAMPERINGS])
def test_tampered_bundles_are_refused(trained: tuple[Path, pl.DataFrame, Bundle], other_run: Path,
                                      tmp_path: Path, tamper, message: str) -> None:
    out, _, _ = trained
    folder = tmp_path / "b"
    shutil.copytree(out / "bundle", folder)
    Bundle.load(folder)  # the copy itself is fine
    tamper(folder, other_run)
    with pytest.raises(BundleError, match=message):
        Bundle.load(folder)


def test_other_schema_in_bundle_is_refused(trained: tuple[Path, pl.DataFrame, Bundle], tmp_path: Path) -> None:
    out, _, _ = trained
    swapped = tmp_path / "b3"
    shutil.copytree(out / "bundle", swapped)
    schema = synth_schema()
    schema.fields.append(Field(name="extra"))
    schema.save(swapped / "schema.yaml")
    with pytest.raises(BundleError, match="schema.yaml: contents differ"):
        Bundle.load(swapped)
    _resign(swapped)
    with pytest.raises(BundleError, match="encoder"):
        Bundle.load(swapped)


def test_saving_over_a_bundle_replaces_its_files(trained: tuple[Path, pl.DataFrame, Bundle],
                                                 tmp_path: Path) -> None:
    out, test_df, _ = trained
    folder = tmp_path / "b"
    shutil.copytree(out / "bundle", folder)
    (folder / "calibrator.json").write_text("{}")  # a part of an older save
    b = Bundle.load(out / "bundle")
    b.save(folder)
    assert not (folder / "calibrator.json").exists()
    assert np.allclose(Bundle.load(folder).predict(test_df.head(5)), b.predict(test_df.head(5)))


def test_a_run_folder_or_a_bundle_file_points_at_the_bundle(trained: tuple[Path, pl.DataFrame, Bundle]) -> None:
    out, _, _ = trained
    with pytest.raises(BundleError, match=f"^{out} is a training run folder; its bundle is {out / 'bundle'}$"):
        Bundle.load(out)
    with pytest.raises(BundleError, match="no such bundle folder; a bundle is the folder that holds it"):
        Bundle.load(out / "bundle" / "model.json")


def test_non_finite_weights_are_not_saved(trained: tuple[Path, pl.DataFrame, Bundle], tmp_path: Path) -> None:
    out, _, _ = trained
    b = Bundle.load(out / "bundle")
    with torch.no_grad():
        next(iter(b.model.parameters()))[0] = float("inf")
    with pytest.raises(BundleError, match=r"cannot save .*: weight '.*' has 1 non-finite value"):
        b.save(tmp_path / "inf")
    assert not (tmp_path / "inf").exists()


def test_a_bundle_is_not_saved_among_other_files(trained: tuple[Path, pl.DataFrame, Bundle], tmp_path: Path) -> None:
    """Every file under a bundle folder is listed in its manifest: saved into a folder of other files, the bundle
    would have taken them in."""
    out, _, _ = trained
    b = Bundle.load(out / "bundle")
    (tmp_path / "runs" / "old").mkdir(parents=True)
    (tmp_path / "runs" / "old" / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="holds files that are not a bundle's; a bundle needs a folder of its own"):
        b.save(tmp_path / "runs")
    assert sorted(p.name for p in (tmp_path / "runs").rglob("*")) == ["notes.txt", "old"]
    (tmp_path / "empty").mkdir()
    b.save(tmp_path / "empty")
    b.save(tmp_path / "empty")  # over a bundle: allowed, its files replaced
    assert np.allclose(Bundle.load(tmp_path / "empty").predict(trained[1].head(5)), b.predict(trained[1].head(5)))


@pytest.mark.parametrize("part", ["valid", "test"])
def test_training_frame_given_again_is_refused(part: str, tmp_path: Path) -> None:
    log, _ = make_click_log(n_rows=600, n_users=50, n_items=30, seed=2)
    frame = log.drop("p_click")
    with pytest.raises(ValueError, match=f"^{part} is the training frame itself"):
        train(frame, schema=synth_schema(), model="lr", out=tmp_path / "o", progress=False, **{part: frame})
    assert not (tmp_path / "o").exists()


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
    kept = side.read_text().splitlines()[1:]
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
