"""Ranking: score candidates through a bundle, order them by pCTR or eCPM, explore, and give propensities.

Candidates are turned into one frame by :func:`ctrkit.validate.records_frame` (the context's values shared,
the candidates' values gathered per field) and scored by :meth:`Bundle.predict`, so a value gets the same
checks and the same answer as anywhere else.

Two exploration policies; for both, the propensity logged for an item is the probability that the policy put
it in that slot given the slots above it, the quantity an off-policy estimator divides by.

Epsilon-greedy (:func:`choose`): each slot, in order, shows the best remaining item with probability
1 - epsilon and a uniformly drawn remaining item with probability epsilon.

Thompson sampling (:func:`thompson`): the uncertainty is a diagonal Laplace approximation of a first-order
logit weight per categorical id, as Chapelle and Li ("An Empirical Evaluation of Thompson Sampling", NIPS 2011)
do for a logistic CTR model: the weight of an id seen n times in training has posterior precision
λ + n · p̄(1 - p̄) (the logistic loss's curvature summed over its rows, with the training CTR p̄ for each row's
pCTR, and λ the prior precision), so an id seen rarely or never (out of vocabulary) is uncertain and one seen
often is not. A posterior sample adds one draw per distinct id to the model's calibrated logit, so candidates
that share an id (the context) share its draw. Hashed and bucketised fields keep no training counts and add no
uncertainty. Each request draws ``samples`` posterior samples; each slot shows the best remaining item under one
of them chosen at random, and its propensity is the share of the samples under which that item is the best
remaining one: exact for the policy given its draws, a Monte Carlo estimate with ``samples`` draws of the
posterior probability (standard error at most 0.5 / sqrt(samples), never below 1 / samples, as the choosing
draw is one of them).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from ctrkit.data.readers import DataError

RESERVED = ("bid", "quality")


@dataclass(frozen=True)
class Slate:
    """The shown items in slot order: candidate index, propensity, and whether the slot explored."""

    index: np.ndarray
    propensity: np.ndarray
    explored: np.ndarray


def choose(scores: np.ndarray, k: int, epsilon: float = 0.0, rng: np.random.Generator | None = None) -> Slate:
    """Top-``k`` by score (ties by candidate order), each slot explored with probability ``epsilon``."""
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    n = len(scores)
    k = min(k, n)
    order = np.argsort(-scores, kind="stable")
    if epsilon == 0.0:
        return Slate(order[:k], np.ones(k), np.zeros(k, dtype=bool))
    gen = rng if rng is not None else np.random.default_rng()
    remaining = list(order)  # kept in score order, so the greedy pick is the first
    picks, props, explored = [], [], []
    for _ in range(k):
        m = len(remaining)
        if gen.random() < epsilon:
            j = int(gen.integers(m))
            explored.append(True)
        else:
            j = 0
            explored.append(False)
        props.append((1.0 - epsilon) * (j == 0) + epsilon / m)
        picks.append(remaining.pop(j))
    return Slate(np.asarray(picks, dtype=np.int64), np.asarray(props), np.asarray(explored))


def objective_scores(pctr: np.ndarray, objective: str, bids: np.ndarray | None,
                     quality: np.ndarray | None) -> np.ndarray:
    """pCTR for feeds; eCPM = pCTR x bid x quality (quality defaults to 1) for ads."""
    if objective == "pctr":
        return pctr
    if objective != "ecpm":
        raise ValueError(f"objective must be 'pctr' or 'ecpm', got {objective!r}")
    if bids is None:
        raise DataError("objective 'ecpm' needs a bid on every candidate")
    return pctr * bids * (quality if quality is not None else 1.0)


_SD_CACHE: weakref.WeakKeyDictionary[Any, np.ndarray] = weakref.WeakKeyDictionary()


def laplace_sd(bundle: Any, prior_precision: float = 1.0) -> np.ndarray:
    """Posterior standard deviation of a first-order logit weight per global id of ``bundle``'s encoder:
    1 / sqrt(λ + n_id · p̄(1 - p̄)) for vocabulary ids (missing and out-of-vocabulary ids have n = 0), 0 for the
    ids of hashed and bucketised fields. Cached per bundle object and prior."""
    if not prior_precision > 0:
        raise ValueError(f"prior_precision must be > 0, got {prior_precision}")
    cached = _SD_CACHE.get(bundle)
    if cached is not None and cached[0] == prior_precision:
        return cached[1:]
    train = bundle.metrics.get("train", {})
    if not train.get("rows"):
        raise DataError("Thompson sampling needs the bundle's training counts (metrics.train.rows), "
                        "which this bundle lacks; use epsilon_greedy")
    ctr = float(train.get("positives", 0)) / float(train["rows"])
    curvature = ctr * (1.0 - ctr)
    enc = bundle.encoder
    precision = np.full(enc.n_ids, np.inf)
    for name in enc.sparse_names:
        counts = enc.counts.get(name)
        if counts is None:
            continue
        off = enc.offsets[name]
        precision[off:off + enc.sizes[name]] = prior_precision
        precision[off + 2:off + 2 + len(counts)] += counts * curvature
    sd = 1.0 / np.sqrt(precision)
    _SD_CACHE[bundle] = np.concatenate([[prior_precision], sd])
    return sd


def thompson(logit: np.ndarray, ids: np.ndarray, sd: np.ndarray, k: int, samples: int = 1000,
             rng: np.random.Generator | None = None, scale: np.ndarray | None = None) -> Slate:
    """Top-``k`` by Thompson sampling (module docstring): ``logit`` [n] the calibrated logits, ``ids`` [n, F] the
    candidates' global ids, ``sd`` the posterior sd per id; the sampled score is the sampled logit, or
    sigmoid(sampled logit) x ``scale`` (bid x quality) when given."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    n = len(logit)
    k = min(k, n)
    gen = rng if rng is not None else np.random.default_rng()
    varying = [j for j in range(ids.shape[1]) if np.any(ids[:, j] != ids[0, j]) and np.any(sd[ids[:, j]] > 0)]
    draws = np.repeat(np.asarray(logit, np.float64)[None, :], samples, axis=0)
    if varying:
        uniq, inv = np.unique(ids[:, varying], return_inverse=True)
        z = gen.standard_normal((samples, len(uniq))) * sd[uniq]
        inv = inv.reshape(n, len(varying))
        for j in range(len(varying)):
            draws += z[:, inv[:, j]]
    if scale is not None:
        draws = scale[None, :] / (1.0 + np.exp(-draws))
    remaining = np.ones(n, dtype=bool)
    picks, props = [], []
    for _ in range(k):
        best = np.argmax(np.where(remaining[None, :], draws, -np.inf), axis=1)
        pick = int(best[gen.integers(samples)])
        picks.append(pick)
        props.append(float(np.mean(best == pick)))
        remaining[pick] = False
    return Slate(np.asarray(picks, dtype=np.int64), np.asarray(props), np.zeros(k, dtype=bool))
