"""``ctrkit measure``: CTR tables, A/B tests, position propensities, off-policy estimates and an HTML report."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ctrkit.measure.abtest import ABConfig, ab_test
from ctrkit.measure.attribution import (DEFAULT_BOT_AGENTS, ROLE_CANDIDATES, Attribution, AttributionConfig,
                                        AttributionReport)
from ctrkit.measure.engine import Engine, MeasureError, make_engine
from ctrkit.measure.tables import ctr_table, records, weighted_vs_macro

app = typer.Typer(help="Measure CTR from impression and click logs: attribution, CTR tables with Wilson "
                       "intervals, A/B tests, position bias and off-policy estimates (DuckDB or Spark).",
                  no_args_is_help=True)
out = Console()
err = Console(stderr=True)

ClicksOpt = typer.Option(None, "--clicks", help="Click log (impression_id or user+item, timestamp).")
ConvOpt = typer.Option(None, "--conversions", help="Conversion log (impression_id or user+item, timestamp, revenue).")
EngineOpt = typer.Option("duckdb", "--engine", help="duckdb (default, one machine) or spark (PySpark).")
JsonOpt = typer.Option(False, "--json", help="Print JSON to stdout; the filter report goes to stderr.")
WindowOpt = typer.Option(1800.0, "--click-window", help="Seconds after an impression in which a click counts.")
CtOpt = typer.Option(7 * 86400.0, "--ct-window", help="Seconds after a click for a click-through conversion.")
VtOpt = typer.Option(86400.0, "--vt-window", help="Seconds after an impression for a view-through conversion.")
BotRateOpt = typer.Option(20, "--max-clicks-per-minute", help="Users above this are bots; 0 turns the rule off.")
BotUaOpt = typer.Option(",".join(DEFAULT_BOT_AGENTS), "--bot-agents",
                        help="Comma-separated user-agent substrings marking bots ('' for none).")
DedupOpt = typer.Option(True, "--dedup/--no-dedup", help="Drop repeated impression_ids (earliest kept).")
DedupWinOpt = typer.Option(None, "--dedup-window", help="Also drop repeat (user, item) impressions within N s.")
ViewFracOpt = typer.Option(0.5, "--min-viewable-fraction", help="Viewability: minimum visible share.")
ViewSecOpt = typer.Option(1.0, "--min-viewable-seconds", help="Viewability: minimum visible time.")
ColOpt = typer.Option(None, "--col", help="Column for a role, ROLE=NAME (e.g. user=uid); repeatable.")
ThreadsOpt = typer.Option(None, "--threads", help="DuckDB threads (default: all cores).")
MemOpt = typer.Option(None, "--memory-limit", help="DuckDB memory limit, e.g. 3GB (spills to disk beyond).")


def _engine(name: str, threads: int | None, memory: str | None) -> Engine:
    if name == "duckdb":
        return make_engine("duckdb", threads=threads, memory_limit=memory)
    if threads is not None or memory:
        raise MeasureError(f"--threads and --memory-limit are DuckDB settings; --engine {name} takes its own "
                           "configuration")
    return make_engine(name)


def _columns(pairs: list[str] | None) -> dict[str, str | None]:
    cols: dict[str, str | None] = {}
    for p in pairs or []:
        if "=" not in p:
            raise MeasureError(f"--col expects ROLE=NAME, got {p!r}")
        role, name = (x.strip() for x in p.split("=", 1))
        if role not in ROLE_CANDIDATES:
            raise MeasureError(f"--col {p}: unknown role {role!r}; roles are {sorted(ROLE_CANDIDATES)}")
        if not name:
            raise MeasureError(f"--col {p}: no column name after '='")
        cols[role] = name
    return cols


def _same_file(a: Path, b: Path) -> bool:
    """One file given twice, under the same or another name."""
    if not (a.is_file() and b.is_file()):
        return False
    if a.resolve() == b.resolve():
        return True
    if a.stat().st_size != b.stat().st_size or a.stat().st_size > 1 << 30:
        return False
    return hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()


def _attribution(engine: Engine, impressions: Path, clicks: Path | None, conversions: Path | None,
                 cfg: AttributionConfig, cols: list[str] | None) -> Attribution:
    from ctrkit.serve.events import is_event_log, measure_frames

    for other, what in ((clicks, "--clicks"), (conversions, "--conversions")):
        if other is not None and _same_file(impressions, other):
            raise MeasureError(f"{what} {other} is the impression log itself; give the {what[2:]} log")
    if is_event_log(impressions) and clicks is None and conversions is None:  # a `ctrkit serve` event log
        try:
            imps, clk, cnv = measure_frames(impressions)
        except ValueError as exc:
            raise MeasureError(str(exc)) from exc
        att = Attribution(engine, imps, clk, cnv, cfg, _columns(cols),
                          names=(f"{impressions} impressions", f"{impressions} clicks", f"{impressions} conversions"))
    else:
        att = Attribution(engine, str(impressions), str(clicks) if clicks else None,
                          str(conversions) if conversions else None, cfg, _columns(cols),
                          names=(str(impressions), str(clicks), str(conversions)))
    _check_values(att, str(impressions))
    return att


def _check_values(att: Attribution, name: str) -> None:
    """Values the SQL would silently misread: positions below 1, viewable fractions given in percent."""
    q = att.d.q
    checks = []
    if "position" in att.r:
        pos = q(att.r["position"])
        checks.append((f"SUM(CASE WHEN {pos} < 1 THEN 1 ELSE 0 END)", f"MIN({pos})",
                       f"column {att.r['position']!r}: {{n}} row(s) have a position below 1 (smallest {{v}}); "
                       "positions count from 1 at the top"))
    if "viewable_fraction" in att.r:
        vf = q(att.r["viewable_fraction"])
        checks.append((f"SUM(CASE WHEN {vf} > 1 OR {vf} < 0 THEN 1 ELSE 0 END)", f"MAX({vf})",
                       f"column {att.r['viewable_fraction']!r}: {{n}} row(s) lie outside [0, 1] (largest {{v}}); "
                       "give the visible share as a fraction (a percentage divided by 100)"))
    if not checks:
        return
    sql = ", ".join(f"{c} AS n{i}, {v} AS v{i}" for i, (c, v, _) in enumerate(checks))
    row = att.engine.query(f"SELECT {sql} FROM _imp_raw").iloc[0]
    for i, (_, _, message) in enumerate(checks):
        n = row[f"n{i}"]
        if n is not None and not pd.isna(n) and int(n) > 0:
            raise MeasureError(f"{name}: " + message.format(n=f"{int(n):,}", v=f"{float(row[f'v{i}']):g}"))


def _config(window: float, ct: float, vt: float, bot_rate: int, bot_ua: str, dedup: bool,
            dedup_window: float | None, vfrac: float, vsec: float) -> AttributionConfig:
    agents = tuple(a.strip() for a in bot_ua.split(",") if a.strip())
    return AttributionConfig(click_window_s=window, click_through_window_s=ct, view_through_window_s=vt,
                             bot_user_agents=agents, max_clicks_per_user_minute=bot_rate or None,
                             min_viewable_fraction=vfrac, min_viewable_seconds=vsec, dedup_ids=dedup,
                             dedup_window_s=dedup_window)


def print_report(rep: AttributionReport, console: Console) -> None:
    """The filter report: what every rule removed, so nothing disappears silently."""
    t = Table(title="Rows removed or set aside", show_lines=False)
    for c in ("log", "rule", "rows", "detail"):
        t.add_column(c, justify="right" if c == "rows" else "left")
    for s in rep.steps:
        t.add_row(s.log, s.rule, f"{s.removed:,}", s.detail)
    console.print(f"impressions read {rep.impressions_read:,}, kept {rep.impressions_kept:,}; "
                  f"clicks read {rep.clicks_read:,}, attributed {rep.clicks_attributed:,}"
                  + (f"; conversions read {rep.conversions_read:,}, attributed {rep.conversions_attributed:,}"
                     if rep.conversions_read else ""))
    if rep.steps:
        console.print(t)
    if rep.click_window_95_s is not None:
        console.print(f"95% of first clicks arrive within {rep.click_window_95_s:g} s of the impression")
    for n in rep.notes:
        console.print(f"note: {n}")


def frame_table(df: pd.DataFrame, title: str) -> Table:
    """A rich table of a small frame with rates formatted."""
    t = Table(title=title)
    for c in df.columns:
        t.add_column(str(c), justify="right")
    for row in df.itertuples(index=False):
        cells = []
        for v in row:
            if isinstance(v, float):
                cells.append("" if pd.isna(v) else (f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.5g}"))
            elif isinstance(v, int):
                cells.append(f"{v:,}")
            else:
                cells.append(str(v))
        t.add_row(*cells)
    return t


# a bad flag value (alpha outside (0, 1), say) is a ValueError of the library; MeasureError is one too
USER_ERRORS = (MeasureError, ValueError, OSError)


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
    raise typer.Exit(2)


def _dump(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")


@app.command()
def ctr(impressions: Path = typer.Argument(..., help="Impression log (CSV/Parquet)."),
        clicks: Path | None = ClicksOpt, conversions: Path | None = ConvOpt,
        by: str = typer.Option("", "--by", help="Comma-separated columns to group by (empty: overall)."),
        macro_over: str | None = typer.Option(None, "--macro-over",
                                              help="Also print impression-weighted vs macro CTR over these columns."),
        alpha: float = typer.Option(0.05, "--alpha", help="1 - confidence level of the Wilson intervals."),
        engine: str = EngineOpt, as_json: bool = JsonOpt, window: float = WindowOpt, ct: float = CtOpt,
        vt: float = VtOpt, bot_rate: int = BotRateOpt, bot_ua: str = BotUaOpt, dedup: bool = DedupOpt,
        dedup_window: float | None = DedupWinOpt, vfrac: float = ViewFracOpt, vsec: float = ViewSecOpt,
        col: list[str] | None = ColOpt, threads: int | None = ThreadsOpt, memory: str | None = MemOpt) -> None:
    """CTR (and CVR) with 95% Wilson intervals, overall or by any columns."""
    try:
        dims = [c.strip() for c in by.split(",") if c.strip()]
        macro = [c.strip() for c in (macro_over or "").split(",") if c.strip()]
        eng = _engine(engine, threads, memory)
        att = _attribution(eng, impressions, clicks, conversions,
                           _config(window, ct, vt, bot_rate, bot_ua, dedup, dedup_window, vfrac, vsec), col)
        cube = att.cube(list(dict.fromkeys(dims + macro)))
        has_conv = conversions is not None or "conversion" in att.r
        table = ctr_table(cube, dims, alpha, conversions=has_conv)
    except USER_ERRORS as exc:
        _fail(exc)
        return
    if as_json:
        _dump(records(table))
        print_report(att.report, err)
        return
    print_report(att.report, out)
    out.print(frame_table(table, "CTR" + (f" by {', '.join(dims)}" if dims else "")))
    if macro:
        out.print(weighted_vs_macro(cube, macro))


@app.command()
def abtest(impressions: Path = typer.Argument(..., help="Impression log with a variant column."),
           clicks: Path | None = ClicksOpt, conversions: Path | None = ConvOpt,
           variant: str = typer.Option("variant", "--variant-col", help="Column naming the variant."),
           control: str | None = typer.Option(None, "--control", help="Control variant (default: 'control' or "
                                                                       "the first name)."),
           primary: str = typer.Option("ctr", "--primary", help="Primary metric: ctr, cvr, revenue_per_impression."),
           guardrails: str = typer.Option("cvr,revenue_per_impression,bounce_rate", "--guardrails",
                                          help="Metrics that must not get significantly worse."),
           alpha: float = typer.Option(0.05, "--alpha"),
           correction: str = typer.Option("holm", "--correction", help="holm or bonferroni, across variants x metrics."),
           min_impressions: int = typer.Option(10_000, "--min-impressions", help="Per arm, for a verdict."),
           mde: float = typer.Option(0.02, "--mde", help="Relative minimum detectable effect for the power check."),
           power: float = typer.Option(0.8, "--power"),
           engine: str = EngineOpt, as_json: bool = JsonOpt, window: float = WindowOpt, ct: float = CtOpt,
           vt: float = VtOpt, bot_rate: int = BotRateOpt, bot_ua: str = BotUaOpt, dedup: bool = DedupOpt,
           dedup_window: float | None = DedupWinOpt, vfrac: float = ViewFracOpt, vsec: float = ViewSecOpt,
           col: list[str] | None = ColOpt, threads: int | None = ThreadsOpt, memory: str | None = MemOpt) -> None:
    """Per-variant CTR, lifts with intervals, z-tests with Holm/Bonferroni, power, guardrails and a verdict."""
    try:  # the test's settings first: a typo is named before the logs are read
        cfg = ABConfig(control=control, primary=primary, alpha=alpha, correction=correction,
                       guardrails=tuple(g.strip() for g in guardrails.split(",") if g.strip()),
                       min_impressions=min_impressions, mde=mde, power=power)
        eng = _engine(engine, threads, memory)
        att = _attribution(eng, impressions, clicks, conversions,
                           _config(window, ct, vt, bot_rate, bot_ua, dedup, dedup_window, vfrac, vsec), col)
        res = ab_test(att.cube([variant]), variant, cfg)
    except USER_ERRORS as exc:
        _fail(exc)
        return
    if as_json:
        _dump({**res.to_dict(), "attribution": att.report.to_dict()})
        return
    print_report(att.report, out)
    out.print(frame_table(res.variants, "Variants"))
    cols = ["variant", "metric", "control_value", "variant_value", "rel_lift", "rel_ci_low", "rel_ci_high",
            "p_value", "p_adjusted", "significant"]
    out.print(frame_table(res.comparisons[cols], f"Comparisons ({correction}-adjusted)"))
    if res.required_impressions_per_arm:
        out.print(f"impressions per arm to detect a {mde:.0%} relative CTR change at power {power:.0%}: "
                  f"{res.required_impressions_per_arm:,.0f}")
    for name, v in res.verdicts.items():
        out.print(f"[bold]{name}: {v['verdict']}[/]")
        for r in v["reasons"]:
            out.print(f"  - {r}")
    for n in res.notes:
        out.print(f"note: {n}")


@app.command()
def propensity(impressions: Path = typer.Argument(..., help="Impression log with position and item columns."),
               clicks: Path | None = ClicksOpt,
               method: str = typer.Option("all", "--method", help="randomized, power-law, em or all."),
               position: str = typer.Option("position", "--position-col"),
               item: str = typer.Option("item_id", "--item-col"),
               clip: float = typer.Option(0.01, "--clip", help="Lower clip on propensities for IPS item CTR."),
               top_items: int = typer.Option(20, "--top-items", help="Items to show in the IPS table (0: none)."),
               min_item_impressions: int = typer.Option(100, "--min-item-impressions"),
               engine: str = EngineOpt, as_json: bool = JsonOpt, window: float = WindowOpt,
               bot_rate: int = BotRateOpt, bot_ua: str = BotUaOpt, dedup: bool = DedupOpt,
               col: list[str] | None = ColOpt, threads: int | None = ThreadsOpt, memory: str | None = MemOpt) -> None:
    """Examination propensities by position (randomized CTR, power law, regression-EM) and IPS item CTR."""
    from ctrkit.measure import position as pb

    try:
        if top_items < 0:  # before the logs are read
            raise MeasureError(f"--top-items must be >= 0 (0: no item table), got {top_items}")
        if method not in ("randomized", "power-law", "em", "all"):
            raise MeasureError(f"unknown --method {method!r}; expected randomized, power-law, em or all")
        eng = _engine(engine, threads, memory)
        att = _attribution(eng, impressions, clicks, None,
                           _config(window, 1.0, 1.0, bot_rate, bot_ua, dedup, None, 0.5, 1.0), col)
        dims = [position] + ([item] if method in ("em", "all") or top_items else [])
        cube = att.cube(dims)
        results = []
        if method in ("randomized", "all"):
            results.append(pb.propensity_randomized(cube, position))
        if method in ("power-law", "all"):
            results.append(pb.propensity_power_law(cube, position))
        if method in ("em", "all"):
            results.append(pb.regression_em(cube, item, position))
        best = results[-1]
        decomp = pb.examination_decomposition(cube, best, position)
        items = pb.ips_item_ctr(cube, best, item, position, clip, min_item_impressions) if top_items else None
    except USER_ERRORS as exc:
        _fail(exc)
        return
    if as_json:
        _dump({"propensities": {p.method: {**{"eta": p.eta}, "rows": records(p.to_frame())} for p in results},
               "decomposition": records(decomp),
               "items": records(items.sort_values("ips_ctr", ascending=False)) if items is not None else None,
               "attribution": att.report.to_dict()})
        return
    print_report(att.report, out)
    for p in results:
        out.print(frame_table(p.to_frame(), f"Propensity ({p.method}{f', eta={p.eta:.3f}' if p.eta else ''})"))
    out.print(frame_table(decomp, f"Examination decomposition (using {best.method})"))
    if items is not None:
        out.print(frame_table(items.sort_values("ips_ctr", ascending=False).head(top_items),
                              f"Items by IPS CTR (position-1 scale, {best.method})"))


@app.command()
def ope(log: Path = typer.Argument(..., help="Logged data: one row per logged action with its propensity, or "
                                           "an event log folder of `ctrkit serve` (with --bundle, --candidates)."),
        reward: str = typer.Option("click", "--reward", help="Reward column (0/1 click)."),
        logging: str = typer.Option("propensity_score", "--logging-propensity",
                                    help="Column with the logging policy's probability of the logged action."),
        target_policy: Path | None = typer.Option(None, "--target-policy",
                                                  help="Table (CSV/Parquet) of keys, action, propensity."),
        target_log: Path | None = typer.Option(None, "--target-log",
                                               help="A log of the target policy: its empirical action shares "
                                                    "per key are the policy; its mean reward is shown too."),
        target_col: str | None = typer.Option(None, "--target-propensity",
                                              help="Column in LOG with the target policy's probability."),
        keys: str = typer.Option("position", "--keys", help="Context columns the policy depends on."),
        action: str = typer.Option("item_id", "--action", help="Action column."),
        max_weight: float | None = typer.Option(None, "--max-weight", help="Clip importance weights."),
        dr_features: str | None = typer.Option(None, "--dr-features",
                                               help="Categorical columns of a logistic reward model for DR "
                                                    "(the action and keys are always included)."),
        bundle: Path | None = typer.Option(None, "--bundle", help="A ctrkit model bundle as DR reward model; on "
                                                                  "an event log, also the policy evaluated."),
        candidates: Path | None = typer.Option(None, "--candidates",
                                               help="Event log: every candidate of each request (CSV/Parquet: "
                                                    "request_id and the features), to rank with --bundle."),
        engine: str = EngineOpt, as_json: bool = JsonOpt) -> None:
    """IPS, SNIPS and doubly robust estimates of a target policy's CTR from logs with propensities.

    On an event log of `ctrkit serve` with --bundle and --candidates: the top-slot CTR that the bundle's greedy
    ranking of each logged request's candidates would get, from the served top slots and their propensities.
    """
    from ctrkit.measure import ope as op
    from ctrkit.serve.events import is_event_log

    if is_event_log(log):
        try:
            if bundle is None or candidates is None:
                raise MeasureError(f"{log} is an event log: give the policy to evaluate as --bundle BUNDLE and "
                                   "the requests' candidates as --candidates FILE")
            result = op.bundle_top_slot_value(log, candidates, bundle, action=action, max_weight=max_weight)
        except USER_ERRORS as exc:
            _fail(exc)
            return
        if as_json:
            _dump(result)
            return
        out.print(frame_table(pd.DataFrame(result["estimates"]), f"Top-slot CTR of {bundle} on {log}"))
        out.print(f"{result['requests']:,} logged requests ({result['without_candidates']:,} without candidates "
                  f"left out); logged top-slot CTR {result['logged_ctr']:.5f}; the bundle picks the logged item in "
                  f"{result['agreement']:.1%}")
        return
    try:
        eng = _engine(engine, None, None)
        eng.register("ope_log", str(log), what=str(log))
        key_cols = [k.strip() for k in keys.split(",") if k.strip()]
        actual = None
        if target_col:
            target: Any = target_col
        elif target_policy is not None:
            eng.register("ope_policy", str(target_policy), what=str(target_policy))
            target = eng.query("SELECT * FROM ope_policy")
        elif target_log is not None:
            eng.register("ope_target_log", str(target_log), what=str(target_log))
            target = op.policy_from_log(eng, "ope_target_log", key_cols, action, what=str(target_log))
            a = eng.query(f"SELECT COUNT(*) AS n, SUM({eng.dialect.q(reward)}) AS k FROM ope_target_log").iloc[0]
            actual = {"impressions": int(a["n"]), "clicks": int(a["k"]), "ctr": float(a["k"]) / float(a["n"])}
        else:
            raise MeasureError("give the target policy: --target-policy FILE, --target-log FILE or "
                               "--target-propensity COLUMN")
        ests = op.ips_snips(eng, "ope_log", reward, logging, target, key_cols, action, max_weight, what=str(log))
        if isinstance(target, pd.DataFrame) and (dr_features is not None or bundle is not None):
            if bundle is not None:
                model = op.bundle_reward_model(str(bundle))
            else:
                feats = [f.strip() for f in (dr_features or "").split(",") if f.strip()]
                rows = eng.query("SELECT * FROM ope_log")
                model = op.LogisticRewardModel(list(dict.fromkeys(key_cols + [action] + feats))).fit(rows, reward)
            ests.append(op.doubly_robust(eng, "ope_log", reward, logging, target, model, key_cols, action,
                                         max_weight))
    except USER_ERRORS as exc:
        _fail(exc)
        return
    result: dict[str, Any] = {"estimates": [e.to_dict() for e in ests]}
    if actual is not None:
        result["target_log_actual"] = actual
        for e in result["estimates"]:
            e["relative_error"] = (e["value"] - actual["ctr"]) / actual["ctr"] if actual["ctr"] else None
    if as_json:
        _dump(result)
        return
    out.print(frame_table(pd.DataFrame(result["estimates"]), "Off-policy estimates of the target policy's CTR"))
    if actual is not None:
        out.print(f"the target policy's own log shows CTR {actual['ctr']:.5f} "
                  f"({actual['clicks']:,} clicks / {actual['impressions']:,})")


@app.command()
def report(impressions: Path = typer.Argument(..., help="Impression log."),
           clicks: Path | None = ClicksOpt, conversions: Path | None = ConvOpt,
           out_path: Path = typer.Option(Path("measure_report.html"), "--out", help="HTML file to write."),
           variant: str = typer.Option("variant", "--variant-col"),
           position: str = typer.Option("position", "--position-col"),
           item: str = typer.Option("item_id", "--item-col"),
           randomized: bool = typer.Option(False, "--randomized/--not-randomized",
                                           help="Positions were randomised: use CTR by position as propensity."),
           engine: str = EngineOpt, window: float = WindowOpt, bot_rate: int = BotRateOpt, bot_ua: str = BotUaOpt,
           dedup: bool = DedupOpt, col: list[str] | None = ColOpt, threads: int | None = ThreadsOpt,
           memory: str | None = MemOpt) -> None:
    """A self-contained HTML report: CTR by position, propensities, A/B lifts, click delays, filter counts."""
    from ctrkit.measure.report import build_report

    try:
        if out_path.suffix.lower() not in (".html", ".htm"):  # never over a log: --out imps.parquet replaced it
            raise MeasureError(f"--out {out_path} must end in .html")
        eng = _engine(engine, threads, memory)
        att = _attribution(eng, impressions, clicks, conversions,
                           _config(window, 7 * 86400.0, 86400.0, bot_rate, bot_ua, dedup, None, 0.5, 1.0), col)
        html = build_report(att, variant=variant, position=position, item=item, randomized=randomized,
                            title=f"CTR measurement: {impressions.name}")
    except USER_ERRORS as exc:
        _fail(exc)
        return
    out_path.write_text(html)
    out.print(f"wrote {out_path} ({len(html) / 1024:.0f} KiB)")


@app.command()
def simulate(out_dir: Path = typer.Argument(..., help="Folder for impressions/clicks/conversions.parquet."),
             n: int = typer.Option(1_000_000, "--impressions"),
             items: int = typer.Option(500, "--items"),
             randomized: bool = typer.Option(True, "--randomized/--ranker",
                                             help="Uniform positions, or a production ranker."),
             lift: float = typer.Option(0.03, "--lift", help="Planted relative CTR lift of variant 'treatment'."),
             seed: int = typer.Option(0, "--seed"),
             overwrite: bool = typer.Option(False, "--overwrite", help="Replace the three files where they exist.")
             ) -> None:
    """Write a synthetic log with planted examination curve, item relevance and A/B lift (exactly N impressions,
    two bot users' and 0.1% duplicates among them once N is 4,000 or more)."""
    import pyarrow.parquet as pq

    from ctrkit.measure.simulate import BOT_IMPRESSIONS, simulate_logs

    names = ("impressions", "clicks", "conversions")
    there = [f"{name}.parquet" for name in names if (out_dir / f"{name}.parquet").exists()]
    if there and not overwrite:  # a folder of real logs has files of these very names
        _fail(f"{out_dir} already holds {there}; --overwrite replaces them with simulated logs")
    bots = 2 if n >= 10 * BOT_IMPRESSIONS * 2 else 0
    try:
        logs = simulate_logs(n_impressions=n, n_items=items, randomized=randomized, seed=seed,
                             variants={"control": 0.0, "treatment": lift}, conversion_rate=0.1, bot_users=bots,
                             duplicate_rate=0.001, non_viewable_rate=0.05, repeat_click_rate=0.05)
    except USER_ERRORS as exc:
        _fail(exc)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        pq.write_table(getattr(logs, name), out_dir / f"{name}.parquet")
    out.print(f"wrote {out_dir}/{{impressions,clicks,conversions}}.parquet "
              f"({logs.impressions.num_rows:,} impressions, {logs.clicks.num_rows:,} clicks)")


if __name__ == "__main__":
    app()
