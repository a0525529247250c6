"""Ranking: score candidates through a bundle, order them by pCTR or eCPM, explore, and give propensities.

Candidates are turned into one frame by :func:`ctrkit.validate.records_frame` (the context's values shared,
the candidates' values gathered per field) and scored by :meth:`Bundle.predict`, so a value gets the same
checks and the same answer as anywhere else.

Exploration is epsilon-greedy over the slate: each slot, in order, shows the best remaining item with
probability 1 - epsilon and a uniformly drawn remaining item with probability epsilon. The propensity logged
for an item is the probability that this policy put it in that slot given the slots above it, the quantity an
off-policy estimator divides by.
"""

from __future__ import annotations

from dataclasses import dataclass

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
