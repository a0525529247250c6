"""Calibration: fitted maps against scikit-learn, JSON round trip through the bundle, the served figures in
metrics.json, downsampling corrected to the true rate, `ctrkit calibrate` and `ctrkit report`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

import ctrkit
from ctrkit.cli import app
from ctrkit.data.synth import make_click_log, split_by_time, synth_schema, write_splits
from ctrkit.evaluate.calibrate import Calibrator, fit_calibrator
from ctrkit.evaluate.metrics import ece, logloss
from ctrkit.evaluate.report import PLOTS
from ctrkit.serve.bundle import Bundle, BundleError

runner = CliRunner()


def _miscalibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose sigmoid is twice too confident and shifted: the true logit is z / 2 - 1."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(z / 2 - 1)))).astype(np.float64)
    return z, y


def test_platt_and_isotonic_fit_the_literal_maps_and_lower_ece_on_new_rows() -> None:
    z, y = _miscalibrated(20_000, 0)
    zt, yt = _miscalibrated(20_000, 1)
    platt = fit_calibrator("platt", z, y)
    assert platt.params["a"] == pytest.approx(0.5, abs=0.05) and platt.params["b"] == pytest.approx(-1, abs=0.08)
    iso = fit_calibrator("isotonic", z, y)
    ref = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(z, y)
    assert np.allclose(iso(zt), np.clip(ref.predict(zt), 1e-6, 1 - 1e-6))
    cir = fit_calibrator("cir", z, y)
    pooled = ref.predict(z)
    knots = sorted((float(z[pooled == v].mean()), float(v)) for v in set(pooled.tolist()))  # each block's centre
    want = np.interp(zt, [k[0] for k in knots], [k[1] for k in knots])
    assert np.allclose(cir(zt), np.clip(want, 1e-6, 1 - 1e-6))
    raw = 1 / (1 + np.exp(-zt))
    for cal in (platt, iso, cir):
        assert ece(yt, cal(zt)) < ece(yt, raw) / 3
    auto = fit_calibrator("auto", z, y)
    assert auto.method in ("platt", "isotonic", "cir")
    assert set(auto.info["cv_logloss"]) == {"none", "platt", "isotonic", "cir"}
    assert logloss(yt, auto(zt)) < logloss(yt, raw)


def test_centred_isotonic_joins_block_centres_and_keeps_the_model_order() -> None:
    # pooled adjacent violators: {0} -> 0, {1, 2} -> 0.5, {3} -> 1; knots at the blocks' mean logits 0, 1.5, 3
    cal = fit_calibrator("cir", np.array([0.0, 1.0, 2.0, 3.0]), np.array([0.0, 1.0, 0.0, 1.0]))
    assert cal.params == {"x": [0.0, 1.5, 3.0], "y": [0.0, 0.5, 1.0]}
    assert np.allclose(cal(np.array([0.75, 1.5, 2.25, 9.0])), [0.25, 0.5, 0.75, 1 - 1e-6])
    weighted = fit_calibrator("cir", np.array([0.0, 1.0, 2.0, 3.0]), np.array([0.0, 1.0, 0.0, 1.0]),
                              weight=np.array([1.0, 3.0, 1.0, 1.0]))  # block {1, 2}: mean (3 * 1 + 2) / 4
    assert weighted.params == {"x": [0.0, 1.25, 3.0], "y": [0.0, 0.75, 1.0]}
    z, y = _miscalibrated(20_000, 5)
    zt, yt = _miscalibrated(5_000, 6)
    cal = fit_calibrator("cir", z, y)
    p, knots = cal(zt), cal.params["x"]
    inside = (zt > knots[0]) & (zt < knots[-1])
    order = np.argsort(zt[inside])
    assert (np.diff(p[inside][order]) > 0).all()  # no ties: the served order is the model's
    assert roc_auc_score(yt, p) == pytest.approx(roc_auc_score(yt, zt), abs=1e-4)
    steps = fit_calibrator("isotonic", z, y)(zt)  # the step map ties each block's logits
    assert len(np.unique(steps)) < len(np.unique(p)) / 10 and roc_auc_score(yt, steps) < roc_auc_score(yt, zt)


def test_auto_keeps_a_calibrated_model_and_the_shift_comes_first() -> None:
    rng = np.random.default_rng(2)
    z = rng.normal(-2, 1, 5000)
    y = (rng.random(5000) < 1 / (1 + np.exp(-z))).astype(float)
    cal = fit_calibrator("auto", z - np.log(0.1), y, shift=np.log(0.1))
    assert cal.method in ("none", "platt")
    assert np.allclose(Calibrator("none", np.log(0.1))(z - np.log(0.1)), 1 / (1 + np.exp(-z)))


@pytest.mark.parametrize("method", ["none", "platt", "isotonic", "cir"])
def test_the_torch_map_equals_the_numpy_map(method: str) -> None:
    z, y = _miscalibrated(3000, 4)
    cal = fit_calibrator(method, z, y, shift=0.3)
    if method == "isotonic":  # a step (two equal breakpoints) as well as ramps
        cal.params = {"x": [-2.0, 0.0, 0.0, 1.5], "y": [0.1, 0.2, 0.5, 0.9]}
    zt = np.r_[np.linspace(-8, 8, 401), [-2.0, 1.5]]
    got = cal.torch(torch.tensor(zt, dtype=torch.float64)).numpy()
    assert np.allclose(got, cal(zt), atol=1e-12)


def test_calibrator_json_round_trip_and_bad_input() -> None:
    cal = Calibrator("isotonic", -0.5, {"x": [-1.0, 1.0], "y": [0.1, 0.7]})
    again = Calibrator.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert np.array_equal(again(np.array([-3.0, 0.5, 3.0])), cal(np.array([-3.0, 0.5, 3.0])))
    with pytest.raises(ValueError, match="lacks"):
        Calibrator.from_dict({"method": "platt", "params": {"a": 1.0}})
    with pytest.raises(ValueError, match="calibration method"):
        Calibrator("beta")
    with pytest.raises(ValueError, match="both classes"):
        fit_calibrator("platt", np.zeros(5), np.zeros(5))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2%-CTR synthetic log (train / valid / test CSVs) with its schema."""
    d = tmp_path_factory.mktemp("cal")
    return write_splits(make_click_log(n_rows=60_000, n_users=600, n_items=200, ctr=0.02, seed=3)[0], d)


def _train(files: Path, out: Path | None, **kw: object) -> ctrkit.pipeline.Run:
    return ctrkit.train(files / "train.csv", schema=files / "schema.yaml", valid=files / "valid.csv",
                        test=files / "test.csv", model="lr", out=out, progress=False, epochs=4, **kw)


def test_downsampled_negatives_are_corrected_to_the_true_rate(files: Path) -> None:
    full = _train(files, None, calibrate="none")
    down = _train(files, None, calibrate="none", neg_sample_rate=0.05)
    t_full, t_down = full.metrics["test"], down.metrics["test"]
    assert down.metrics["train"]["rows"] < 0.1 * full.metrics["train"]["rows"]
    # served (corrected) probabilities keep the rate; the uncorrected network overshoots it about 1/W-fold
    assert abs(t_down["pred_actual_ratio"] - t_full["pred_actual_ratio"]) < 0.1
    assert t_down["pred_actual_ratio_raw"] > 8
    assert t_down["logloss"] < 1.05 * t_full["logloss"]
    assert down.bundle.calibrator.shift == pytest.approx(np.log(0.05))


def test_bundle_serves_calibrated_probabilities_and_recalibrates(files: Path, tmp_path: Path) -> None:
    run = _train(files, tmp_path / "run", calibrate="platt", report_by=["device", "genre"])
    test = run.metrics["test"]
    for key in ("auc", "logloss", "ece", "pred_actual_ratio", "logloss_raw", "ece_raw", "pred_actual_ratio_raw"):
        assert np.isfinite(test[key])
    b = Bundle.load(tmp_path / "run" / "bundle")
    assert b.calibrator.method == "platt" and b.calibrator.to_dict() == run.bundle.calibrator.to_dict()
    frame = pl.read_csv(files / "test.csv")
    assert np.allclose(b.predict(frame), run.bundle.predict(frame))
    served, _ = b.evaluate(files / "test.csv")
    assert served["logloss"] == pytest.approx(test["logloss"], rel=1e-6)
    res = runner.invoke(app, ["calibrate", str(tmp_path / "run" / "bundle"), str(files / "test.csv"), "--out",
                              str(tmp_path / "v2"), "--method", "isotonic"])
    assert res.exit_code == 0, res.output
    v2 = Bundle.load(tmp_path / "v2")
    assert v2.calibrator.method == "isotonic" and v2.info["version"] == 2
    assert v2.metrics["recalibration"]["method"] == "isotonic"
    (tmp_path / "v2" / "calibration.json").write_text('{"method": "platt", "params": {}}')
    with pytest.raises(BundleError, match="calibration.json"):
        Bundle.load(tmp_path / "v2")


def test_cold_start_rows_are_reported_beside_the_seen_ones(tmp_path: Path) -> None:
    """Many users and few rows: a fifth of the test rows come from users training never saw."""
    log, _ = make_click_log(n_rows=6000, n_users=3000, n_items=100, seed=5)
    tr, va, te = split_by_time(log.drop("p_click"))
    run = ctrkit.train(tr, schema=synth_schema(), valid=va, test=te, model="lr", out=tmp_path, progress=False,
                       epochs=2)
    cold = run.metrics["test"]["cold_start"]
    assert list(cold)[0] == "user_id" and 0.1 < cold["user_id"]["share"] < 0.9
    users = set(tr["user_id"].drop_nulls())
    unseen = te["user_id"].is_not_null() & ~te["user_id"].is_in(list(users))
    assert cold["user_id"]["unseen"]["rows"] >= int(unseen.sum())  # and those seen below min_count
    assert cold["user_id"]["unseen"]["rows"] + cold["user_id"]["seen"]["rows"] == te.height
    page = (tmp_path / "report.html").read_text()
    assert "Cold start on the test rows" in page and "<td>user_id</td>" in page


def test_report_has_every_plot_and_rerenders(files: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _train(files, out, neg_sample_rate=0.2, report_by=["device"])
    page = (out / "report.html").read_text()
    for name in PLOTS:
        assert f'<figure id="{name}"><img alt="{name}" src="data:image/png;base64,' in page
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing fetched
    assert "correction shift -1.6094" in page and "mobile" in page
    assert json.loads((out / "metrics.json").read_text())["test"]["cold_start"] == {}  # 600 users, all seen
    assert "Every value of every field was seen in training." in page
    (out / "report.html").unlink()
    res = runner.invoke(app, ["report", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "report.html").read_text().count("<figure") == page.count("<figure")
    res = runner.invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "metrics.json is missing" in res.output


def test_calibrate_and_report_by_errors_are_named(files: Path) -> None:
    with pytest.raises(ValueError, match="--calibrate must be one of"):
        _train(files, None, calibrate="beta")
    with pytest.raises(ValueError, match="--report-by 'price'"):
        _train(files, None, report_by=["price"])
