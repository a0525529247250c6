"""Metrics against scikit-learn and literal per-bin / per-group computations."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import assume, given, settings
from sklearn.metrics import log_loss, roc_auc_score

from ctrkit.evaluate.metrics import auc, calibration_bins, cold_start, ece, evaluate, group_auc, logloss


@st.composite
def labelled_scores(draw: st.DrawFn, min_size: int = 2, max_size: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Labels with both classes and scores drawn from a few levels (many ties) or from the whole interval."""
    n = draw(st.integers(min_size, max_size))
    y = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)), dtype=np.float64)
    levels = draw(st.sampled_from([2, 5, 1000]))
    p = np.array(draw(st.lists(st.integers(0, levels), min_size=n, max_size=n)), dtype=np.float64) / levels
    return y, p


@settings(max_examples=60, deadline=None)
@given(labelled_scores())
def test_auc_equals_sklearn_with_ties(data: tuple[np.ndarray, np.ndarray]) -> None:
    y, p = data
    assume(0 < y.sum() < len(y))
    assert auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_auc_simple_cases() -> None:
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert auc(np.array([True, False]), np.array([0.9, 0.1])) == 1.0


@settings(max_examples=40, deadline=None)
@given(labelled_scores())
def test_logloss_equals_sklearn(data: tuple[np.ndarray, np.ndarray]) -> None:
    y, p = data
    p = 0.001 + 0.998 * p
    assert logloss(y, p) == pytest.approx(log_loss(y, p, labels=[0, 1]), rel=1e-12)


def test_logloss_clips_certain_mistakes() -> None:
    assert logloss([1, 0], [0.0, 1.0]) == pytest.approx(-math.log(1e-7))
    assert logloss([1, 0], [1.0, 0.0]) == pytest.approx(-math.log(1 - 1e-7))


def ece_literal(y: np.ndarray, p: np.ndarray, edges: np.ndarray) -> float:
    """Per-bin |rate - mean prediction| weighted by count; bin k is [e_k, e_k+1), the last one closed."""
    total, n = 0.0, 0
    for k in range(len(edges) - 1):
        last = k == len(edges) - 2
        inside = [i for i in range(len(p))
                  if edges[k] <= p[i] and (p[i] < edges[k + 1] or (last and p[i] <= edges[k + 1]))]
        if inside:
            gap = abs(np.mean(y[inside]) - np.mean(p[inside]))
            total += len(inside) * gap
            n += len(inside)
    assert n == len(p)
    return total / n


@settings(max_examples=40, deadline=None)
@given(labelled_scores(min_size=1), st.integers(1, 12), st.sampled_from(["quantile", "uniform"]))
def test_ece_equals_literal_per_bin_computation(data: tuple[np.ndarray, np.ndarray], n_bins: int,
                                                strategy: str) -> None:
    y, p = data
    b = calibration_bins(y, p, n_bins, strategy)
    if strategy == "uniform":
        assert np.allclose(b["edges"], np.arange(n_bins + 1) / n_bins)
    else:
        assert np.array_equal(b["edges"], np.unique(np.quantile(p, np.linspace(0, 1, n_bins + 1))))
    edges = b["edges"] if len(b["edges"]) > 1 else np.array([b["edges"][0]] * 2)
    assert ece(y, p, n_bins, strategy) == pytest.approx(ece_literal(y, p, edges), abs=1e-12)
    assert b["count"].sum() == len(y)


def test_calibration_bins_quantile_have_equal_mass() -> None:
    rng = np.random.default_rng(0)
    p = rng.random(1000) * 0.1
    y = (rng.random(1000) < p).astype(float)
    b = calibration_bins(y, p, n_bins=10)
    assert b["count"].tolist() == [100.0] * 10
    u = calibration_bins(y, p, n_bins=10, strategy="uniform")
    assert u["count"][0] == 1000 and u["count"][1:].sum() == 0
    assert ece(y, y * 0 + y.mean(), n_bins=1) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="n_bins"):
        calibration_bins(y, p, n_bins=0)
    with pytest.raises(ValueError, match="strategy"):
        calibration_bins(y, p, strategy="kmeans")


def group_auc_literal(y: np.ndarray, p: np.ndarray, g: np.ndarray) -> float:
    """Per-group sklearn AUC, weighted by the group's impressions, over groups with both classes."""
    total, weight = 0.0, 0
    for key in set(g.tolist()):
        m = g == key
        if 0 < y[m].sum() < m.sum():
            total += roc_auc_score(y[m], p[m]) * m.sum()
            weight += m.sum()
    return total / weight if weight else float("nan")


@settings(max_examples=40, deadline=None)
@given(labelled_scores(min_size=1), st.integers(1, 6), st.randoms(use_true_random=False))
def test_group_auc_equals_literal_weighted_average(data: tuple[np.ndarray, np.ndarray], n_groups: int,
                                                   rnd: object) -> None:
    y, p = data
    g = np.array([rnd.randrange(n_groups) for _ in range(len(y))])  # type: ignore[attr-defined]
    want = group_auc_literal(y, p, g)
    got = group_auc(y, p, g)
    if math.isnan(want):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(want, abs=1e-12)


def test_group_auc_string_groups_and_single_class_groups() -> None:
    y = np.array([1, 0, 1, 0, 1, 1])
    p = np.array([0.9, 0.1, 0.2, 0.8, 0.5, 0.6])
    g = np.array(["a", "a", "b", "b", "c", "c"])
    assert group_auc(y, p, g) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one value per row"):
        group_auc(y, p, g[:3])


def test_evaluate_report() -> None:
    rng = np.random.default_rng(1)
    p = rng.random(500) * 0.5
    y = (rng.random(500) < p).astype(float)
    g = rng.integers(0, 20, 500)
    out = evaluate(y, p)
    assert set(out) == {"auc", "logloss", "ece", "pred_actual_ratio", "mean_pred", "positive_rate", "n", "positives"}
    assert out["auc"] == pytest.approx(roc_auc_score(y, p))
    assert out["logloss"] == pytest.approx(log_loss(y, p))
    assert out["pred_actual_ratio"] == pytest.approx(p.mean() / y.mean())
    assert (out["n"], out["positives"]) == (500, int(y.sum()))
    with_groups = evaluate(y, p, group=g)
    assert with_groups["gauc"] == pytest.approx(group_auc_literal(y, p, g))


def test_one_class_and_empty_inputs_give_nan() -> None:
    assert math.isnan(auc([1, 1, 1], [0.2, 0.5, 0.7]))
    assert math.isnan(auc([0, 0], [0.2, 0.5]))
    assert math.isnan(group_auc([1, 1, 0], [0.2, 0.5, 0.1], ["a", "a", "b"]))
    out = evaluate(np.zeros(4), np.full(4, 0.1))
    assert math.isnan(out["auc"]) and math.isnan(out["pred_actual_ratio"]) and out["positives"] == 0
    empty = evaluate(np.zeros(0), np.zeros(0))
    assert empty["n"] == 0 and math.isnan(empty["auc"]) and math.isnan(empty["logloss"]) and math.isnan(empty["ece"])


@pytest.mark.parametrize("fn", [auc, logloss, ece, evaluate])
@pytest.mark.parametrize("y, p, match", [([0, 1, 1], [0.1, 0.2], "differ in length"),
                                         ([0, 2], [0.1, 0.2], "labels must be 0 or 1"),
                                         ([0, 0.5], [0.1, 0.2], "labels must be 0 or 1"),
                                         ([0, 1], [0.1, float("nan")], "probabilities"),
                                         ([0, 1], [-0.1, 0.2], "probabilities"),
                                         ([0, 1], [0.1, 1.5], "probabilities"),
                                         ([0, 1], [0.1, float("inf")], "probabilities")])
def test_bad_input_is_rejected(fn: object, y: list, p: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fn(np.array(y), np.array(p))  # type: ignore[operator]


@st.composite
def weighted_scores(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labelled scores with integer weights 0..3 (so a weight can be checked against repeated rows)."""
    y, p = draw(labelled_scores(min_size=2, max_size=80))
    w = np.array(draw(st.lists(st.integers(0, 3), min_size=len(y), max_size=len(y))), dtype=np.float64)
    return y, p, w


@settings(max_examples=60, deadline=None)
@given(weighted_scores())
def test_weighted_metrics_equal_sklearn_and_repeated_rows(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    y, p, w = data
    pos, neg = float(np.dot(w, y)), float(np.dot(w, 1 - y))
    assume(pos > 0 and neg > 0)
    assert auc(y, p, w) == pytest.approx(roc_auc_score(y, p, sample_weight=w), abs=1e-12)
    assert logloss(y, p, w) == pytest.approx(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), sample_weight=w,
                                                      labels=[0, 1]), rel=1e-10)
    reps = w.astype(int)
    yr, pr = np.repeat(y, reps), np.repeat(p, reps)
    got, want = evaluate(y, p, weight=w), evaluate(yr, pr)
    for k in ("auc", "logloss", "pred_actual_ratio", "mean_pred", "positive_rate"):
        assert got[k] == pytest.approx(want[k], rel=1e-10, abs=1e-12)
    b = calibration_bins(y, p, 1, weight=w)
    assert b["count"][0] == pytest.approx(w.sum())
    assert b["mean_pred"][0] == pytest.approx(np.dot(w, p) / w.sum())
    assert ece(y, p, n_bins=1, weight=w) == pytest.approx(abs(np.dot(w, p) - pos) / w.sum(), abs=1e-12)


def weighted_group_auc_loop(y: np.ndarray, p: np.ndarray, g: np.ndarray, w: np.ndarray) -> float:
    """Per-group pairwise loop: sum over (positive, negative) pairs of w_i w_j [p_i > p_j] (ties 1/2)."""
    total, mass = 0.0, 0.0
    for key in sorted(set(g.tolist())):
        idx = np.flatnonzero(g == key)
        num = den = 0.0
        for i in idx:
            for j in idx:
                if y[i] == 1 and y[j] == 0:
                    num += w[i] * w[j] * (1.0 if p[i] > p[j] else 0.5 if p[i] == p[j] else 0.0)
                    den += w[i] * w[j]
        if den > 0:
            total += num / den * w[idx].sum()
            mass += w[idx].sum()
    return total / mass if mass else float("nan")


@settings(max_examples=40, deadline=None)
@given(weighted_scores(), st.integers(1, 5), st.randoms(use_true_random=False))
def test_weighted_group_auc_equals_a_per_group_loop(data: tuple[np.ndarray, np.ndarray, np.ndarray], n_groups: int,
                                                    rnd: object) -> None:
    y, p, w = data
    g = np.array([rnd.randrange(n_groups) for _ in range(len(y))])  # type: ignore[attr-defined]
    want, got = weighted_group_auc_loop(y, p, g, w), group_auc(y, p, g, w)
    assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want, abs=1e-12)


def test_bad_weights_are_rejected() -> None:
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        auc([0, 1], [0.2, 0.4], [1.0, -1.0])
    with pytest.raises(ValueError, match="weights and labels differ"):
        logloss([0, 1], [0.2, 0.4], [1.0])


def test_cold_start_splits_each_field_into_unseen_and_seen_rows() -> None:
    y = np.array([1, 0, 1, 0, 1, 0, 0, 1], dtype=float)
    p = np.array([0.9, 0.2, 0.4, 0.6, 0.7, 0.1, 0.3, 0.8])
    w = np.array([1, 2, 1, 1, 1, 1, 2, 1], dtype=float)
    item = np.array([1, 1, 1, 0, 0, 0, 0, 0], dtype=bool)
    user = np.array([0, 0, 0, 0, 0, 0, 0, 1], dtype=bool)
    got = cold_start(y, p, [("user", user), ("item", item), ("never", np.zeros(8, bool))], w)
    assert list(got) == ["item", "user"]  # most often cold first; a field without cold rows is left out
    for name, m in (("item", item), ("user", user)):
        assert got[name]["share"] == m.mean()
        for part, rows in (("unseen", m), ("seen", ~m)):
            r = got[name][part]
            assert r["rows"] == rows.sum() and r["clicks"] == y[rows].sum()
            assert r["logloss"] == pytest.approx(log_loss(y[rows], p[rows], sample_weight=w[rows], labels=[0, 1]))
            if 0 < y[rows].sum() < rows.sum():
                assert r["auc"] == pytest.approx(roc_auc_score(y[rows], p[rows], sample_weight=w[rows]))
            else:
                assert math.isnan(r["auc"])
            assert r["pred_actual_ratio"] == pytest.approx(np.dot(w[rows], p[rows]) / np.dot(w[rows], y[rows]))
