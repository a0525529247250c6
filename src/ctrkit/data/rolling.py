"""Time-safe rolling click statistics, served as trained.

A :class:`~ctrkit.schema.Stat` of a field (a user, an item, an ad) gives each row the impressions ``n`` and clicks
``c`` of the training rows that hold the same id at a time ``t'`` with ``t - window <= t' < t`` (every earlier row
without a window): rows at the same time never see each other's labels, so no row's own click leaks into its
features. Its two features are the log-odds of the smoothed rate ``(c + prior * p0) / (n + prior)`` (``p0`` the
training click rate) and ``log1p(n)``, standardized like numeric fields.

Training rows get their values as of their own time (:func:`as_of`); valid, test and served rows read a
:class:`Snapshot` of the counts as of the end of training (just after the latest training time), the table a
bundle carries. Evaluation therefore sees exactly what the scorer serves. A training row without a time neither
gets nor gives history. Ids are the encoder's: a value kept out of the vocabulary (unseen, or rarer than
``min_count``) counts as the field's OOV id, in training as in serving; a hashed field counts per bucket. Where the
field kept every training value (``min_count`` 1), a refresh counts each value new since training by itself (the
snapshot's newcomers, looked up by value), as every value had a history of its own in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from ctrkit.schema import Stat, window_span

STATS_FILE = "stats.parquet"
NEWCOMERS_FILE = "stats_newcomers.parquet"
_OOV = 1  # the OOV id within a field (ctrkit.data.encode.OOV)
_COUNTS = {"value": pl.String, "impressions": pl.Int64, "clicks": pl.Float64}
_CLIP = 1e-6


def as_of(keys: np.ndarray, times: np.ndarray, labels: np.ndarray, timed: np.ndarray,
          window: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (impressions int64, clicks float64) of the other timed rows with its key and a time in
    ``[t - window, t)`` (``(-inf, t)`` without a window); rows where ``timed`` is False get 0 and count for none.

    One sort by (key, time) and prefix sums: each row's count is the span between the first row of its key inside
    the window and the first row of its own (key, time) run.
    """
    n = len(keys)
    imps, clicks = np.zeros(n, np.int64), np.zeros(n, np.float64)
    rows = np.flatnonzero(timed)
    if len(rows) == 0:
        return imps, clicks
    k, t = keys[rows], times[rows]
    order = np.lexsort((t, k))
    ks, ts = k[order], t[order]
    cum = np.concatenate([[0.0], np.cumsum(labels[rows][order], dtype=np.float64)])
    pos = np.arange(len(ks))
    new_key = np.r_[True, ks[1:] != ks[:-1]]
    run_start = np.maximum.accumulate(np.where(new_key | np.r_[True, ts[1:] != ts[:-1]], pos, 0))
    if window is None:
        lo = np.maximum.accumulate(np.where(new_key, pos, 0))
    else:  # (key group, time) is sorted: the first row of the group at or after t - window, by bisection
        group = np.cumsum(new_key) - 1
        t0, span = int(ts[0] if len(ts) == 1 else ts.min()), int(ts.max()) - int(ts.min()) + 1
        if int(group[-1] + 1) * span < 1 << 62:  # group * span + (t - t0) as one sorted int64
            sorted_keys = group * span + (ts - t0)
            lo = np.searchsorted(sorted_keys, group * span + np.maximum(ts - window - t0, 0), side="left")
        else:  # times too far apart for that: their ranks instead
            uniq = np.unique(ts)
            width = len(uniq) + 1
            sorted_keys = group * width + np.searchsorted(uniq, ts)
            lo = np.searchsorted(sorted_keys, group * width + np.searchsorted(uniq, ts - window), side="left")
    imps[rows[order]] = run_start - lo
    clicks[rows[order]] = cum[run_start] - cum[lo]
    return imps, clicks


def totals(keys: np.ndarray, times: np.ndarray, labels: np.ndarray, timed: np.ndarray, size: int,
           since: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(impressions, clicks) of each key in ``[0, size)`` over the timed rows at or after ``since`` (all without);
    a key of -1 counts for none."""
    sel = (timed & (keys >= 0)) if since is None else timed & (keys >= 0) & (times >= since)
    return (np.bincount(keys[sel], minlength=size).astype(np.int64),
            np.bincount(keys[sel], weights=labels[sel].astype(np.float64), minlength=size))


def features(imps: np.ndarray, clicks: np.ndarray, prior: float, rate: float) -> np.ndarray:
    """float32 [n, 2]: log-odds of the smoothed rate ``(c + prior * rate) / (n + prior)``, and ``log1p(n)``."""
    p = np.clip((clicks + prior * rate) / (imps + prior), _CLIP, 1 - _CLIP)
    return np.stack([np.log(p / (1 - p)), np.log1p(imps)], axis=1).astype(np.float32)


class History:
    """What the fit pass keeps of each training row for the stats: time, click and each stat field's fitting
    index, in the order the rows were observed (which is the order they are written)."""

    def __init__(self, stats: Sequence[Stat]) -> None:
        self.stats = list(stats)
        self._times: list[np.ndarray] = []
        self._timed: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._index: dict[str, list[np.ndarray]] = {f: [] for f in self.fields}

    @property
    def fields(self) -> list[str]:
        """The fields the stats count, each once."""
        return sorted({s.field for s in self.stats})

    def add(self, times: pl.Series, labels: np.ndarray, index: dict[str, np.ndarray]) -> None:
        """One observed chunk: its time column (Int64, nulls allowed), first label and, per field, each row's
        fitting index (a vocabulary field) or bucket (a hashed one)."""
        self._timed.append(times.is_not_null().to_numpy())
        self._times.append(times.fill_null(0).to_numpy().astype(np.int64, copy=False))
        self._labels.append(np.asarray(labels, np.float32).reshape(len(times), -1)[:, 0].copy())
        for f, parts in self._index.items():
            parts.append(np.asarray(index[f], np.int64))

    def finish(self, local_ids: dict[str, np.ndarray], sizes: dict[str, int]) -> tuple[np.ndarray, Snapshot]:
        """Given each stat field's map from fitting index (or bucket) to its id within the field, the
        training rows' unscaled features as of their own time, float32 [rows, 2 * stats], and the snapshot."""
        cat = lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt)  # noqa: E731
        times, timed, labels = cat(self._times, np.int64), cat(self._timed, bool), cat(self._labels, np.float32)
        rate = float(labels.mean()) if len(labels) else 0.0
        end = int(times[timed].max()) + 1 if timed.any() else 0
        keys = {f: local_ids[f][cat(parts, np.int64)] for f, parts in self._index.items()}
        self.__init__(self.stats)  # the per-chunk parts are no longer needed
        out = np.empty((len(labels), 2 * len(self.stats)), np.float32)
        tables: dict[Stat, tuple[np.ndarray, np.ndarray]] = {}
        for j, st in enumerate(self.stats):
            span = window_span(st.window) if st.window else None
            imps, clicks = as_of(keys[st.field], times, labels, timed, span)
            out[:, 2 * j: 2 * j + 2] = features(imps, clicks, st.prior, rate)
            tables[st] = totals(keys[st.field], times, labels, timed, sizes[st.field],
                                None if span is None else end - span)
        return out, Snapshot(self.stats, rate, end, tables)


def _value_counts(values: pl.Series, times: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> pl.DataFrame:
    """Impressions and clicks per non-null value of ``values`` over the rows where ``rows`` is True."""
    df = pl.DataFrame({"value": values.cast(pl.String), "y": labels.astype(np.float64)}).filter(
        pl.Series(rows) & pl.col("value").is_not_null())
    return df.group_by("value").agg(pl.len().cast(pl.Int64).alias("impressions"), pl.col("y").sum().alias("clicks"))


class Snapshot:
    """Per stat, the impressions and clicks of every id of its field as of ``end`` (the instant after the latest
    training time), and its features per id: what valid, test and served rows read. ``newcomers``: per stat, the
    counts of values a refresh met outside the vocabulary (value, impressions, clicks), read for rows at the OOV
    id by their value."""

    def __init__(self, stats: Sequence[Stat], rate: float, end: int,
                 tables: dict[Stat, tuple[np.ndarray, np.ndarray]],
                 newcomers: dict[Stat, pl.DataFrame] | None = None) -> None:
        self.stats, self.rate, self.end, self.tables = list(stats), float(rate), int(end), tables
        self.newcomers = {st: df for st, df in (newcomers or {}).items() if df.height}
        self._features = [features(*tables[st], st.prior, self.rate) for st in self.stats]

    def reads_values(self, field: str) -> bool:
        """Whether rows of ``field`` at its OOV id need their raw value (a newcomer of some stat of it)."""
        return any(st.field == field for st in self.newcomers)

    def rolled(self, local_ids: dict[str, np.ndarray], times: np.ndarray, labels: np.ndarray, timed: np.ndarray,
               newcomers: dict[str, pl.Series] | None = None) -> tuple[Snapshot, list[dict[str, object]]]:
        """The snapshot as of the instant after the latest of these newer rows, and per stat what changed.

        An all-history stat adds the rows at or after this snapshot's instant (earlier ones are counted already);
        a stat with a window is counted afresh from the rows inside the window that ends at the new instant, so
        the rows must hold every impression of that window (a warning says when they start after it begins).
        A key of -1 counts for none; ``newcomers`` holds, per field, the raw value of each such row that is a
        value new since training (null elsewhere), counted by value.
        """
        end = max(self.end, int(times[timed].max()) + 1) if timed.any() else self.end
        first = int(times[timed].min()) if timed.any() else None
        tables, new_values, changes = {}, {}, []
        for st in self.stats:
            keys, size = local_ids[st.field], len(self.tables[st][0])
            values = (newcomers or {}).get(st.field)
            change: dict[str, object] = {"columns": list(st.columns)}
            if st.window is None:
                new = totals(keys, times, labels, timed, size, since=self.end)
                tables[st] = (self.tables[st][0] + new[0], self.tables[st][1] + new[1])
                if values is not None:
                    old = self.newcomers.get(st, pl.DataFrame(schema=_COUNTS))
                    counted = _value_counts(values, times, labels, timed & (times >= self.end))
                    new_values[st] = pl.concat([old, counted.select(old.columns)]).group_by("value").agg(
                        pl.col("impressions").sum(), pl.col("clicks").sum())
                change["rows_added"] = int(new[0].sum()) + (int(counted["impressions"].sum())
                                                            if values is not None else 0)
            else:
                since = end - window_span(st.window)
                tables[st] = totals(keys, times, labels, timed & (times < end), size, since=since)
                if values is not None:
                    new_values[st] = _value_counts(values, times, labels, timed & (times >= since) & (times < end))
                change["rows_in_window"] = int(tables[st][0].sum()) + (int(new_values[st]["impressions"].sum())
                                                                       if values is not None else 0)
                if first is None or first > since:
                    change["warning"] = (f"the data starts after the {st.window} window of {st.columns[0]!r} "
                                         "begins: the rows before it are not counted")
            if st in new_values:
                change["newcomers"] = new_values[st].height
            changes.append(change)
        return Snapshot(self.stats, self.rate, end, tables, new_values), changes

    def fill(self, local_ids: dict[str, np.ndarray], out: np.ndarray,
             values: dict[str, pl.Series] | None = None) -> None:
        """Write each row's unscaled stat features into ``out`` [n, 2 * stats], given each field's ids within it;
        a row at the OOV id of a field with newcomers is looked up by its raw value in ``values`` (the field's
        column)."""
        for j, st in enumerate(self.stats):
            out[:, 2 * j: 2 * j + 2] = self._features[j][local_ids[st.field]]
            table = self.newcomers.get(st)
            if table is None or values is None or st.field not in values:
                continue
            rows = np.flatnonzero(local_ids[st.field] == _OOV)
            if len(rows):
                found = pl.DataFrame({"value": values[st.field].cast(pl.String).gather(rows)}).join(
                    table, on="value", how="left", maintain_order="left").fill_null(0)
                out[rows, 2 * j: 2 * j + 2] = features(found["impressions"].to_numpy(),
                                                       found["clicks"].to_numpy().astype(np.float64), st.prior,
                                                       self.rate)

    def save(self, folder: Path) -> dict[str, float | int]:
        """Write the counts (ids with at least one impression) to ``stats.parquet`` and the newcomers' to
        ``stats_newcomers.parquet``; returns what encoder.json keeps of it."""
        frames = []
        for j, st in enumerate(self.stats):
            imps, clicks = self.tables[st]
            ids = np.flatnonzero(imps)
            frames.append(pl.DataFrame({"stat": pl.Series([j] * len(ids), dtype=pl.Int32), "id": ids,
                                        "impressions": imps[ids], "clicks": clicks[ids]}))
        pl.concat(frames).write_parquet(folder / STATS_FILE)
        if self.newcomers:
            pl.concat([df.select(list(_COUNTS)).with_columns(pl.lit(self.stats.index(st), pl.Int32).alias("stat"))
                       for st, df in self.newcomers.items()]).write_parquet(folder / NEWCOMERS_FILE)
        else:
            (folder / NEWCOMERS_FILE).unlink(missing_ok=True)
        return {"rate": self.rate, "end": self.end}

    @classmethod
    def load(cls, folder: Path, stats: Sequence[Stat], meta: dict[str, float | int],
             sizes: dict[str, int]) -> Snapshot:
        """Read what :meth:`save` wrote; an id outside its field is an error naming the file."""
        path = folder / STATS_FILE
        if not path.exists():
            raise ValueError(f"{path} is missing: the schema has stats, so the encoder needs their snapshot")
        df = pl.read_parquet(path)
        tables = {}
        for j, st in enumerate(stats):
            part = df.filter(pl.col("stat") == j)
            ids, size = part["id"].to_numpy(), sizes[st.field]
            if len(ids) and (ids.min() < 0 or ids.max() >= size):
                raise ValueError(f"{path}: stat {st.columns[0]!r} has ids outside its field's {size} ids")
            imps, clicks = np.zeros(size, np.int64), np.zeros(size, np.float64)
            imps[ids], clicks[ids] = part["impressions"].to_numpy(), part["clicks"].to_numpy()
            tables[st] = (imps, clicks)
        newcomers = {}
        if (folder / NEWCOMERS_FILE).exists():
            df = pl.read_parquet(folder / NEWCOMERS_FILE)
            newcomers = {st: df.filter(pl.col("stat") == j).select(list(_COUNTS)) for j, st in enumerate(stats)}
        return cls(stats, float(meta["rate"]), int(meta["end"]), tables, newcomers)

    def describe(self) -> dict[str, object]:
        """What a run records of the snapshot: its instant, the training click rate, and per stat its columns,
        window, how many ids have history and how many impressions it holds."""
        return {"as_of": self.end, "click_rate": self.rate, "stats": [
            {"columns": list(st.columns), "window": st.window, "prior": st.prior,
             "ids_with_history": int(np.count_nonzero(self.tables[st][0])),
             "newcomers": self.newcomers[st].height if st in self.newcomers else 0,
             "impressions": int(self.tables[st][0].sum()) + (int(self.newcomers[st]["impressions"].sum())
                                                             if st in self.newcomers else 0)} for st in self.stats]}
