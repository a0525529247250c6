"""A/B analysis from a variant cube: lifts with intervals, z-tests, multiple-testing control, power, verdict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ctrkit.measure.engine import MeasureError
from ctrkit.measure.stats import (bonferroni, diff_interval, holm, impressions_needed, mean_diff_test,
                                  ratio_interval, two_proportion_ztest)
from ctrkit.measure.tables import add_rate, rollup

# metric -> (numerator, denominator, higher_is_better); revenue per impression is a mean, not a proportion.
METRICS: dict[str, tuple[str, str, bool]] = {
    "ctr": ("clicks", "impressions", True),
    "cvr": ("conversions", "impressions", True),
    "revenue_per_impression": ("revenue", "impressions", True),
    "bounce_rate": ("bounces", "clicks", False),
}


@dataclass
class ABResult:
    """Per-variant rates, one comparison row per (treatment, metric), and a verdict per treatment."""

    variants: pd.DataFrame
    comparisons: pd.DataFrame
    verdicts: dict[str, dict[str, Any]]
    required_impressions_per_arm: float | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        from ctrkit.measure.tables import records

        return {"variants": records(self.variants), "comparisons": records(self.comparisons),
                "verdicts": self.verdicts, "required_impressions_per_arm": self.required_impressions_per_arm,
                "notes": self.notes}


@dataclass
class ABConfig:
    """Test settings; ``guardrails`` must not get significantly worse for a ship verdict."""

    control: str | None = None
    primary: str = "ctr"
    guardrails: tuple[str, ...] = ("cvr", "revenue_per_impression", "bounce_rate")
    alpha: float = 0.05
    correction: str = "holm"
    min_impressions: int = 10_000
    mde: float = 0.02
    power: float = 0.8

    def __post_init__(self) -> None:
        if self.correction not in ("holm", "bonferroni"):
            raise MeasureError(f"correction must be 'holm' or 'bonferroni', got {self.correction!r}")
        for m in (self.primary, *self.guardrails):
            if m not in METRICS:
                raise MeasureError(f"unknown metric {m!r}; known: {list(METRICS)}")
        for name in ("alpha", "power"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise MeasureError(f"--{name} must be in (0, 1), got {getattr(self, name)}")
        if self.min_impressions < 0:
            raise MeasureError(f"--min-impressions must be >= 0, got {self.min_impressions}")
        if not self.mde > -1.0 or self.mde == 0.0:
            raise MeasureError(f"--mde is a relative change: above -1 and not 0, got {self.mde}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return asdict(self)


def ab_test(cube: pd.DataFrame, variant: str = "variant", config: ABConfig | None = None) -> ABResult:
    """Compare every variant with the control on the primary metric and the guardrails."""
    cfg = config or ABConfig()
    if variant not in cube.columns:
        raise MeasureError(f"no variant column {variant!r} in the data; columns are {list(cube.columns)}")
    v = rollup(cube, [variant]).dropna(subset=[variant])
    v[variant] = v[variant].astype(str)
    names = v[variant].tolist()
    if len(names) < 2:
        raise MeasureError(f"an A/B test needs at least two variants in {variant!r}, found {names}")
    control = cfg.control if cfg.control is not None else ("control" if "control" in names else sorted(names)[0])
    if control not in names:
        raise MeasureError(f"control variant {control!r} not found; variants are {names}")
    notes: list[str] = []
    add_rate(v, "clicks", "impressions", "ctr", cfg.alpha)
    add_rate(v, "conversions", "impressions", "cvr", cfg.alpha)
    add_rate(v, "bounces", "clicks", "bounce_rate", cfg.alpha)
    v["revenue_per_impression"] = v["revenue"] / v["impressions"]
    metrics = [cfg.primary] + [g for g in cfg.guardrails if g != cfg.primary]
    active = []
    for m in metrics:
        num = METRICS[m][0]
        if v[num].sum() == 0 and m != cfg.primary:
            notes.append(f"guardrail {m} skipped: no {num} in the data")
            continue
        active.append(m)
    c = v.set_index(variant).loc[control]
    rows = []
    for t_name in names:
        if t_name == control:
            continue
        t = v.set_index(variant).loc[t_name]
        for m in active:
            num, den, _ = METRICS[m]
            if m == "revenue_per_impression":
                r = mean_diff_test(t["revenue"], t["revenue_sq"], t["impressions"], c["revenue"],
                                   c["revenue_sq"], c["impressions"], cfg.alpha)
                rel = r["rel_lift"]
                rows.append({"variant": t_name, "metric": m, "control_value": r["control"],
                             "variant_value": r["treatment"], "abs_lift": r["abs_lift"], "abs_ci_low": r["abs_low"],
                             "abs_ci_high": r["abs_high"], "rel_lift": rel,
                             "rel_ci_low": r["abs_low"] / r["control"] if r["control"] else np.nan,
                             "rel_ci_high": r["abs_high"] / r["control"] if r["control"] else np.nan,
                             "z": r["z"], "p_value": r["p_value"]})
                continue
            k1, n1, k0, n0 = t[num], t[den], c[num], c[den]
            d, dlo, dhi = diff_interval(k1, n1, k0, n0, cfg.alpha)
            rl, rlo, rhi = ratio_interval(k1, n1, k0, n0, cfg.alpha)
            z, p = two_proportion_ztest(k1, n1, k0, n0)
            rows.append({"variant": t_name, "metric": m, "control_value": k0 / n0 if n0 else np.nan,
                         "variant_value": k1 / n1 if n1 else np.nan, "abs_lift": float(d), "abs_ci_low": float(dlo),
                         "abs_ci_high": float(dhi), "rel_lift": float(rl), "rel_ci_low": float(rlo),
                         "rel_ci_high": float(rhi), "z": float(z), "p_value": float(p)})
    comp = pd.DataFrame(rows)
    pv = comp["p_value"].fillna(1.0).to_numpy()
    comp["p_bonferroni"] = bonferroni(pv)
    comp["p_holm"] = holm(pv)
    comp["p_adjusted"] = comp["p_holm"] if cfg.correction == "holm" else comp["p_bonferroni"]
    comp["significant"] = comp["p_adjusted"] < cfg.alpha
    base = float(c["ctr"])
    need = None
    if 0 < base < 1:
        try:
            need = impressions_needed(base, cfg.mde, cfg.alpha, cfg.power)
        except ValueError as exc:
            notes.append(f"power analysis skipped: {exc}")
    verdicts = {}
    for t_name in names:
        if t_name == control:
            continue
        reasons, ship = [], True
        n_t = int(v.set_index(variant).loc[t_name, "impressions"])
        n_c = int(c["impressions"])
        if min(n_t, n_c) < cfg.min_impressions:
            ship = False
            reasons.append(f"too few impressions ({min(n_t, n_c):,} < {cfg.min_impressions:,} per arm)")
        sub = comp[comp["variant"] == t_name].set_index("metric")
        prim = sub.loc[cfg.primary]
        if not prim["significant"]:
            ship = False
            msg = f"{cfg.primary} lift {prim['rel_lift']:+.2%} is not significant (adjusted p = {prim['p_adjusted']:.3g})"
            if need is not None and min(n_t, n_c) < need:
                msg += f"; detecting a {cfg.mde:.0%} relative change needs {need:,.0f} impressions per arm"
            reasons.append(msg)
        elif (prim["abs_lift"] > 0) != METRICS[cfg.primary][2]:
            ship = False
            reasons.append(f"{cfg.primary} is significantly worse ({prim['rel_lift']:+.2%})")
        else:
            reasons.append(f"{cfg.primary} significantly better ({prim['rel_lift']:+.2%}, "
                           f"CI {prim['rel_ci_low']:+.2%} .. {prim['rel_ci_high']:+.2%})")
        for g in cfg.guardrails:
            if g == cfg.primary or g not in sub.index:
                continue
            row = sub.loc[g]
            worse = (row["abs_lift"] < 0) if METRICS[g][2] else (row["abs_lift"] > 0)
            if row["significant"] and worse:
                ship = False
                reasons.append(f"guardrail {g} significantly worse ({row['rel_lift']:+.2%})")
            else:
                reasons.append(f"guardrail {g} holds ({row['rel_lift']:+.2%}, not significantly worse)")
        verdicts[t_name] = {"ship": ship, "verdict": "ship" if ship else "don't ship", "reasons": reasons}
    cols = [variant, "impressions", "clicks", "ctr", "ctr_ci_low", "ctr_ci_high", "conversions", "cvr",
            "cvr_ci_low", "cvr_ci_high", "revenue_per_impression", "bounces", "bounce_rate"]
    vt = v[cols].copy()
    vt["control"] = vt[variant] == control
    return ABResult(vt, comp, verdicts, need, notes)
