"""Self-contained HTML measurement report: tables plus inline PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np
import pandas as pd

from ctrkit.measure.attribution import Attribution, AttributionReport
from ctrkit.measure.engine import MeasureError
from ctrkit.measure.tables import ctr_table


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ctr_by_position(table: pd.DataFrame, position: str) -> str:
    """CTR by position with Wilson interval bars."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = table[position].to_numpy()
    y = table["ctr"].to_numpy()
    ax.errorbar(x, y, yerr=[y - table["ci_low"].to_numpy(), table["ci_high"].to_numpy() - y], fmt="o-", capsize=3)
    ax.set_xlabel("position")
    ax.set_ylabel("CTR (95% Wilson)")
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_propensities(curves: dict[str, pd.DataFrame]) -> str:
    """Examination propensity curves, one line per method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, df in curves.items():
        ax.plot(df["position"], df["propensity"], "o-", label=name)
        if "ci_low" in df:
            ax.fill_between(df["position"], df["ci_low"], df["ci_high"], alpha=0.15)
    ax.set_xlabel("position")
    ax.set_ylabel("propensity (position 1 = 1)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_lifts(comp: pd.DataFrame) -> str:
    """Relative lift per (variant, metric) with its interval."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(comp)))
    labels = [f"{v} · {m}" for v, m in zip(comp["variant"], comp["metric"])]
    y = np.arange(len(comp))
    lift = comp["rel_lift"].to_numpy()
    ax.errorbar(lift, y, xerr=[lift - comp["rel_ci_low"].to_numpy(), comp["rel_ci_high"].to_numpy() - lift],
                fmt="o", capsize=3)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(y, labels)
    ax.set_xlabel("relative lift vs control (95% CI)")
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_delays(rep: AttributionReport) -> str:
    """Histogram of first-click delays with the 95% window marked."""
    plt = _plt()
    h = pd.DataFrame(rep.click_delay_hist)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(h["low_s"], h["clicks"] / (h["high_s"] - h["low_s"]), width=h["high_s"] - h["low_s"], align="edge")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_yscale("log")
    if rep.click_window_95_s:
        ax.axvline(rep.click_window_95_s, color="red", ls="--", label=f"95% within {rep.click_window_95_s:g} s")
        ax.legend()
    ax.set_xlabel("seconds from impression to first click")
    ax.set_ylabel("clicks per second of delay")
    return _png(fig)


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, float_format=lambda v: f"{v:.5g}", border=0, classes="t")


def build_report(att: Attribution, variant: str = "variant", position: str = "position", item: str = "item_id",
                 randomized: bool = False, title: str = "CTR measurement") -> str:
    """Run the measurements the data allows and render them as one HTML page."""
    from ctrkit.measure import position as pb
    from ctrkit.measure.abtest import ab_test

    cols = att.imp_kinds
    dims = [c for c in (position, variant, item) if c in cols]
    if position not in cols:
        raise MeasureError(f"the report needs a position column ({position!r}); columns are {list(cols)}")
    cube = att.cube(dims)
    parts = [f"<h1>{html.escape(title)}</h1>"]
    rep = att.report
    parts.append(f"<p>Impressions read {rep.impressions_read:,}, kept {rep.impressions_kept:,}; clicks read "
                 f"{rep.clicks_read:,}, attributed {rep.clicks_attributed:,}.</p>")
    if rep.steps:
        parts.append("<h2>Rows removed</h2>" + _table(pd.DataFrame([s.__dict__ for s in rep.steps])))
    for n in rep.notes:
        parts.append(f"<p>note: {html.escape(n)}</p>")
    overall = ctr_table(cube, [])
    parts.append("<h2>Overall CTR</h2>" + _table(overall))
    by_pos = ctr_table(cube, [position])
    parts.append("<h2>CTR by position</h2>" + plot_ctr_by_position(by_pos, position) + _table(by_pos))
    curves: dict[str, pd.DataFrame] = {}
    props = []
    if randomized:
        props.append(pb.propensity_randomized(cube, position))
    props.append(pb.propensity_power_law(cube, position))
    if item in cols:
        props.append(pb.regression_em(cube, item, position))
    for p in props:
        curves[p.method] = p.to_frame()
    parts.append("<h2>Position propensities</h2>" + plot_propensities(curves))
    best = props[0] if randomized else props[-1]
    parts.append(f"<h3>Examination decomposition ({best.method})</h3>"
                 + _table(pb.examination_decomposition(cube, best, position)))
    if variant in cols and cube[variant].nunique() >= 2:
        res = ab_test(cube, variant)
        parts.append("<h2>A/B test</h2>" + plot_lifts(res.comparisons) + _table(res.variants)
                     + _table(res.comparisons))
        for name, v in res.verdicts.items():
            items = "".join(f"<li>{html.escape(r)}</li>" for r in v["reasons"])
            parts.append(f"<p><b>{html.escape(name)}: {v['verdict']}</b></p><ul>{items}</ul>")
    if rep.click_delay_hist:
        parts.append("<h2>Click delay</h2>" + plot_delays(rep))
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto}table.t{border-collapse:collapse;"
             "font-size:13px}table.t td,table.t th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
