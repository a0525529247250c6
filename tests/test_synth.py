"""Synthetic click logs: deterministic, well-formed, and carrying the planted effects."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from ctrkit.data.synth import (SynthConfig, examination_curve, make_click_log, solve_intercept, split_by_time,
                               synth_schema, write_splits, zipf_weights)
from ctrkit.schema import Schema


def test_same_seed_same_log():
    a, _ = make_click_log(n_rows=2000, seed=3)
    b, _ = make_click_log(n_rows=2000, seed=3)
    c, _ = make_click_log(n_rows=2000, seed=4)
    assert a.equals(b)
    assert not a.equals(c)


def test_log_fits_its_schema_and_rates():
    df, truth = make_click_log(n_rows=20_000, ctr=0.1, seed=1)
    s = synth_schema()
    assert set(s.input_columns + s.role_columns) <= set(df.columns)
    assert df["timestamp"].is_sorted()
    assert abs(df["p_click"].mean() - 0.1) < 0.01
    assert abs(df["click"].mean() - 0.1) < 0.015
    assert 0.005 < df["gender"].null_count() / df.height < 0.04
    assert np.all(np.diff(truth.examination) < 0)


def test_item_drift_moves_each_items_rate_over_the_days_and_leaves_the_rest():
    plain, _ = make_click_log(n_rows=30_000, n_items=50, seed=5)
    steady, _ = make_click_log(n_rows=30_000, n_items=50, seed=5, item_drift=0.0)
    assert plain.equals(steady)
    drifting, _ = make_click_log(n_rows=30_000, n_items=50, seed=5, item_drift=0.5)
    assert drifting.drop("p_click", "click").equals(plain.drop("p_click", "click"))
    assert abs(drifting["p_click"].mean() - SynthConfig().ctr) < 0.01

    def early_late_correlation(df: pl.DataFrame) -> float:
        day = (pl.col("timestamp") - pl.col("timestamp").min()).dt.total_days()
        rates = df.group_by("item_id").agg(pl.col("p_click").filter(day < 2).mean().alias("early"),
                                           pl.col("p_click").filter(day >= 12).mean().alias("late")).drop_nulls()
        return float(np.corrcoef(rates["early"], rates["late"])[0, 1])

    assert early_late_correlation(plain) > 0.8
    assert early_late_correlation(drifting) < early_late_correlation(plain) - 0.3
    with pytest.raises(ValueError, match="item_drift"):
        SynthConfig(item_drift=-1.0)


def test_position_bias_is_visible():
    df, _ = make_click_log(n_rows=30_000, seed=2)
    by_pos = df.group_by("position").agg(pl.col("click").mean().alias("ctr")).sort("position")
    ctr = by_pos["ctr"].to_numpy()
    assert ctr[0] > 2 * ctr[-1]


def test_helpers():
    w = zipf_weights(10, 1.0)
    assert w.sum() == pytest.approx(1.0) and np.all(np.diff(w) < 0)
    assert examination_curve(3, 1.0).tolist() == pytest.approx([1.0, 0.5, 1 / 3])
    logit = np.linspace(-2, 2, 101)
    b = solve_intercept(logit, 1.0, 0.2)
    assert np.mean(1 / (1 + np.exp(-(logit + b)))) == pytest.approx(0.2, abs=1e-6)
    with pytest.raises(ValueError):
        SynthConfig(ctr=1.5)
    with pytest.raises(ValueError):
        zipf_weights(0, 1.0)


def test_split_by_time():
    df, _ = make_click_log(n_rows=1000, seed=0)
    tr, va, te = split_by_time(df)
    assert (tr.height, va.height, te.height) == (800, 100, 100)
    assert tr["timestamp"].max() <= va["timestamp"].min() <= te["timestamp"].min()
    with pytest.raises(ValueError):
        split_by_time(df, (0.5, 0.2, 0.2))


def test_write_splits_cuts_by_time_and_leaves_the_truth_out(tmp_path) -> None:
    log, _ = make_click_log(n_rows=1000, n_users=50, n_items=20, seed=2)
    folder = write_splits(log, tmp_path / "data")
    parts = {name: pl.read_csv(folder / f"{name}.csv", try_parse_dates=True) for name in ("train", "valid", "test")}
    assert [p.height for p in parts.values()] == [800, 100, 100]
    assert all("p_click" not in p.columns for p in parts.values())
    assert parts["train"]["timestamp"].max() <= parts["valid"]["timestamp"].min()
    assert parts["valid"]["timestamp"].max() <= parts["test"]["timestamp"].min()
    assert Schema.load(folder / "schema.yaml").fingerprint() == synth_schema().fingerprint()
