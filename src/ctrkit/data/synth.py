"""Synthetic click logs with known ground truth, for the demo, the tests and the benchmarks.

The click model is the examination hypothesis: P(click) = P(examined | position) * P(relevant | user, item,
context). Relevance is logistic in user, item and context effects plus a planted XOR-shaped interaction
(young users like action, old users like comedy, and not the other way round) that no additive model can
express, so a model that learns pairwise interactions (FM, DeepFM) beats LR by a clear margin.
Everything is drawn from one ``numpy`` generator seeded by ``seed``: the same config gives the same log.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl

from ctrkit.schema import Field, Schema

AGE_GROUPS = ("18-24", "25-34", "35-44", "45-54", "55+")
YOUNG = {"18-24", "25-34"}
GENRES = ("action", "comedy", "drama", "documentary", "kids")
DEVICES = ("mobile", "desktop", "tablet")
GENDERS = ("f", "m", "u")


def zipf_weights(n: int, s: float) -> np.ndarray:
    """Normalised Zipf weights 1/k^s for ranks 1..n (popularity of users or items)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    w = np.arange(1, n + 1, dtype=np.float64) ** (-s)
    return w / w.sum()


def examination_curve(n_positions: int, eta: float = 1.0) -> np.ndarray:
    """P(examined | position k) = k^-eta for k = 1..n_positions (Joachims et al.'s power law)."""
    if n_positions < 1:
        raise ValueError(f"n_positions must be >= 1, got {n_positions}")
    return np.arange(1, n_positions + 1, dtype=np.float64) ** (-eta)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def solve_intercept(logit: np.ndarray, scale: np.ndarray | float, target: float) -> float:
    """The intercept b with mean(scale * sigmoid(logit + b)) == target (bisection)."""
    lo, hi = -30.0, 30.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if float(np.mean(scale * sigmoid(logit + mid))) > target:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class SynthConfig:
    """Size and shape of a synthetic click log; every knob has a realistic default."""

    n_rows: int = 200_000
    n_users: int = 20_000
    n_items: int = 5_000
    n_positions: int = 10
    examination_eta: float = 1.0
    user_zipf: float = 1.05
    item_zipf: float = 1.1
    ctr: float = 0.08
    # At 1.6 even the true click model beat its own additive part by only 0.04-0.06 AUC, too little for the
    # planted interaction to separate FM from LR by a clear margin; at 3.0 that gap is 0.09-0.13.
    interaction_strength: float = 3.0
    main_effect_scale: float = 0.5
    missing_rate: float = 0.02
    days: int = 14
    # std per day of a random walk in each item's relevance: a trend that ids fitted on the past cannot follow
    item_drift: float = 0.0
    start: datetime = field(default_factory=lambda: datetime(2026, 1, 5, tzinfo=timezone.utc))
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_rows < 1 or self.n_users < 1 or self.n_items < 1:
            raise ValueError("n_rows, n_users and n_items must be >= 1")
        if not 0.0 < self.ctr < 1.0:
            raise ValueError(f"ctr must be in (0, 1), got {self.ctr}")
        if self.item_drift < 0.0:
            raise ValueError(f"item_drift must be >= 0, got {self.item_drift}")
        if not 0.0 <= self.missing_rate < 1.0:
            raise ValueError(f"missing_rate must be in [0, 1), got {self.missing_rate}")


@dataclass
class SynthTruth:
    """The planted parameters, for checking what a model or an estimator recovers."""

    examination: np.ndarray
    item_relevance: np.ndarray
    intercept: float
    config: SynthConfig


def synth_schema() -> Schema:
    """The schema of :func:`make_click_log` output."""
    cat = ["user_id", "item_id", "age_group", "gender", "genre", "device", "hour", "weekday", "position"]
    fields = [Field(name=c, kind="categorical") for c in cat]
    fields.append(Field(name="price", kind="numeric", transform="log1p_standardize"))
    fields.append(Field(name="user_activity", kind="numeric", transform="log1p_standardize"))
    return Schema(fields=fields, label="click", time="timestamp", position="position", group="user_id")


def make_click_log(config: SynthConfig | None = None, **overrides: object) -> tuple[pl.DataFrame, SynthTruth]:
    """Draw a click log and its ground truth.

    Columns: timestamp (UTC, sorted), user_id, item_id, age_group, gender, genre, device, hour, weekday,
    position (1-based), price, user_activity, click (0/1), plus ``p_click`` (the true probability) and
    ``examined`` is not returned (it is latent). Pass keyword overrides as a shortcut for a config.
    """
    cfg = config or SynthConfig()
    if overrides:
        cfg = SynthConfig(**{**asdict(cfg), **overrides})  # type: ignore[arg-type]
    rng = np.random.default_rng(cfg.seed)
    n = cfg.n_rows

    # Users: Zipf activity, fixed demographics per user.
    user_age = rng.integers(0, len(AGE_GROUPS), cfg.n_users)
    user_gender = rng.integers(0, len(GENDERS), cfg.n_users)
    user_bias = rng.normal(0.0, cfg.main_effect_scale, cfg.n_users)
    user_p = zipf_weights(cfg.n_users, cfg.user_zipf)
    users = rng.permutation(cfg.n_users)[rng.choice(cfg.n_users, n, p=user_p)]

    # Items: Zipf popularity, a genre and a price each; popular items are a little more relevant.
    item_genre = rng.integers(0, len(GENRES), cfg.n_items)
    item_price = np.exp(rng.normal(2.5, 1.0, cfg.n_items)).round(2)
    item_p = zipf_weights(cfg.n_items, cfg.item_zipf)
    item_rank = rng.permutation(cfg.n_items)
    item_quality = rng.normal(0.0, cfg.main_effect_scale, cfg.n_items) + 0.15 * np.log(item_p[item_rank] * cfg.n_items)
    items = item_rank[rng.choice(cfg.n_items, n, p=item_p)]

    # Context.
    device = rng.choice(len(DEVICES), n, p=[0.6, 0.3, 0.1])
    offsets = np.sort(rng.random(n)) * cfg.days * 86400.0
    ts_us = np.int64(cfg.start.timestamp() * 1e6) + (offsets * 1e6).astype(np.int64)
    hour = ((offsets // 3600) % 24).astype(np.int64)
    weekday = ((offsets // 86400 + cfg.start.weekday()) % 7).astype(np.int64)
    position = rng.integers(1, cfg.n_positions + 1, n)

    # Relevance: main effects + the XOR interaction between age group and genre.
    age = user_age[users]
    genre = item_genre[items]
    young = np.isin(age, [AGE_GROUPS.index(a) for a in YOUNG])
    action = genre == GENRES.index("action")
    comedy = genre == GENRES.index("comedy")
    xor = np.where(young & action, 1.0, 0.0) + np.where(~young & comedy, 1.0, 0.0)
    xor -= np.where(young & comedy, 1.0, 0.0) + np.where(~young & action, 1.0, 0.0)
    hour_effect = 0.25 * np.sin(2 * np.pi * hour / 24.0)
    device_effect = np.array([0.1, 0.0, -0.15])[device]
    price_effect = -0.15 * (np.log1p(item_price[items]) - 2.5)
    logit = (user_bias[users] + item_quality[items] + cfg.interaction_strength * xor
             + hour_effect + device_effect + price_effect)
    if cfg.item_drift > 0:  # its own stream, so a log without drift is the same as before drift existed
        walk = np.cumsum(np.random.default_rng([cfg.seed, 1]).normal(0.0, cfg.item_drift, (cfg.n_items, cfg.days)),
                         axis=1)
        logit += walk[items, np.minimum(offsets // 86400, cfg.days - 1).astype(np.int64)]
    exam = examination_curve(cfg.n_positions, cfg.examination_eta)
    b = solve_intercept(logit, exam[position - 1], cfg.ctr)
    p_click = exam[position - 1] * sigmoid(logit + b)
    click = (rng.random(n) < p_click).astype(np.int8)

    activity = np.bincount(users, minlength=cfg.n_users)[users].astype(np.float64)
    cols: dict[str, pl.Series] = {
        "timestamp": pl.Series("timestamp", ts_us).cast(pl.Datetime("us", "UTC")),
        "user_id": pl.Series("user_id", [f"u{u}" for u in range(cfg.n_users)])[users],
        "item_id": pl.Series("item_id", [f"i{i}" for i in range(cfg.n_items)])[items],
        "age_group": pl.Series("age_group", AGE_GROUPS)[age],
        "gender": pl.Series("gender", GENDERS)[user_gender[users]],
        "genre": pl.Series("genre", GENRES)[genre],
        "device": pl.Series("device", DEVICES)[device],
        "hour": pl.Series("hour", hour),
        "weekday": pl.Series("weekday", weekday),
        "position": pl.Series("position", position),
        "price": pl.Series("price", item_price[items]),
        "user_activity": pl.Series("user_activity", activity),
    }
    df = pl.DataFrame(cols)
    if cfg.missing_rate > 0:
        # Optional context goes missing now and then, as real logs do.
        for c in ("gender", "device", "price"):
            mask = pl.Series(rng.random(n) < cfg.missing_rate)
            df = df.with_columns(pl.when(mask).then(None).otherwise(pl.col(c)).alias(c))
    df = df.with_columns(pl.Series("click", click), pl.Series("p_click", p_click))
    item_rel = sigmoid(item_quality + b)
    truth = SynthTruth(examination=exam, item_relevance=item_rel, intercept=b, config=cfg)
    return df, truth


def split_by_time(df: pl.DataFrame, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                  time_col: str = "timestamp") -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Train / valid / test cut by time order (rows are assumed sorted by ``time_col`` or get sorted)."""
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must sum to 1, got {fractions}")
    df = df.sort(time_col)
    a = int(df.height * fractions[0])
    b = a + int(df.height * fractions[1])
    return df[:a], df[a:b], df[b:]


def write_splits(log: pl.DataFrame, folder: str | Path) -> Path:
    """``log`` (from :func:`make_click_log`) cut by time into ``train.csv``, ``valid.csv`` and ``test.csv`` in
    ``folder``, without its ``p_click`` truth, beside ``schema.yaml`` (:func:`synth_schema`); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in zip(("train", "valid", "test"), split_by_time(log.drop("p_click", strict=False))):
        part.write_csv(folder / f"{name}.csv")
    synth_schema().save(folder / "schema.yaml")
    return folder
