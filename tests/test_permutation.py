"""Permutation importance: what shuffling each input column costs a bundle's served probabilities, for any model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from ctrkit.cli import app
from ctrkit.evaluate.explain import permutation_importance, shows_weights
from ctrkit.evaluate.metrics import auc, logloss
from ctrkit.pipeline import train
from ctrkit.schema import Field, Schema
from ctrkit.serve.bundle import Bundle

SCHEMA = Schema(fields=[Field("signal"), Field("noise"), Field("amount", kind="numeric")], label="click")


def _log(n: int, seed: int) -> pl.DataFrame:
    """Clicks that depend on ``signal`` strongly, on ``amount`` a little and on ``noise`` not at all."""
    rng = np.random.default_rng(seed)
    signal, noise, amount = rng.integers(0, 6, n), rng.integers(0, 6, n), rng.normal(size=n)
    p = 1 / (1 + np.exp(-(2.0 * (signal - 2.5) / 2.5 + 0.3 * amount - 1.0)))
    return pl.DataFrame({"signal": [f"s{v}" for v in signal], "noise": [f"n{v}" for v in noise], "amount": amount,
                         "click": (rng.random(n) < p).astype(int)})


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Bundle, Path]:
    d = tmp_path_factory.mktemp("perm")
    _log(6000, 1).write_csv(d / "test.csv")
    run = train(_log(6000, 0), schema=SCHEMA, valid=_log(2000, 2), model="deepfm", out=d / "run", epochs=3,
                progress=False, seed=0)
    return run.bundle, d


def test_each_figure_is_the_loss_of_its_own_shuffles(bundle: tuple[Bundle, Path]) -> None:
    """Against a literal recomputation: the same seeded shuffles, column by column in schema order."""
    b, d = bundle
    got = permutation_importance(b, d / "test.csv", max_rows=500, repeats=2, seed=7)
    frame = pl.read_csv(d / "test.csv").head(500)
    y = frame["click"].to_numpy().astype(float)
    base = b.predict(frame)
    rng = np.random.default_rng(7)
    want = {}
    for name in ("signal", "noise", "amount"):
        drops, rises = [], []
        for _ in range(2):
            p = b.predict(frame.with_columns(frame[name].gather(rng.permutation(500))))
            drops.append(auc(y, base) - auc(y, p))
            rises.append(logloss(y, p) - logloss(y, base))
        want[name] = (np.mean(drops), np.std(drops), np.mean(rises), np.std(rises))
    assert got.rows == 500 and got.repeats == 2 and got.auc == pytest.approx(auc(y, base), abs=1e-12)
    for r in got.fields:
        assert (r["auc_drop"], r["auc_drop_std"], r["logloss_rise"], r["logloss_rise_std"]) == \
            pytest.approx(want[r["field"]], abs=1e-12), r["field"]
    assert [r["auc_drop"] for r in got.fields] == sorted((r["auc_drop"] for r in got.fields), reverse=True)


def test_the_column_clicks_depend_on_ranks_first(bundle: tuple[Bundle, Path]) -> None:
    b, d = bundle
    got = permutation_importance(b, d / "test.csv")
    by = {r["field"]: r for r in got.fields}
    assert [r["field"] for r in got.fields][0] == "signal" and by["signal"]["auc_drop"] > 0.1
    assert by["amount"]["auc_drop"] > 5 * max(abs(by["noise"]["auc_drop"]), 1e-3)
    assert abs(by["noise"]["auc_drop"]) < 0.01 and got.rows == 6000


def test_bad_requests_are_named(bundle: tuple[Bundle, Path], tmp_path: Path) -> None:
    b, d = bundle
    pl.read_csv(d / "test.csv").drop("click").write_csv(tmp_path / "unlabelled.csv")
    with pytest.raises(Exception, match=r"missing columns \['click'\]"):
        permutation_importance(b, tmp_path / "unlabelled.csv")
    for kwargs, said in (({"repeats": 0}, "--repeats must be at least 1, got 0"),
                         ({"max_rows": -1}, "--rows must be at least 1, got -1"),
                         ({"seed": -1}, "--seed must be >= 0, got -1")):
        with pytest.raises(ValueError, match=said):
            permutation_importance(b, d / "test.csv", **kwargs)


def test_cli_explains_any_model_by_shuffling_where_it_shows_no_weights(bundle: tuple[Bundle, Path]) -> None:
    b, d = bundle
    assert not shows_weights(b.model)
    res = CliRunner().invoke(app, ["explain", str(d / "run" / "bundle"), str(d / "test.csv"), "--rows", "800",
                                   "--repeats", "2", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["kind"] == "permutation" and doc["rows"] == 800 and doc["fields"][0]["field"] == "signal"
    res = CliRunner().invoke(app, ["explain", str(d / "run" / "bundle"), str(d / "test.csv"), "--rows", "800"])
    assert res.exit_code == 0 and "permutation importance" in res.output and "AUC drop" in res.output
    res = CliRunner().invoke(app, ["explain", str(d / "run" / "bundle"), str(d / "test.csv"), "--method", "weights"])
    assert res.exit_code == 2 and "has no field weights to show" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["explain", str(d / "run" / "bundle"), str(d / "test.csv"), "--method", "shap"])
    assert res.exit_code == 2 and "--method must be auto, weights or permutation, got 'shap'" in res.output
