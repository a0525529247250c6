"""The one validation layer: every entry point (file readers, ``Bundle.predict`` on dicts or frames, the CLI,
the HTTP server) types its input through :func:`coerce_chunk`, so a bad value gets the same answer everywhere.

A row is bad when a numeric field holds text that is not a number or a non-finite number (``inf``, ``1e400``,
``nan``), the time does not parse, or the label is missing or not 0/1 (±1). Bad rows are returned apart with
their reason; the caller counts, reports and keeps them aside. Records given as dicts must name every feature
field (a missing or misspelled key is an error naming it, as a frame with a missing column is).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from operator import itemgetter
from typing import Any

import numpy as np
import polars as pl

from ctrkit.schema import Field, Schema


class DataError(ValueError):
    """Input data does not fit the schema; the message names the file, row and field."""


EPOCH_UNITS = {"epoch_s": 1_000_000, "epoch_ms": 1_000}


def needed_columns(schema: Schema, with_label: bool = True) -> list[str]:
    """Columns a reader must deliver: features, then label / time / group / weight when set."""
    cols = [f.name for f in schema.fields]
    for c in (*(schema.label_columns if with_label else ()), schema.time, schema.group,
              schema.weight if with_label else None):
        if c and c not in cols:
            cols.append(c)
    return cols


def _label_expr(col: str) -> pl.Expr:
    v = pl.col(col).cast(pl.Float64, strict=False)
    return pl.when(v == -1.0).then(0.0).otherwise(v).cast(pl.Float32)


def _time_expr(col: str, dtype: pl.DataType, time_format: str | None) -> pl.Expr:
    """Epoch microseconds of a time column: dates and times (strftime ``time_format`` or ISO), epoch seconds or
    milliseconds with ``time_format: epoch_s / epoch_ms``; numbers of a typed (Parquet, frame) column without a
    format stay as they are."""
    e = pl.col(col)
    if dtype.is_temporal():
        return e.cast(pl.Datetime("us")).dt.epoch("us")
    if time_format in EPOCH_UNITS:
        v = (e.str.strip_chars() if dtype == pl.String else e).cast(pl.Float64, strict=False)
        return pl.when(v.is_finite()).then(v * EPOCH_UNITS[time_format]).otherwise(None).cast(pl.Int64)
    if dtype == pl.String:
        return e.str.strip_chars().str.to_datetime(format=time_format, strict=False, time_zone="UTC").dt.epoch("us")
    return e.cast(pl.Int64, strict=False)


def _as_string(col: str, dtype: pl.DataType) -> pl.Expr:
    e = pl.col(col)
    if dtype == pl.String:
        return e
    if dtype == pl.Boolean:  # as a dict's True and False are read: 1 and 0
        return e.cast(pl.Int8).cast(pl.String)
    if dtype.is_float():
        # 3.0 and "3" must give the same category whichever reader produced the value.
        return pl.when(e == e.floor()).then(e.cast(pl.Int64, strict=False).cast(pl.String)).otherwise(
            e.cast(pl.String))
    return e.cast(pl.String)


def _as_list(f: Field, dtype: pl.DataType) -> pl.Expr:
    """A multi / sequence column as List(String): a list is kept (its items as strings), a string is split at
    the field's ``sep`` (spaces around items dropped; "" is the empty list); null stays null."""
    e = pl.col(f.name)
    if isinstance(dtype, (pl.List, pl.Array)):
        inner = dtype.inner if dtype.inner is not None else pl.String()
        if isinstance(inner, (pl.List, pl.Array, pl.Struct)):
            raise DataError(f"field {f.name!r} is a {f.kind} field but its items have type {inner}")
        items = e.cast(pl.List(pl.String)) if inner == pl.String or inner.is_integer() or inner == pl.Null \
            else e.list.eval(_as_string("", inner))
    elif dtype == pl.String:
        items = e.str.split(f.sep) if f.sep is not None else pl.concat_list(e)
    elif dtype == pl.Null:
        items = e.cast(pl.List(pl.String))
    elif dtype.is_numeric():
        items = pl.concat_list(_as_string(f.name, dtype))
    else:
        raise DataError(f"field {f.name!r} is a {f.kind} field but the data has type {dtype}; expected a list "
                        "or a string" + (f" of values separated by {f.sep!r}" if f.sep else ""))
    stripped = pl.element().str.strip_chars()
    return items.list.eval(stripped.filter(stripped.is_not_null() & (stripped != "")))


def _cross(parts: list[pl.Expr]) -> pl.Expr:
    """The combined value of categorical columns (as strings); null when any part is missing."""
    missing = pl.any_horizontal([p.is_null() | (p == "") for p in parts])
    return pl.when(missing).then(None).otherwise(pl.concat_str(parts, separator="\x1f"))


def coerce_chunk(df: pl.DataFrame, schema: Schema, with_label: bool = True) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Type a raw chunk to the reader contract; returns (good rows, bad rows with a ``_reason`` column).

    A non-number or a non-finite number in a numeric field, a time that does not parse, a label outside
    {-1, 0, 1}, a missing label, or a missing, negative or non-numeric weight makes a row bad; an empty
    categorical string counts as missing, and so does an empty time. Columns absent from the chunk raise a
    DataError naming them.
    """
    cols = needed_columns(schema, with_label)
    types = df.schema  # once: a frame builds its schema anew on every access
    absent = [c for c in cols if c not in types]
    if absent:
        raise DataError(f"missing columns {absent}; the data has {df.columns}")
    exprs: list[pl.Expr] = []
    checks: list[pl.Expr] = []
    # a float column whose sum is finite holds no inf or NaN: only the others are checked row by row
    floats = [f.name for f in schema.fields if f.kind == "numeric" and types[f.name].is_float()]
    sums = [df.get_column(c).sum() for c in floats] if df.height else []  # eager: a query costs more than a sum
    suspect = {c for c, v in zip(floats, sums) if v is not None and not math.isfinite(v)}
    if not suspect and _typed_already(df, schema, with_label):  # eager: no query to plan and run
        out = pl.DataFrame([df.get_column(c) for c in cols + ["_line"] * ("_line" in types)])
        return out, out.clear().with_columns(pl.lit(None, pl.String).alias("_reason"))
    for f in schema.fields:
        dtype = types[f.name]
        if f.kind == "categorical":
            exprs.append(_as_string(f.name, dtype).alias(f.name))
            continue
        if f.is_list:
            exprs.append(_as_list(f, dtype).alias(f.name))
            continue
        if dtype == pl.String:
            raw = pl.col(f.name).str.strip_chars()
            val = raw.cast(pl.Float64, strict=False)
            checks.append(pl.when(raw.is_not_null() & (raw != "") & val.is_null())
                          .then(pl.lit(f"field {f.name!r}: not a number"))
                          .otherwise(None))
        elif dtype.is_numeric() or dtype == pl.Boolean:
            val = pl.col(f.name).cast(pl.Float64)
        else:
            raise DataError(f"field {f.name!r} is numeric but the data has type {dtype}")
        if dtype == pl.String or f.name in suspect:
            checks.append(pl.when(~val.is_finite())
                          .then(pl.lit(f"field {f.name!r}: not a finite number"))
                          .otherwise(None))
        exprs.append(val.alias(f.name))
    for label in schema.label_columns if with_label else ():
        lab = _label_expr(label)
        exprs.append(lab.alias(label))
        checks.append(pl.when(lab.is_null() | ~lab.is_in([0.0, 1.0]))
                      .then(pl.lit(f"label {label!r}: expected 0/1 or -1/1"))
                      .otherwise(None))
    if schema.time and schema.time not in [f.name for f in schema.fields]:
        time = _time_expr(schema.time, types[schema.time], schema.time_format)
        exprs.append(time.alias(schema.time))
        raw = pl.col(schema.time)
        present = raw.is_not_null() & (raw != "") if types[schema.time] == pl.String else raw.is_not_null()
        expected = (f"a time in the format {schema.time_format}" if schema.time_format else
                    "a date and time (for epoch numbers set time_format: epoch_s or epoch_ms)")
        checks.append(pl.when(present & time.is_null())
                      .then(pl.lit(f"time {schema.time!r}: not {expected}"))
                      .otherwise(None))
    if schema.group and schema.group not in [f.name for f in schema.fields]:
        exprs.append(_as_string(schema.group, types[schema.group]).alias(schema.group))
    if with_label and schema.weight:
        raw_w = pl.col(schema.weight)
        w = (raw_w.str.strip_chars() if types[schema.weight] == pl.String else raw_w).cast(pl.Float64, strict=False)
        exprs.append(w.alias(schema.weight))
        checks.append(pl.when(w.is_null() | ~w.is_finite() | (w < 0))
                      .then(pl.lit(f"weight {schema.weight!r}: missing, negative or not a number"))
                      .otherwise(None))
    exprs += [pl.col("_line")] if "_line" in types else []
    for cross in schema.crosses or ():
        exprs.append(_cross([_as_string(n, types[n]) for n in cross]).alias("_x_".join(cross)))
    if not checks:
        out = df.select(exprs)
        return out, out.clear().with_columns(pl.lit(None, pl.String).alias("_reason"))
    reason = pl.coalesce(checks) if len(checks) > 1 else checks[0]
    tagged = df.select([*exprs, reason.alias("_reason")])  # one pass for the values and the checks
    if tagged["_reason"].null_count() == tagged.height:
        return tagged.drop("_reason"), tagged.clear()
    bad_mask = tagged["_reason"].is_not_null()
    return tagged.filter(~bad_mask).drop("_reason"), tagged.filter(bad_mask)


def _typed_already(df: pl.DataFrame, schema: Schema, with_label: bool) -> bool:
    """True when typing would change nothing: text categories, float numbers (their sums finite, checked by the
    caller), and no list, label, time, group, weight or cross column to derive."""
    types, names = df.schema, {f.name for f in schema.fields}
    derived = [c for c in (schema.time, schema.group) if c and c not in names]
    return (not schema.crosses and not schema.list_fields and not derived
            and not (with_label and (schema.label_columns or schema.weight))
            and all(types[f.name] == (pl.String if f.kind == "categorical" else pl.Float64) for f in schema.fields))


Records = Mapping[str, Any] | Sequence[Mapping[str, Any]] | pl.DataFrame | Any


def _scalar_text(value: Any, row: int, name: str) -> str | None:
    """A record's value as the text a file would hold; anything but a scalar is an error naming row and field."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    if isinstance(value, (str, int, np.integer)):
        return str(value)
    raise DataError(f"record {row}: field {name!r} has a {type(value).__name__} value; expected a scalar")


def _items_text(value: Any, row: int, f: Field) -> str | list[str | None] | None:
    """A multi / sequence record value: a string (split later at ``sep``) or a list of scalars as texts."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_scalar_text(v, row, f.name) for v in value]
    raise DataError(f"record {row}: field {f.name!r} has a {type(value).__name__} value; expected a list or a string")


def _list_series(f: Field, values: list[Any]) -> pl.Series:
    """A multi / sequence field's record values as one column: all strings (split by :func:`coerce_chunk` at
    ``sep``), or lists of strings, a string then becoming the list of its items."""
    if all(v is None or isinstance(v, str) for v in values):
        return pl.Series(f.name, values, dtype=pl.String)
    items = [v if v is None or isinstance(v, list) else [v] if f.sep is None else v.split(f.sep) for v in values]
    return pl.Series(f.name, items, dtype=pl.List(pl.String))


_TEXT = {str, type(None)}
_NUMBERS = {int, float, type(None)}


def _scalar_series(f: Field, values: Sequence[Any]) -> pl.Series:
    """A scalar field's record values as one column, built in one call in the common cases (all text, or a
    numeric field of plain numbers); anything else through :func:`_scalar_text`, which names a bad value."""
    try:  # the common case first: polars refuses (strictly) any value of another type, and the slow path runs
        return pl.Series(f.name, values, dtype=pl.Float64 if f.kind == "numeric" else pl.String, strict=True)
    except (TypeError, OverflowError):
        pass
    types = set(map(type, values))
    if types <= _TEXT:
        return pl.Series(f.name, values, dtype=pl.String)
    if f.kind == "numeric" and types <= _NUMBERS:
        return pl.Series(f.name, values, dtype=pl.Float64, strict=False)
    return pl.Series(f.name, [_scalar_text(v, i, f.name) for i, v in enumerate(values)], dtype=pl.String)


def _same_keys(rows: list[Any], need: set[str], allowed: set[str] | None) -> dict[str, tuple[Any, ...]] | None:
    """Every key's values, in one pass over the records, when all records are dicts with one set of keys that
    holds ``need`` and lies within ``allowed``; None otherwise (the caller then checks record by record)."""
    if not rows or set(map(type, rows)) != {dict} or len(set(map(len, rows))) != 1:
        return None
    keys = tuple(rows[0])
    if not need.issubset(keys) or (allowed is not None and not allowed.issuperset(keys)) or not keys:
        return None
    try:  # a record of the same size holding each of the first record's keys has exactly its keys
        columns = zip(*map(itemgetter(*keys), rows)) if len(keys) > 1 else [tuple(r[keys[0]] for r in rows)]
        return dict(zip(keys, columns))
    except KeyError:
        return None


def records_frame(records: Records, schema: Schema, context: Mapping[str, Any] | None = None,
                  extra: Sequence[str] | None = None) -> pl.DataFrame:
    """Dicts, a list of dicts, or a polars/pandas frame as a polars frame holding every feature column.

    A dict must name every feature field (None is a missing value), in itself or in ``context``, the values
    all dicts share (a ranking request's user and page; a dict's own value wins); a frame must have every
    feature column. With ``extra`` given, a dict may hold no keys but the fields and those (an HTTP request's
    contract); without, other keys are ignored, as a frame's other columns are. Values are left as read:
    :func:`coerce_chunk` judges them. Columns are built field by field, with no Python work per value in
    the common cases, so a request of a thousand candidates costs little before the model.
    """
    names = schema.input_columns
    if isinstance(records, pl.DataFrame):
        df = records
    elif type(records).__module__.startswith("pandas"):
        df = pl.from_pandas(records)
    elif isinstance(records, (str, bytes, os.PathLike)) or not isinstance(records, (Mapping, Sequence)):
        hint = ("; a file is scored by Scorer.score_file or `ctrkit predict`, evaluated by Bundle.evaluate"
                if isinstance(records, (str, os.PathLike)) else "")
        raise DataError(f"expected a dict, a list of dicts or a DataFrame, got {type(records).__name__}{hint}")
    else:
        rows = [records] if isinstance(records, Mapping) else list(records)
        ctx = dict(context or {})
        known = set(names)
        stray = sorted(str(k) for k in ctx if k not in known)
        if stray:
            raise DataError(f"context: unknown field(s) {stray}; the bundle's fields are {sorted(known)}")
        need = known - ctx.keys()
        allowed = None if extra is None else known | set(extra)
        given = _same_keys(rows, need, allowed)
        for i, r in enumerate(rows if given is None else ()):
            if not isinstance(r, Mapping):
                raise DataError(f"record {i}: expected a mapping of field -> value, got {type(r).__name__}")
            keys = r.keys()
            if not need <= keys:
                missing = [n for n in names if n in need and n not in keys]
                unknown = sorted(str(k) for k in keys if k not in known)
                hint = f" (it has unknown keys {unknown})" if unknown else ""
                raise DataError(f"record {i}: missing field(s) {missing}{hint}; pass None for a missing value")
            if allowed is not None and not keys <= allowed:
                unknown = sorted(str(k) for k in keys if k not in allowed)
                raise DataError(f"record {i}: unknown field(s) {unknown}; the bundle's fields are {sorted(known)}")
        lists = {f.name: f for f in schema.list_fields}
        columns = {}
        for f in schema.fields:
            default = ctx.get(f.name)
            if given is not None:
                values = given[f.name] if f.name in given else [default] * len(rows)
            else:
                values = [r.get(f.name, default) for r in rows] if f.name in ctx else [r[f.name] for r in rows]
            columns[f.name] = (_list_series(f, [_items_text(v, i, f) for i, v in enumerate(values)])
                               if f.name in lists else _scalar_series(f, values))
        return pl.DataFrame(columns, height=len(rows))
    dup = sorted({c for c in df.columns if df.columns.count(c) > 1})
    if dup:
        raise DataError(f"input has duplicated columns {dup}")
    absent = [c for c in names if c not in df.columns]
    if absent:
        raise DataError(f"input lacks the feature columns {absent} that this bundle was trained on "
                        f"(input has {df.columns}); is it data of another schema?")
    return df


def plain_rows(records: Sequence[Mapping[str, Any]], schema: Schema,
               context: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The typed feature values of plain records, those :meth:`ctrkit.data.encode.Encoder.encode_records` took
    (every field present in the record or ``context``; categories str, int or None; numbers finite float, int or
    None), as :func:`records_frame` and :func:`coerce_chunk` type them: numbers as float, categories as str,
    missing as None. A few shown items are typed this way for the event log, where a frame costs a millisecond."""
    ctx = context or {}
    numeric = [f.name for f in schema.fields if f.kind == "numeric"]
    text = [f.name for f in schema.fields if f.kind != "numeric"]
    out = []
    for r in records:
        row = {**{n: ctx[n] for n in ctx if n not in r}, **r}
        typed = {n: None if (v := row[n]) is None else float(v) for n in numeric}
        typed.update({n: v if (v := row[n]) is None or type(v) is str else str(v) for n in text})
        out.append({f.name: typed[f.name] for f in schema.fields})
    return out


def check_labels(label: np.ndarray, schema: Schema, source: str, split: str = "training") -> None:
    """A label that never varies trains and measures nothing (no AUC, no early stopping): an error saying so."""
    n = len(label)
    pos = int(np.count_nonzero(label > 0.5))
    if n and pos in (0, n):
        raise DataError(f"{source}: the label {schema.label!r} is {int(pos == n)} in all {n:,} {split} rows; "
                        f"a model needs both clicks and non-clicks (is {schema.label!r} the right column?)")
