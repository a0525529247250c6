"""Impression, click and conversion logs with planted truth, for tests, benchmarks and demos.

Clicks follow the examination hypothesis of :mod:`ctrkit.data.synth`: P(click) = θ(position) · γ(item),
with θ from ``examination_curve`` and item popularity from ``zipf_weights``. Positions are either
randomised (uniform, the "randomized traffic" that method (a) needs) or set by a production ranker that
puts relevant items higher, with an item-level boost unrelated to relevance (promotions) and per-impression
noise, so raw CTR is confounded by position. Variants carry planted relative CTR lifts. Optional
realism: click delays (log-normal, some beyond the window), bot users (many clicks a minute, bot user
agents), duplicated impression rows, non-viewable impressions (never examined), and conversions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from scipy.stats import norm

from ctrkit.data.synth import examination_curve, sigmoid, solve_intercept, zipf_weights


BOT_IMPRESSIONS = 200  # impressions (each clicked) of every bot user


@dataclass(frozen=True)
class SimConfig:
    """Shape of a simulated log; defaults give a clean randomized log with one control variant."""

    n_impressions: int = 100_000
    n_users: int = 10_000
    n_items: int = 500
    n_positions: int = 10
    eta: float = 1.0
    ctr: float = 0.05
    relevance_scale: float = 1.0
    item_zipf: float = 0.8
    randomized: bool = True
    ranker_noise: float = 1.0
    ranker_boost: float = 1.0
    variants: dict[str, float] = field(default_factory=lambda: {"control": 0.0})
    click_delay_median_s: float = 20.0
    click_delay_sigma: float = 1.2
    repeat_click_rate: float = 0.0
    bot_users: int = 0
    bot_clicks_per_minute: int = 40
    duplicate_rate: float = 0.0
    non_viewable_rate: float = 0.0
    conversion_rate: float = 0.0
    view_conversion_rate: float = 0.0
    days: float = 7.0
    start_epoch_s: float = 1_767_225_600.0
    seed: int = 0


@dataclass
class SimTruth:
    """Planted parameters: examination curve, item relevance, the variants' lifts."""

    examination: np.ndarray
    item_relevance: np.ndarray
    variants: dict[str, float]
    intercept: float


@dataclass
class SimLogs:
    """The three logs as Arrow tables (register them with an engine or write them to Parquet) and the truth."""

    impressions: pa.Table
    clicks: pa.Table
    conversions: pa.Table
    truth: SimTruth


def _ts(seconds: np.ndarray) -> pa.Array:
    return pa.array((seconds * 1e6).astype(np.int64), type=pa.int64()).cast(pa.timestamp("us", tz="UTC"))


def simulate_logs(config: SimConfig | None = None, **overrides: object) -> SimLogs:
    """Draw impression, click and conversion logs from ``config`` (keyword overrides as a shortcut)."""
    cfg = config or SimConfig()
    if overrides:
        cfg = SimConfig(**{**cfg.__dict__, **overrides})  # type: ignore[arg-type]
    if cfg.n_impressions < 1 or cfg.n_items < 1 or cfg.n_positions < 1 or cfg.n_users < 1:
        raise ValueError("n_impressions, n_users, n_items and n_positions must be >= 1")
    low = {v: lift for v, lift in cfg.variants.items() if not lift > -1.0}
    if low:  # a lift of -1 or below would plant a click probability of zero or less
        raise ValueError(f"a variant's lift must be above -1 (-100%), got {low}")
    if not 0.0 < cfg.ctr < 1.0:
        raise ValueError(f"ctr must be in (0, 1), got {cfg.ctr}")
    for name in ("repeat_click_rate", "duplicate_rate", "non_viewable_rate", "conversion_rate",
                 "view_conversion_rate"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {getattr(cfg, name)}")
    if not cfg.days > 0:
        raise ValueError(f"days must be > 0, got {cfg.days}")
    rng = np.random.default_rng(cfg.seed)
    # n_impressions counts every row of the impression log: the bots' impressions and the duplicates are part of it
    n_dup = int(cfg.duplicate_rate * cfg.n_impressions)
    n, k_pos = cfg.n_impressions - BOT_IMPRESSIONS * cfg.bot_users - n_dup, cfg.n_positions
    if n < 1:
        raise ValueError(f"n_impressions={cfg.n_impressions} leaves no room for real impressions beside "
                         f"{BOT_IMPRESSIONS * cfg.bot_users} bot impressions and {n_dup} duplicates")

    quality = rng.normal(0.0, cfg.relevance_scale, cfg.n_items)
    item = rng.choice(cfg.n_items, n, p=zipf_weights(cfg.n_items, cfg.item_zipf)[rng.permutation(cfg.n_items)])
    exam = examination_curve(k_pos, cfg.eta)
    if cfg.randomized:
        position = rng.integers(1, k_pos + 1, n)
    else:
        boost = rng.normal(0.0, cfg.ranker_boost, cfg.n_items)
        score = quality[item] + boost[item] + rng.normal(0.0, cfg.ranker_noise, n)
        sd = float(np.sqrt(cfg.relevance_scale ** 2 + cfg.ranker_boost ** 2 + cfg.ranker_noise ** 2))
        position = np.clip(1 + np.floor(k_pos * norm.sf(score / sd)), 1, k_pos).astype(np.int64)
    b = solve_intercept(quality[item], exam[position - 1], cfg.ctr)
    relevance = sigmoid(quality + b)

    names = list(cfg.variants)
    user = rng.integers(0, cfg.n_users, n)
    variant_idx = (user * 2654435761 % 2 ** 32) % len(names)
    lift = np.array([cfg.variants[v] for v in names])[variant_idx]
    p_click = np.clip(exam[position - 1] * relevance[item] * (1.0 + lift), 0.0, 1.0)

    t = cfg.start_epoch_s + np.sort(rng.random(n)) * cfg.days * 86400.0
    viewable = np.ones(n, dtype=bool)
    if cfg.non_viewable_rate > 0:
        viewable = rng.random(n) >= cfg.non_viewable_rate
    clicked = (rng.random(n) < p_click) & viewable
    imp_id = np.arange(n, dtype=np.int64)

    vis_frac = np.where(viewable, rng.uniform(0.5, 1.0, n), rng.uniform(0.0, 0.49, n))
    vis_sec = np.where(viewable, 1.0 + rng.exponential(5.0, n), rng.uniform(0.0, 0.9, n))
    ua = np.where(rng.random(n) < 0.7, "Mozilla/5.0 (iPhone)", "Mozilla/5.0 (Windows NT 10.0)").astype(object)

    ci = imp_id[clicked]
    delay = np.exp(np.log(cfg.click_delay_median_s) + cfg.click_delay_sigma * rng.standard_normal(ci.size))
    click_t = t[ci] + delay
    if cfg.repeat_click_rate > 0:
        rep = ci[rng.random(ci.size) < cfg.repeat_click_rate]
        ci = np.concatenate([ci, rep])
        click_t = np.concatenate([click_t, t[rep] + 60.0 + rng.exponential(30.0, rep.size)])

    imp_cols = {"impression_id": imp_id, "user_id": user, "item_id": item, "position": position,
                "variant": np.array(names, dtype=object)[variant_idx], "t": t, "vf": vis_frac, "vs": vis_sec,
                "ua": ua}
    click_user = user[ci]
    if cfg.bot_users > 0:
        bot_ids = cfg.n_users + np.arange(cfg.bot_users)
        per_bot = BOT_IMPRESSIONS
        b_imp = np.arange(per_bot * cfg.bot_users) + n
        b_user = np.repeat(bot_ids, per_bot)
        b_start = cfg.start_epoch_s + rng.random(cfg.bot_users) * cfg.days * 86400.0
        b_t = np.repeat(b_start, per_bot) + np.tile(np.arange(per_bot) * (60.0 / cfg.bot_clicks_per_minute),
                                                    cfg.bot_users)
        imp_cols = {
            "impression_id": np.concatenate([imp_id, b_imp]), "user_id": np.concatenate([user, b_user]),
            "item_id": np.concatenate([item, rng.integers(0, cfg.n_items, b_imp.size)]),
            "position": np.concatenate([position, rng.integers(1, k_pos + 1, b_imp.size)]),
            "variant": np.concatenate([imp_cols["variant"], np.array(names, dtype=object)[b_user % len(names)]]),
            "t": np.concatenate([t, b_t]), "vf": np.concatenate([vis_frac, np.ones(b_imp.size)]),
            "vs": np.concatenate([vis_sec, np.full(b_imp.size, 3.0)]),
            "ua": np.concatenate([ua, np.full(b_imp.size, "Mozilla/5.0 HeadlessChrome", dtype=object)]),
        }
        b_click_t = b_t + 0.5
        ci = np.concatenate([ci, b_imp])
        click_t = np.concatenate([click_t, b_click_t])
        click_user = np.concatenate([click_user, b_user])

    imp_n = imp_cols["impression_id"].size
    order = np.arange(imp_n)
    if n_dup > 0:
        dups = rng.choice(imp_n, n_dup, replace=False)
        order = np.concatenate([order, dups])
    impressions = pa.table({
        "impression_id": pa.array(imp_cols["impression_id"][order]),
        "timestamp": _ts(imp_cols["t"][order]),
        "user_id": pa.array(imp_cols["user_id"][order]),
        "item_id": pa.array(imp_cols["item_id"][order]),
        "position": pa.array(imp_cols["position"][order].astype(np.int32)),
        "variant": pa.array(imp_cols["variant"][order], type=pa.string()),
        "viewable_fraction": pa.array(imp_cols["vf"][order]),
        "viewable_seconds": pa.array(imp_cols["vs"][order]),
        "user_agent": pa.array(imp_cols["ua"][order], type=pa.string()),
    })
    clicks = pa.table({"impression_id": pa.array(ci), "timestamp": _ts(click_t), "user_id": pa.array(click_user)})

    first = np.unique(imp_id[clicked])
    conv_c = first[rng.random(first.size) < cfg.conversion_rate]
    unclicked = imp_id[~clicked]
    conv_v = unclicked[rng.random(unclicked.size) < cfg.view_conversion_rate]
    conv_ids = np.concatenate([conv_c, conv_v])
    conv_t = np.concatenate([t[conv_c] + 3600.0 + rng.exponential(6 * 3600.0, conv_c.size),
                             t[conv_v] + rng.exponential(3 * 3600.0, conv_v.size)])
    conversions = pa.table({"impression_id": pa.array(conv_ids, type=pa.int64()), "timestamp": _ts(conv_t),
                            "revenue": pa.array(np.round(np.exp(rng.normal(3.0, 0.8, conv_ids.size)), 2))})
    truth = SimTruth(examination=exam, item_relevance=relevance, variants=dict(cfg.variants), intercept=b)
    return SimLogs(impressions=impressions, clicks=clicks, conversions=conversions, truth=truth)
