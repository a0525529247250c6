"""Ranking: score candidates through a bundle, order them by pCTR or eCPM, explore, and give propensities.

Records are turned into one polars frame column by column (the context's values broadcast, the candidates'
values gathered per field) and scored by :meth:`Bundle.predict`, so a value gets the same checks and the same
answer as anywhere else; only the per-record Python work of a list of dicts is avoided.

Exploration is epsilon-greedy over the slate: each slot, in order, shows the best remaining item with
probability 1 - epsilon and a uniformly drawn remaining item with probability epsilon. The propensity logged
for an item is the probability that this policy put it in that slot given the slots above it, the quantity an
off-policy estimator divides by.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from ctrkit.data.readers import DataError
from ctrkit.schema import Schema

RESERVED = ("bid", "quality")


def categorical_text(value: Any) -> str | None:
    """A categorical value as the text the encoder reads (an integral float reads as its integer)."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


_TEXT = {str, type(None)}
_NUMBERS = {int, float, type(None)}


def _categorical_series(name: str, values: list[Any]) -> pl.Series:
    """Text as is (the common case, built in one call); other values through :func:`categorical_text`."""
    if set(map(type, values)) <= _TEXT:
        return pl.Series(name, values, dtype=pl.String)
    return pl.Series(name, [categorical_text(v) for v in values], dtype=pl.String)


def _numeric_series(name: str, values: list[Any]) -> pl.Series:
    """Numbers stay Float64; any text makes a String column that the reader's number check parses."""
    types = set(map(type, values))
    if types <= _NUMBERS:
        return pl.Series(name, values, dtype=pl.Float64, strict=False)
    if str in types:
        return pl.Series(name, [None if v is None else v if isinstance(v, str) else repr(float(v))
                                for v in values], dtype=pl.String)
    return pl.Series(name, [None if v is None else float(v) for v in values], dtype=pl.Float64)


def records_frame(schema: Schema, records: Sequence[Mapping[str, Any]],
                  context: Mapping[str, Any] | None = None, allowed_extra: Sequence[str] = ()) -> pl.DataFrame:
    """The feature frame of ``records`` (each merged over ``context``; a record's value wins).

    A key that is neither a field of the schema nor in ``allowed_extra`` is a DataError naming it.
    """
    ctx = dict(context or {})
    known = set(schema.input_columns)
    for k in ctx:
        if k not in known:
            raise DataError(f"context: unknown field {k!r}; the bundle's fields are {sorted(known)}")
    extra = set(allowed_extra)
    for i, r in enumerate(records):
        for k in r:
            if k not in known and k not in extra:
                raise DataError(f"record {i}: unknown field {k!r}; the bundle's fields are {sorted(known)}")
    n = len(records)
    data: dict[str, pl.Series] = {}
    for f in schema.fields:
        default = ctx.get(f.name)
        values = [r.get(f.name, default) for r in records]
        data[f.name] = (_categorical_series if f.kind == "categorical" else _numeric_series)(f.name, values)
    return pl.DataFrame(data, height=n)


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
