"""The torch validation metrics give the NumPy report's figures: ties, weights, one class, several heads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ctrkit.evaluate import fast, metrics

KEYS = ("auc", "logloss", "ece", "pred_actual_ratio", "mean_pred", "positive_rate", "n", "positives")


def same(a: dict, b: dict) -> None:
    for k in KEYS:
        x, y = a[k], b[k]
        if isinstance(y, float) and math.isnan(y):
            assert math.isnan(x), k
        else:
            assert x == pytest.approx(y, rel=1e-9, abs=1e-12), k


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), levels=st.integers(1, 12), weighted=st.booleans(), seed=st.integers(0, 10_000))
@example(n=21, levels=7, weighted=False, seed=3039)  # torch.quantile's edge sat one ulp off a tied prediction
def test_fast_metrics_equal_the_numpy_ones(n: int, levels: int, weighted: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = rng.integers(0, levels + 1, n) / levels  # few distinct values: many ties, 0 and 1 included
    y = (rng.random(n) < 0.3).astype(np.float64)
    w = rng.random(n) * 3 if weighted else None
    want = metrics.evaluate(y, p, weight=w)
    got = fast.evaluate(torch.from_numpy(y), torch.from_numpy(p), None if w is None else torch.from_numpy(w))
    same(got, want)


def test_literal_auc_with_a_tie() -> None:
    # pairs (pos, neg): (0.8, 0.1) 1, (0.8, 0.4) 1, (0.4, 0.1) 1, (0.4, 0.4) 1/2 -> 3.5 / 4
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    p = torch.tensor([0.8, 0.1, 0.4, 0.4])
    assert fast.evaluate(y, p)["auc"] == pytest.approx(0.875)


def test_one_class_gives_nan_auc() -> None:
    out = fast.evaluate(torch.zeros(5), torch.rand(5))
    assert math.isnan(out["auc"]) and math.isnan(out["pred_actual_ratio"])


def test_heads_are_scored_by_name() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random((200, 2)) < 0.4).astype(np.float64)
    p = rng.random((200, 2))
    got = fast.evaluate_heads(torch.from_numpy(y), torch.from_numpy(p), ["click", "buy"])
    want = metrics.evaluate_heads(y, p, ["click", "buy"])
    same(got, want)
    same(got["heads"]["buy"], want["heads"]["buy"])


def test_bad_predictions_are_named() -> None:
    with pytest.raises(ValueError, match="probabilities"):
        fast.evaluate(torch.ones(3), torch.tensor([0.2, float("nan"), 0.5]))
    with pytest.raises(ValueError, match="length"):
        fast.evaluate(torch.ones(3), torch.ones(2))
