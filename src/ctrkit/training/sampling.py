"""Negative downsampling, and the exact correction that keeps served probabilities unbiased.

Keeping every positive and a fraction W of the negatives multiplies the odds the model learns by 1/W;
weighting positives by ``pos_weight`` multiplies them by ``pos_weight``. Both are undone exactly by a shift
of the logit, q = p / (p + (1 - p) / W), i.e. logit(q) = logit(p) + log W - log pos_weight, which the bundle
applies before any calibrator.

Distillation's transfer rows (:func:`transfer_rows`) are here too: rows drawn near the training rows for a teacher
to label.
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


def transfer_rows(data: EncodedData, rows: int, swap: float = 0.3, seed: int = 0) -> EncodedData:
    """``rows`` rows near ``data``'s, unlabelled (label 0), for a teacher to label: each is a random row of
    ``data`` of which every categorical field, numeric value and sequence is, with probability ``swap``, that of
    a random row (Bucila, Caruana and Niculescu-Mizil, 2006, "Model compression"; their MUNGE swaps with
    a nearest neighbour). A teacher fits its own training rows nearly to their labels, so a student learns most
    of what the teacher knows beyond them here. A row keeps its source row's weight and group."""
    if rows < 0 or not 0.0 <= swap <= 1.0:
        raise ValueError(f"transfer rows need rows >= 0 and swap in [0, 1], got {rows} and {swap}")
    n = len(data)
    if n == 0 and rows:
        raise ValueError("transfer rows are drawn from the training rows; there are none")
    rng = np.random.default_rng(seed)
    src = rng.integers(0, n, rows)

    def mixed(a: np.ndarray, width: int) -> np.ndarray:
        """``a``'s source rows, each of their ``width`` columns taken from a random row with probability ``swap``."""
        out = np.asarray(a)[src]
        r, c = np.nonzero(rng.random((rows, width)) < swap)
        out[r, c] = np.asarray(a)[rng.integers(0, n, len(r)), c]
        return out

    seq = seq_len = None
    if data.seq is not None and data.seq_len is not None:  # a sequence moves whole, with its length
        r, c = np.nonzero(rng.random((rows, data.seq.shape[1])) < swap)
        donor = rng.integers(0, n, len(r))
        seq, seq_len = np.asarray(data.seq)[src], np.asarray(data.seq_len)[src]
        seq[r, c], seq_len[r, c] = np.asarray(data.seq)[donor, c], np.asarray(data.seq_len)[donor, c]
    label = np.zeros((rows, *np.shape(data.label)[1:]), dtype=np.float32)
    return EncodedData(ids=mixed(data.ids, data.ids.shape[1]), dense=mixed(data.dense, data.dense.shape[1]),
                       label=label, group=None if data.group is None else np.asarray(data.group)[src],
                       meta=data.meta, seq=seq, seq_len=seq_len,
                       weight=None if data.weight is None else np.asarray(data.weight)[src])


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
