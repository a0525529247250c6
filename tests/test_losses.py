"""Losses against their literal formulas, sample weights honoured, and the downsampling correction."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from ctrkit.data.dataset import EncodedData
from ctrkit.training.losses import bce, focal, make_loss, weighted_bce
from ctrkit.training.sampling import correct, downsample_negatives, logit_shift, prior_logit


def _batch(seed: int, n: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g, dtype=torch.float64) * 3
    y = (torch.rand(n, generator=g) < 0.3).double()
    w = torch.rand(n, generator=g, dtype=torch.float64) * 5
    return z, y, w


def _literal(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, per_row: object) -> float:
    total, mass = 0.0, 0.0
    for zi, yi, wi in zip(z.tolist(), y.tolist(), w.tolist()):
        p = 1 / (1 + math.exp(-zi))
        total += wi * per_row(p, yi)  # type: ignore[operator]
        mass += wi
    return total / mass


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.1, 20), st.floats(0.05, 0.95), st.floats(0, 4))
def test_losses_match_literal_formulas(seed: int, pw: float, alpha: float, gamma: float) -> None:
    z, y, w = _batch(seed)
    want_bce = _literal(z, y, w, lambda p, t: -(t * math.log(p) + (1 - t) * math.log(1 - p)))
    want_w = _literal(z, y, w, lambda p, t: -(pw * t * math.log(p) + (1 - t) * math.log(1 - p)))
    want_f = _literal(z, y, w, lambda p, t: -(alpha * t * (1 - p) ** gamma * math.log(p)
                                               + (1 - alpha) * (1 - t) * p ** gamma * math.log(1 - p)))
    assert float(bce(z, y, w)) == pytest.approx(want_bce, rel=1e-9)
    assert float(weighted_bce(z, y, w, pos_weight=pw)) == pytest.approx(want_w, rel=1e-9)
    assert float(focal(z, y, w, alpha=alpha, gamma=gamma)) == pytest.approx(want_f, rel=1e-9, abs=1e-12)


def test_unit_weights_are_the_plain_mean_and_integer_weights_repeat_rows() -> None:
    z, y, _ = _batch(3, 20)
    ones = torch.ones_like(z)
    for loss in (bce, make_loss("weighted", pos_weight=4.0), make_loss("focal", alpha=0.3, gamma=1.5)):
        assert float(loss(z, y, None)) == pytest.approx(float(loss(z, y, ones)), rel=1e-12)
        reps = torch.tensor([1, 3, 0, 2] * 5)
        want = loss(z.repeat_interleave(reps), y.repeat_interleave(reps), None)
        assert float(loss(z, y, reps.double())) == pytest.approx(float(want), rel=1e-12)
    # focal with gamma 0 and alpha 1/2 is half the cross-entropy
    assert float(focal(z, y, None, alpha=0.5, gamma=0.0)) == pytest.approx(0.5 * float(bce(z, y)), rel=1e-12)


@pytest.mark.parametrize("kwargs, match", [({"name": "hinge"}, "loss must be one of"),
                                           ({"name": "weighted", "pos_weight": 0.0}, "pos_weight"),
                                           ({"name": "focal", "alpha": 1.0}, "alpha"),
                                           ({"name": "focal", "gamma": -1.0}, "gamma")])
def test_bad_loss_settings_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_loss(**kwargs)


@settings(max_examples=40, deadline=None)
@given(st.floats(1e-4, 1 - 1e-4), st.floats(0.01, 1.0))
def test_correction_is_the_exact_formula_and_a_logit_shift(p: float, w: float) -> None:
    q = float(correct(np.array([p]), w)[0])
    assert q == pytest.approx(p / (p + (1 - p) / w), rel=1e-12)
    shifted = 1 / (1 + math.exp(-(math.log(p / (1 - p)) + logit_shift(w))))
    assert shifted == pytest.approx(q, rel=1e-9)
    # a class weight k on positives is undone like downsampling negatives at 1/k
    assert logit_shift(1.0, 1 / w) == pytest.approx(logit_shift(w), rel=1e-12)


def test_downsampling_keeps_every_positive_and_the_asked_share_of_negatives() -> None:
    rng = np.random.default_rng(0)
    n = 200_000
    label = (rng.random(n) < 0.02).astype(np.float32)
    data = EncodedData(ids=np.arange(n, dtype=np.int32).reshape(-1, 1), dense=np.zeros((n, 0), np.float32),
                       label=label, weight=rng.random(n).astype(np.float32))
    kept = downsample_negatives(data, 0.05, seed=1)
    assert kept.label.sum() == label.sum()
    neg = int((kept.label == 0).sum())
    assert abs(neg / (label == 0).sum() - 0.05) < 4 * math.sqrt(0.05 * 0.95 / (label == 0).sum())
    assert np.all(np.diff(kept.ids[:, 0]) > 0)  # original order
    assert np.array_equal(kept.weight, data.weight[kept.ids[:, 0]])
    assert downsample_negatives(data, 1.0) is data
    with pytest.raises(ValueError, match="neg_sample_rate"):
        downsample_negatives(data, 0.0)


def test_prior_logit_is_the_weighted_log_odds() -> None:
    y = np.array([1, 0, 0, 0, 1.0])
    w = np.array([2, 1, 1, 1, 1.0])
    assert prior_logit(y) == pytest.approx(math.log(2 / 3))
    assert prior_logit(y, w) == pytest.approx(math.log(3 / 3))
    assert prior_logit(y, w, pos_weight=4) == pytest.approx(math.log(4))
    assert prior_logit(np.zeros(3)) == 0.0
