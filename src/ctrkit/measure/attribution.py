"""Join and attribution: impressions + clicks + conversions -> one clean row per impression, every drop counted.

The pipeline is a chain of SQL views over the input files (built with the engine's dialect, so DuckDB and
Spark run the same text). Only small intermediates are materialised (duplicate ids, clicks with their
impression time, bot users); the impression log itself is scanned in a single final pass that groups it
into a *cube* (counts per status and per requested dimension) from which all tables are derived.
Impressions that a rule removes are not deleted but carry a ``_status`` other than ``kept``, so the cube
also yields the count for each rule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ctrkit.measure.engine import BOOL, FLOAT, INT, STRING, TIMESTAMP, TIMESTAMPTZ, Engine, MeasureError

ROLE_CANDIDATES: dict[str, tuple[str, ...]] = {
    "impression_id": ("impression_id", "imp_id", "impressionid"),
    "timestamp": ("timestamp", "ts", "time", "event_time", "datetime"),
    "user": ("user_id", "user", "uid", "userid"),
    "item": ("item_id", "item", "ad_id", "doc_id"),
    "position": ("position", "pos", "rank", "slot"),
    "variant": ("variant", "arm", "bucket", "treatment"),
    "user_agent": ("user_agent", "ua", "useragent"),
    "viewable_fraction": ("viewable_fraction", "visible_fraction", "viewability"),
    "viewable_seconds": ("viewable_seconds", "visible_seconds", "view_seconds"),
    "click": ("click", "clicked", "is_click", "clicks"),
    "conversion": ("conversion", "converted", "is_conversion"),
    "revenue": ("revenue", "value", "amount"),
    "bounce": ("bounce", "bounced", "is_bounce"),
}

DEFAULT_BOT_AGENTS: tuple[str, ...] = ("bot", "crawler", "spider", "slurp", "headless", "python-requests",
                                       "curl/", "wget", "scrapy", "phantomjs")

KEPT = "kept"
BITMAP_MAX_RANGE = 1 << 31
MEASURES = ("impressions", "clicks", "conversions", "click_conversions", "view_conversions", "revenue",
            "revenue_sq", "bounces")


@dataclass
class AttributionConfig:
    """Windows and filters; every default is the common industry choice and can be changed."""

    click_window_s: float = 1800.0
    click_through_window_s: float = 7 * 86400.0
    view_through_window_s: float = 86400.0
    bot_user_agents: tuple[str, ...] = DEFAULT_BOT_AGENTS
    max_clicks_per_user_minute: int | None = 20
    min_viewable_fraction: float = 0.5
    min_viewable_seconds: float = 1.0
    dedup_ids: bool = True
    dedup_window_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("click_window_s", "click_through_window_s", "view_through_window_s"):
            if getattr(self, name) <= 0:
                raise MeasureError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_clicks_per_user_minute is not None and self.max_clicks_per_user_minute < 1:
            raise MeasureError("max_clicks_per_user_minute must be >= 1 (or None to turn the rule off)")
        if not 0.0 <= self.min_viewable_fraction <= 1.0:
            raise MeasureError(f"min_viewable_fraction must be in [0, 1], got {self.min_viewable_fraction}")


@dataclass
class FilterStep:
    """One rule applied to one log: how many rows it saw and how many it removed."""

    log: str
    rule: str
    removed: int
    detail: str = ""


@dataclass
class AttributionReport:
    """What happened to every input row; printed by the CLI and written into ``--json`` output."""

    impressions_read: int = 0
    impressions_kept: int = 0
    clicks_read: int = 0
    clicks_attributed: int = 0
    conversions_read: int = 0
    conversions_attributed: int = 0
    steps: list[FilterStep] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    click_delay_hist: list[dict[str, float]] = field(default_factory=list)
    click_window_95_s: float | None = None
    roles: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


def resolve_roles(found: dict[str, str], explicit: dict[str, str | None], what: str) -> dict[str, str]:
    """Map role -> column for one file: explicit names must exist, others are guessed from common names."""
    lower = {c.lower(): c for c in found}
    roles: dict[str, str] = {}
    for role, cands in ROLE_CANDIDATES.items():
        name = explicit.get(role)
        if name:
            if name not in found:
                raise MeasureError(f"{what}: column {name!r} (given for {role}) not found; columns are {list(found)}")
            roles[role] = name
            continue
        for c in cands:
            if c in lower:
                roles[role] = lower[c]
                break
    return roles


def _as_sets(dims: list[str] | list[list[str]]) -> list[list[str]]:
    """Normalise one list of columns or several into a list of distinct column lists."""
    if not dims or isinstance(dims[0], str):
        return [list(dims)]  # type: ignore[arg-type]
    out: list[list[str]] = []
    for d in dims:
        if set(d) not in [set(o) for o in out]:
            out.append(list(d))
    return out


class Attribution:
    """Builds the attribution views on an engine and computes cubes over the clean impressions."""

    def __init__(self, engine: Engine, impressions: Any, clicks: Any = None, conversions: Any = None,
                 config: AttributionConfig | None = None, columns: dict[str, str | None] | None = None,
                 names: tuple[str, str, str] = ("impressions", "clicks", "conversions")) -> None:
        self.engine = engine
        self.cfg = config or AttributionConfig()
        self.d = engine.dialect
        self.report = AttributionReport()
        self._names = names
        explicit = columns or {}
        engine.register("_imp_raw", impressions, what=names[0])
        self.imp_kinds = engine.columns("_imp_raw")
        self.r = resolve_roles(self.imp_kinds, explicit, names[0])
        self.has_clicks = clicks is not None
        self.has_convs = conversions is not None
        if self.has_clicks:
            engine.register("_clk_raw", clicks, what=names[1])
            self.clk_kinds = engine.columns("_clk_raw")
            self.cr = resolve_roles(self.clk_kinds, explicit, names[1])
        if self.has_convs:
            engine.register("_cnv_raw", conversions, what=names[2])
            self.cnv_kinds = engine.columns("_cnv_raw")
            self.vr = resolve_roles(self.cnv_kinds, explicit, names[2])
        self._validate()
        self.report.roles = dict(self.r)
        self._status_done = False
        self._bots = 0
        self._build()

    # -- validation ---------------------------------------------------------------------------------
    def _need(self, roles: dict[str, str], role: str, what: str, why: str, kinds: dict[str, str]) -> None:
        if role not in roles:
            raise MeasureError(
                f"{what}: no {role} column ({why}); expected one of {list(ROLE_CANDIDATES[role])} "
                f"or pass its name; columns are {list(kinds)}")

    def _check_kind(self, col: str, kind: str, allowed: tuple[str, ...], what: str, expected: str) -> None:
        if kind not in allowed:
            raise MeasureError(f"{what}: column {col!r} has type {kind}, expected {expected}")

    def _validate(self) -> None:
        imp, kinds = self._names[0], self.imp_kinds
        time_kinds = (TIMESTAMP, TIMESTAMPTZ, INT, FLOAT, STRING)
        if self.has_clicks:
            self._need(self.r, "impression_id", imp, "needed to join a click file", kinds)
            self._need(self.r, "timestamp", imp, "needed for the click window", kinds)
            self._need(self.cr, "timestamp", self._names[1], "needed for the click window", self.clk_kinds)
            if "impression_id" not in self.cr and not ("user" in self.cr and "item" in self.cr):
                raise MeasureError(
                    f"{self._names[1]}: clicks need an impression_id column, or user and item columns to match "
                    f"impressions by; columns are {list(self.clk_kinds)}")
            if "impression_id" not in self.cr and not ("user" in self.r and "item" in self.r):
                raise MeasureError(f"{imp}: clicks are keyed by (user, item) but impressions have no user/item "
                                   f"columns; columns are {list(kinds)}")
            self._check_kind(self.cr["timestamp"], self.clk_kinds[self.cr["timestamp"]], time_kinds,
                             self._names[1], "a timestamp, epoch seconds or ISO-8601 text")
        elif "click" not in self.r:
            raise MeasureError(f"{imp}: no click column and no click file; give --clicks FILE or a column named "
                               f"one of {list(ROLE_CANDIDATES['click'])}; columns are {list(kinds)}")
        else:
            self._check_kind(self.r["click"], kinds[self.r["click"]], (INT, FLOAT, BOOL), imp, "0/1 or boolean")
        if self.has_convs:
            self._need(self.cnv_kinds and self.vr, "timestamp", self._names[2], "needed for conversion windows",
                       self.cnv_kinds)
            if not self.has_clicks and "timestamp" not in self.r:
                raise MeasureError(f"{imp}: conversions need impression timestamps; columns are {list(kinds)}")
            if "impression_id" not in self.vr and not ("user" in self.vr and "item" in self.vr):
                raise MeasureError(f"{self._names[2]}: conversions need an impression_id column, or user and item "
                                   f"columns; columns are {list(self.cnv_kinds)}")
            if "impression_id" not in self.r:
                raise MeasureError(f"{imp}: no impression_id column, needed to join conversions")
        if "timestamp" in self.r:
            self._check_kind(self.r["timestamp"], kinds[self.r["timestamp"]], time_kinds, imp,
                             "a timestamp, epoch seconds or ISO-8601 text")
        if "position" in self.r:
            self._check_kind(self.r["position"], kinds[self.r["position"]], (INT, FLOAT), imp,
                             "integer positions (1 = top)")
        for role in ("viewable_fraction", "viewable_seconds", "revenue"):
            if role in self.r:
                self._check_kind(self.r[role], kinds[self.r[role]], (INT, FLOAT), imp, "numbers")
        self._zone_notes()

    def _zone_notes(self) -> None:
        files = [(self._names[0], self.imp_kinds, self.r)]
        if self.has_clicks:
            files.append((self._names[1], self.clk_kinds, self.cr))
        if self.has_convs:
            files.append((self._names[2], self.cnv_kinds, self.vr))
        kinds = {w: k[r["timestamp"]] for w, k, r in files if "timestamp" in r}
        if len({k for k in kinds.values()}) > 1:
            desc = ", ".join(f"{w}: {k}" for w, k in kinds.items())
            self.report.notes.append(
                f"timestamp types differ ({desc}); zone-less timestamps are read as UTC, zoned ones are converted "
                "to UTC, numbers are epoch seconds")

    # -- SQL helpers ----------------------------------------------------------------------------------
    def _ts(self, roles: dict[str, str], kinds: dict[str, str], alias: str = "") -> str:
        col = (alias + "." if alias else "") + self.d.q(roles["timestamp"])
        kind = kinds[roles["timestamp"]]
        if kind == STRING:
            return self.d.try_epoch(col)
        return self.d.epoch(col, kind)

    def col(self, role: str, alias: str = "i") -> str:
        """Quoted, alias-qualified impression column for a role."""
        return f"{alias}.{self.d.q(self.r[role])}"

    def _count(self, sql: str) -> int:
        v = self.engine.query(f"SELECT COUNT(*) AS n FROM ({sql}) t").iloc[0, 0]
        return int(v)

    # -- pipeline ----------------------------------------------------------------------------------------
    def _build(self) -> None:
        e, d, cfg = self.engine, self.d, self.cfg
        q = d.q
        ts = self._ts(self.r, self.imp_kinds, "r") if "timestamp" in self.r else "CAST(NULL AS DOUBLE)"
        e.view("_imp_src", f"SELECT r.*, {ts} AS _ts FROM _imp_raw r")
        cols = ", ".join(q(c) for c in self.imp_kinds) + ", _ts"
        idc = q(self.r["impression_id"]) if "impression_id" in self.r else None
        src = "_imp_src"
        if idc and cfg.dedup_ids:
            groups = rows = 0
            if self._ids_may_repeat(idc):
                e.materialize("_dup_ids", f"SELECT {idc} AS _id, COUNT(*) AS _n FROM _imp_src "
                                          f"WHERE {idc} IS NOT NULL GROUP BY {idc} HAVING COUNT(*) > 1")
                dup = e.query("SELECT COUNT(*) AS g, COALESCE(SUM(_n), 0) AS n FROM _dup_ids").iloc[0]
                groups, rows = int(dup["g"]), int(dup["n"])
            if groups:
                e.view("_imp_dedup", (
                    f"SELECT i.* FROM _imp_src i LEFT JOIN _dup_ids d ON i.{idc} = d._id WHERE d._id IS NULL "
                    f"UNION ALL SELECT {cols} FROM (SELECT i.*, ROW_NUMBER() OVER (PARTITION BY i.{idc} "
                    f"ORDER BY i._ts) AS _rn FROM _imp_src i JOIN _dup_ids d ON i.{idc} = d._id) t WHERE _rn = 1"))
                src = "_imp_dedup"
            self.report.steps.append(FilterStep(self._names[0], "duplicate impression_id", rows - groups,
                                                f"{groups} ids logged more than once; the earliest row is kept"))
        self.report.notes.extend([] if idc and cfg.dedup_ids else
                                 ["impression ids were not checked for duplicates"])
        self.imp_view = src
        if self.has_clicks:
            self._build_clicks(src)
        if self.has_convs:
            self._build_conversions(src)
        self._build_events(src)

    def _ids_may_repeat(self, idc: str) -> bool:
        """False when integer impression ids are proven unique by an exact bitmap of their range (one column scan).

        A bitmap over [min, max] costs (max - min + 1) / 8 bytes per thread and one pass over the id column, against
        a hash table of every id for the general check; it is used for integer ids whose range fits
        ``BITMAP_MAX_RANGE`` on an engine that has one (DuckDB ``bitstring_agg``). Otherwise, or when the bitmap
        finds repeats, the hash aggregate runs and names the repeated ids.
        """
        if self.imp_kinds.get(self.r["impression_id"]) != INT or not self.d.has_bitmap:
            return True
        lo, hi, n = self.engine.query(f"SELECT MIN({idc}) AS lo, MAX({idc}) AS hi, COUNT({idc}) AS n "
                                      f"FROM _imp_raw").iloc[0]
        if pd.isna(lo) or int(n) == 0:
            return False
        lo, hi, n = int(lo), int(hi), int(n)
        if hi - lo + 1 > BITMAP_MAX_RANGE:
            return True
        distinct = int(self.engine.query(self.d.bitmap_distinct(idc, lo, hi, "_imp_raw")).iloc[0, 0])
        return distinct != n

    def _pairs(self, raw: str, roles: dict[str, str], kinds: dict[str, str], src: str, window: float,
               extra: str, prefix: str) -> str:
        """SQL: each event row with the impression it belongs to (id, impression time, user) and its delay."""
        q = self.d.q
        ets = self._ts(roles, kinds, "c")
        idc = q(self.r["impression_id"])
        user_i = "i._iuser" if "user" in self.r else "CAST(NULL AS STRING)"
        iuser = f", {q(self.r['user'])} AS _iuser" if "user" in self.r else ""
        user_c = f"c.{q(roles['user'])}" if "user" in roles else None
        user = f"COALESCE({user_c}, {user_i})" if user_c else user_i
        if "impression_id" in roles:
            return (f"SELECT c.{q(roles['impression_id'])} AS _id, {ets} AS {prefix}ts, i._ts AS _its, "
                    f"{user} AS _user, {ets} - i._ts AS _delay, "
                    f"CASE WHEN c.{q(roles['impression_id'])} IS NULL OR {ets} IS NULL THEN 'missing_key' "
                    f"WHEN i._iid IS NULL THEN 'no_impression' WHEN {ets} < i._ts THEN 'before_impression' "
                    f"WHEN {ets} - i._ts > {window} THEN 'outside_window' ELSE 'in_window' END AS _st{extra} "
                    f"FROM {raw} c LEFT JOIN (SELECT {idc} AS _iid, _ts{iuser} FROM {src} WHERE {idc} IS NOT NULL) i "
                    f"ON c.{q(roles['impression_id'])} = i._iid")
        uc, ic = q(roles["user"]), q(roles["item"])
        iu, ii = q(self.r["user"]), q(self.r["item"])
        keyed = (f"SELECT c.*, {ets} AS _ets, ROW_NUMBER() OVER (ORDER BY {ets}, c.{uc}, c.{ic}) AS _ckey "
                 f"FROM {raw} c")
        joined = (f"SELECT c.*, i.{idc} AS _iid, i._ts AS _its, ROW_NUMBER() OVER (PARTITION BY c._ckey "
                  f"ORDER BY i._ts DESC) AS _k FROM ({keyed}) c LEFT JOIN {src} i ON c.{uc} = i.{iu} AND "
                  f"c.{ic} = i.{ii} AND c._ets >= i._ts AND c._ets - i._ts <= {window}")
        return (f"SELECT c._iid AS _id, c._ets AS {prefix}ts, c._its, c.{uc} AS _user, c._ets - c._its AS _delay, "
                f"CASE WHEN c.{uc} IS NULL OR c.{ic} IS NULL OR c._ets IS NULL THEN 'missing_key' "
                f"WHEN c._iid IS NULL THEN 'no_impression_in_window' ELSE 'in_window' END AS _st{extra} "
                f"FROM ({joined}) c WHERE c._k = 1")

    def _status_counts(self, view: str, log: str, labels: dict[str, str]) -> dict[str, int]:
        df = self.engine.query(f"SELECT _st, COUNT(*) AS n FROM {view} GROUP BY _st")
        counts = {str(s): int(n) for s, n in zip(df["_st"], df["n"])}
        for st, n in sorted(counts.items()):
            if st in labels:
                self.report.steps.append(FilterStep(log, labels[st], n))
        return counts

    def _build_clicks(self, src: str) -> None:
        e, q, cfg = self.engine, self.d.q, self.cfg
        bounce = f", c.{q(self.cr['bounce'])} AS _bounce" if "bounce" in self.cr else ", 0 AS _bounce"
        e.materialize("_click_pairs", self._pairs("_clk_raw", self.cr, self.clk_kinds, src,
                                                  cfg.click_window_s, bounce, "_c"))
        e.view("_click_ranked", (
            "SELECT _id, _cts, _delay, _user, _bounce, CASE WHEN _st = 'in_window' AND _r > 1 THEN 'duplicate' "
            "WHEN _st = 'in_window' THEN 'attributed' ELSE _st END AS _st FROM (SELECT *, ROW_NUMBER() OVER "
            "(PARTITION BY _id, _st ORDER BY _cts) AS _r FROM _click_pairs) t"))
        e.materialize("_click_attr", "SELECT _id, _cts AS _click_ts, _delay AS _click_delay, _bounce "
                                     "FROM _click_ranked WHERE _st = 'attributed'")
        counts = self._status_counts("_click_ranked", self._names[1], {
            "missing_key": "click without impression_id/timestamp",
            "no_impression": "click whose impression is not in the log",
            "no_impression_in_window": "click with no impression of that (user, item) in the window",
            "before_impression": "click timestamped before its impression",
            "outside_window": f"click later than the {cfg.click_window_s:g} s window",
            "duplicate": "repeat click on an impression (first click kept)",
        })
        self.report.clicks_read = sum(counts.values())
        if cfg.max_clicks_per_user_minute is not None:
            e.materialize("_bot_users", (
                f"SELECT DISTINCT _user FROM (SELECT _user, FLOOR(_cts / 60) AS _m, COUNT(*) AS _n FROM _click_pairs "
                f"WHERE _user IS NOT NULL AND _cts IS NOT NULL GROUP BY _user, FLOOR(_cts / 60)) t "
                f"WHERE _n > {int(cfg.max_clicks_per_user_minute)}"))
            self._bots = int(e.query("SELECT COUNT(*) AS n FROM _bot_users").iloc[0, 0])
        self._delay_histogram()

    def _delay_histogram(self) -> None:
        first = ("SELECT _id, MIN(_delay) AS d FROM _click_pairs WHERE _st IN ('in_window', 'outside_window') "
                 "GROUP BY _id")
        bins = ("CASE WHEN d < 60 THEN FLOOR(d) WHEN d < 600 THEN FLOOR(d / 10) * 10 WHEN d < 7200 THEN "
                "FLOOR(d / 60) * 60 ELSE FLOOR(d / 3600) * 3600 END")
        width = "CASE WHEN d < 60 THEN 1 WHEN d < 600 THEN 10 WHEN d < 7200 THEN 60 ELSE 3600 END"
        df = self.engine.query(f"SELECT {bins} AS lo, {width} AS w, COUNT(*) AS n FROM ({first}) t "
                               f"GROUP BY {bins}, {width} ORDER BY lo")
        if df.empty:
            return
        lo, w, n = (df[c].to_numpy(dtype=np.float64) for c in ("lo", "w", "n"))
        self.report.click_delay_hist = [{"low_s": float(a), "high_s": float(a + b), "clicks": int(c)}
                                        for a, b, c in zip(lo, w, n)]
        cum = np.cumsum(n) / n.sum()
        self.report.click_window_95_s = float(lo[np.searchsorted(cum, 0.95)] + w[np.searchsorted(cum, 0.95)])

    def _build_conversions(self, src: str) -> None:
        e, q, cfg = self.engine, self.d.q, self.cfg
        rev = f", c.{q(self.vr['revenue'])} AS _rev" if "revenue" in self.vr else ", 0.0 AS _rev"
        window = max(cfg.click_through_window_s, cfg.view_through_window_s)
        e.view("_conv_pairs0", self._pairs("_cnv_raw", self.vr, self.cnv_kinds, src, window, rev, "_v"))
        click = ("LEFT JOIN _click_attr k ON p._id = k._id" if self.has_clicks else
                 f"LEFT JOIN (SELECT {q(self.r['impression_id'])} AS _id, _ts AS _click_ts FROM {src} "
                 f"WHERE {q(self.r['click'])} = 1) k ON p._id = k._id")
        st = (f"CASE WHEN p._st <> 'in_window' THEN p._st "
              f"WHEN k._click_ts IS NOT NULL AND p._vts >= k._click_ts AND p._vts - k._click_ts <= "
              f"{cfg.click_through_window_s} THEN 'click_through' "
              f"WHEN p._delay <= {cfg.view_through_window_s} AND (k._click_ts IS NULL OR p._vts < k._click_ts) "
              f"THEN 'view_through' ELSE 'outside_window' END")
        e.view("_conv_typed", f"SELECT p._id, p._vts, p._rev, {st} AS _st FROM _conv_pairs0 p {click}")
        e.materialize("_conv_ranked", (
            "SELECT _id, _vts, _rev, CASE WHEN _st IN ('click_through', 'view_through') AND _r > 1 THEN 'duplicate' "
            "ELSE _st END AS _st FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY _id, CASE WHEN _st IN "
            "('click_through', 'view_through') THEN 1 ELSE 0 END ORDER BY _vts) AS _r FROM _conv_typed) t"))
        e.materialize("_conv_attr", "SELECT _id, _st AS _ctype, _rev FROM _conv_ranked "
                                    "WHERE _st IN ('click_through', 'view_through')")
        counts = self._status_counts("_conv_ranked", self._names[2], {
            "missing_key": "conversion without impression key/timestamp",
            "no_impression": "conversion whose impression is not in the log",
            "no_impression_in_window": "conversion with no impression of that (user, item) in the window",
            "before_impression": "conversion timestamped before its impression",
            "outside_window": "conversion outside the click-through and view-through windows",
            "duplicate": "repeat conversion on an impression (first kept)",
        })
        self.report.conversions_read = sum(counts.values())
        self.report.conversions_attributed = counts.get("click_through", 0) + counts.get("view_through", 0)

    def _build_events(self, src: str) -> None:
        e, q, cfg, r = self.engine, self.d.q, self.cfg, self.r
        joins, rules = [], []
        if "impression_id" in r:
            rules.append((f"{self.col('impression_id')} IS NULL", "missing_impression_id"))
        if "timestamp" in r:
            unparsed = "i._ts IS NULL" if self.imp_kinds[r["timestamp"]] == STRING else f"{self.col('timestamp')} IS NULL"
            rules.append((unparsed, "bad_timestamp"))
        if self.has_clicks:
            joins.append(f"LEFT JOIN _click_attr ca ON {self.col('impression_id')} = ca._id")
            click = "CASE WHEN ca._id IS NULL THEN 0 ELSE 1 END"
            delay = "ca._click_delay"
            bounce = "COALESCE(CAST(ca._bounce AS INT), 0)" if "bounce" in self.cr else "0"
        else:
            c = self.col("click")
            if self.imp_kinds[r["click"]] == BOOL:
                c = f"CAST({c} AS INT)"
            rules.append((f"({c} IS NULL OR {c} NOT IN (0, 1))", "invalid_click"))
            click = f"CASE WHEN {c} = 1 THEN 1 ELSE 0 END"
            delay = "CAST(NULL AS DOUBLE)"
            bounce = f"COALESCE(CAST({self.col('bounce')} AS INT), 0)" if "bounce" in r else "0"
        if self.has_clicks and self._bots and "user" in r:
            joins.append(f"LEFT JOIN _bot_users b ON {self.col('user')} = b._user")
            rules.append(("b._user IS NOT NULL", "bot_click_rate"))
        elif not self.has_clicks and cfg.max_clicks_per_user_minute is not None and "user" in r and "timestamp" in r:
            e.materialize("_bot_users", (
                f"SELECT DISTINCT _user FROM (SELECT {q(r['user'])} AS _user, FLOOR(_ts / 60) AS _m, COUNT(*) AS _n "
                f"FROM {src} i WHERE {click} = 1 "
                f"GROUP BY {q(r['user'])}, FLOOR(_ts / 60)) t WHERE _n > {int(cfg.max_clicks_per_user_minute)}"))
            joins.append(f"LEFT JOIN _bot_users b ON {self.col('user')} = b._user")
            rules.append(("b._user IS NOT NULL", "bot_click_rate"))
        if "user_agent" in r and cfg.bot_user_agents:
            ua = f"LOWER({self.col('user_agent')})"
            pats = " OR ".join(f"{ua} LIKE '%{p.lower().replace(chr(39), chr(39) * 2)}%'" for p in cfg.bot_user_agents)
            rules.append((f"({pats})", "bot_user_agent"))
        vis = []
        if "viewable_fraction" in r:
            vis.append(f"{self.col('viewable_fraction')} < {cfg.min_viewable_fraction}")
        if "viewable_seconds" in r:
            vis.append(f"{self.col('viewable_seconds')} < {cfg.min_viewable_seconds}")
        if vis:
            rules.append(("(" + " OR ".join(vis) + ")", "not_viewable"))
        base = src
        if cfg.dedup_window_s and "user" in r and "item" in r and "timestamp" in r:
            e.view("_imp_lag", (f"SELECT s.*, s._ts - LAG(s._ts) OVER (PARTITION BY s.{q(r['user'])}, "
                                f"s.{q(r['item'])} ORDER BY s._ts) AS _gap FROM {src} s"))
            base = "_imp_lag"
            rules.append((f"i._gap <= {cfg.dedup_window_s}", "duplicate_in_window"))
        if self.has_convs:
            joins.append(f"LEFT JOIN _conv_attr cv ON {self.col('impression_id')} = cv._id")
            conv = "CASE WHEN cv._id IS NULL THEN 0 ELSE 1 END"
            conv_click = "CASE WHEN cv._ctype = 'click_through' THEN 1 ELSE 0 END"
            conv_view = "CASE WHEN cv._ctype = 'view_through' THEN 1 ELSE 0 END"
            revenue = "COALESCE(CAST(cv._rev AS DOUBLE), 0.0)"
        else:
            conv = f"COALESCE(CAST({self.col('conversion')} AS INT), 0)" if "conversion" in r else "0"
            conv_click, conv_view = f"({conv}) * ({click})", f"({conv}) * (1 - ({click}))"
            revenue = f"COALESCE(CAST({self.col('revenue')} AS DOUBLE), 0.0)" if "revenue" in r else "0.0"
        self._constant = set()
        if conv == "0" and revenue == "0.0":
            self._constant |= {"_conv", "_conv_click", "_conv_view", "_revenue"}
        if bounce == "0":
            self._constant.add("_bounce")
        self._status_names = {0: KEPT} | {k + 1: name for k, (_, name) in enumerate(rules)}
        status = "CASE " + " ".join(f"WHEN {cond} THEN {k + 1}" for k, (cond, _) in enumerate(rules)) + " ELSE 0 END"
        if not rules:
            status = "0"
        e.view("ctr_events", (
            f"SELECT i.*, {status} AS _status, {click} AS _click, {delay} AS _click_delay, {bounce} AS _bounce, "
            f"{conv} AS _conv, {conv_click} AS _conv_click, {conv_view} AS _conv_view, {revenue} AS _revenue "
            f"FROM {base} i " + " ".join(joins)))
        self.rule_labels = {
            "missing_impression_id": "impression without impression_id",
            "bad_timestamp": "impression timestamp missing or not parseable",
            "invalid_click": "click value not 0/1",
            "bot_click_rate": f"user with > {cfg.max_clicks_per_user_minute} clicks in a minute (bot)",
            "bot_user_agent": "bot user agent",
            "not_viewable": (f"not viewable (< {cfg.min_viewable_fraction:.0%} visible or "
                             f"< {cfg.min_viewable_seconds:g} s)"),
            "duplicate_in_window": f"repeat (user, item) impression within {cfg.dedup_window_s} s",
        }

    # -- cube --------------------------------------------------------------------------------------
    def dims_check(self, dims: list[str]) -> None:
        """Every requested dimension must be a column of the impression log."""
        missing = [c for c in dims if c not in self.imp_kinds]
        if missing:
            raise MeasureError(f"{self._names[0]}: no column {missing[0]!r} to group by; "
                               f"columns are {list(self.imp_kinds)}")

    def cube_sql(self, dims: list[str] | list[list[str]]) -> str:
        """The one query over the impression log: counts per status code and dimension values.

        ``dims`` is one list of columns (a plain GROUP BY) or several (GROUPING SETS, one scan for all of them;
        the column ``_set`` then says which set a row belongs to).
        """
        q = self.d.q
        sets = _as_sets(dims)
        cols = list(dict.fromkeys(c for d in sets for c in d))
        dcols = "".join(f"{q(c)}, " for c in cols)

        def total(expr: str, col: str, typ: str, name: str) -> str:
            if col in self._constant:
                return f"CAST(0 AS {typ}) AS {name}"
            return f"CAST(SUM({expr}) AS {typ}) AS {name}"

        measures = ", ".join([
            "CAST(SUM(_click) AS BIGINT) AS clicks", total("_conv", "_conv", "BIGINT", "conversions"),
            total("_conv_click", "_conv_click", "BIGINT", "click_conversions"),
            total("_conv_view", "_conv_view", "BIGINT", "view_conversions"),
            total("_revenue", "_revenue", "DOUBLE", "revenue"),
            total("_revenue * _revenue", "_revenue", "DOUBLE", "revenue_sq"),
            total("_bounce", "_bounce", "BIGINT", "bounces")])
        if len(sets) == 1:
            return (f"SELECT _status, {dcols}COUNT(*) AS impressions, {measures} "
                    f"FROM ctr_events GROUP BY _status{''.join(', ' + q(c) for c in cols)}")
        flag = " + ".join(f"GROUPING({q(c)}) * {1 << k}" for k, c in enumerate(cols))
        grouping = ", ".join("(" + ", ".join(["_status"] + [q(c) for c in d]) + ")" for d in sets)
        return (f"SELECT _status, {dcols}{flag} AS _set, COUNT(*) AS impressions, {measures} "
                f"FROM ctr_events GROUP BY GROUPING SETS ({grouping})")

    def cube(self, dims: list[str]) -> pd.DataFrame:
        """Counts per dimension values over kept impressions; fills the impression side of the report."""
        return self.cubes([dims])[0]

    def cubes(self, sets: list[list[str]]) -> list[pd.DataFrame]:
        """One cube per list of dimensions, all from a single scan of the impression log (GROUPING SETS).

        Grouping the log by a few small sets (say (item, position) for IPS and (variant,) for A/B) is much
        cheaper than by their union, whose number of cells is the product of theirs.
        """
        wanted = [list(d) for d in sets]
        for d in wanted:
            self.dims_check(d)
        uniq = _as_sets(wanted)
        full = self.engine.query(self.cube_sql(uniq))
        for m in MEASURES:
            full[m] = pd.to_numeric(full[m]).fillna(0)
        full["_status"] = full["_status"].astype(int).map(self._status_names)
        cols = list(dict.fromkeys(c for d in uniq for c in d))
        parts = []
        for d in wanted:
            if len(uniq) == 1:
                part = full
            else:
                mask = sum(1 << k for k, c in enumerate(cols) if c not in d)
                part = full[full["_set"].astype(int) == mask]
            parts.append(part[["_status"] + d + list(MEASURES)].reset_index(drop=True))
        if not self._status_done:
            self._fill_report(parts[0])
        return [p[p["_status"] == KEPT].drop(columns="_status").reset_index(drop=True) for p in parts]

    def _fill_report(self, full: pd.DataFrame) -> None:
        by = full.groupby("_status")[["impressions", "clicks", "conversions"]].sum()
        dup = sum(s.removed for s in self.report.steps if s.rule == "duplicate impression_id")
        self.report.impressions_read = int(by["impressions"].sum()) + dup
        self.report.impressions_kept = int(by["impressions"].get(KEPT, 0))
        self.report.clicks_attributed = int(by["clicks"].get(KEPT, 0))
        if not self.has_clicks:
            self.report.clicks_read = int(by["clicks"].sum())
        for st, row in by.iterrows():
            if st == KEPT:
                continue
            self.report.steps.append(FilterStep(
                self._names[0], self.rule_labels.get(str(st), str(st)), int(row["impressions"]),
                f"{int(row['clicks'])} attributed clicks and {int(row['conversions'])} conversions went with them"))
        self._status_done = True
