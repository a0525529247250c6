"""Negative downsampling, and the exact correction that keeps served probabilities unbiased.

Keeping every positive and a fraction W of the negatives multiplies the odds the model learns by 1/W;
weighting positives by ``pos_weight`` multiplies them by ``pos_weight``. Both are undone exactly by a shift
of the logit, q = p / (p + (1 - p) / W), i.e. logit(q) = logit(p) + log W - log pos_weight, which the bundle
applies before any calibrator.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ctrkit.data.dataset import EncodedData
from ctrkit.nn.embedding import FeatureLinear


def check_rate(rate: float) -> None:
    """A negative sampling rate must be in (0, 1]."""
    if not 0 < rate <= 1:
        raise ValueError(f"neg_sample_rate must be in (0, 1], got {rate}")


def downsample_negatives(data: EncodedData, rate: float, seed: int = 0) -> EncodedData:
    """Every positive and a seeded random fraction ``rate`` of the negatives, in their original order."""
    check_rate(rate)
    if rate == 1:
        return data
    label = np.asarray(data.label)
    keep = (label > 0.5) | (np.random.default_rng(seed).random(len(label)) < rate)
    return data.take(np.flatnonzero(keep))


def logit_shift(neg_sample_rate: float = 1.0, pos_weight: float = 1.0) -> float:
    """What to add to a model's logit to undo negative downsampling at ``neg_sample_rate`` and a positive
    class weight ``pos_weight``."""
    return math.log(neg_sample_rate) - math.log(pos_weight)


def correct(p: np.ndarray, neg_sample_rate: float) -> np.ndarray:
    """q = p / (p + (1 - p) / W): the click probability before negatives were kept at rate W."""
    p = np.asarray(p, dtype=np.float64)
    return p / (p + (1 - p) / neg_sample_rate)


def prior_logit(label: np.ndarray, weight: np.ndarray | None = None, pos_weight: float = 1.0) -> float:
    """The log-odds the loss is minimised at with no features: log(pos_weight * W+ / W-), W+/- the (sample
    weighted) positive and negative mass of the training data; 0 when a class is absent."""
    y = np.asarray(label, dtype=np.float64)
    w = np.ones_like(y) if weight is None else np.asarray(weight, dtype=np.float64)
    pos, neg = float(np.dot(w, y)), float(np.dot(w, 1 - y))
    if pos <= 0 or neg <= 0:
        return 0.0
    return math.log(pos_weight * pos / neg)


def init_output_bias(model: torch.nn.Module, value: float) -> bool:
    """Start the model's output bias (its first-order term's bias) at ``value``; False when it has none.

    A model that starts at p = 0.5 on a log with 1% clicks spends its first hundreds of updates just
    learning the base rate, which a small log does not have.
    """
    for m in model.modules():
        if isinstance(m, FeatureLinear):
            with torch.no_grad():
                m.bias.fill_(value)
            return True
    return False
