"""Readers: CSV/TSV (header or not), Parquet, libFM/libSVM and in-memory frames, ``.gz`` transparently.

Every reader yields chunks as polars DataFrames with the columns a schema needs, typed the same way:
categorical fields as String, numeric fields as Float64, the label as Float32 in {0, 1}, the group as String
and the time as Int64 (epoch microseconds, or the raw number). Files are read in line-aligned byte blocks, so
a file larger than memory streams. Rows that cannot be parsed (wrong number of fields, a non-number in a
numeric column, a bad label) are never dropped silently: they are counted in a :class:`ReadReport`, kept
aside in a file when asked, and the good rows go on.
"""

from __future__ import annotations

import gzip
import io
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv

from ctrkit.schema import Field, Schema, SchemaError

# Blocks under glibc's 32 MiB mmap ceiling are recycled from the heap instead of being mapped (and
# page-faulted) afresh each time, which halves the cost of reading them; larger blocks make fitting cheaper.
BLOCK_BYTES = 24 << 20
FORMATS = ("csv", "tsv", "parquet", "libfm")


class DataError(ValueError):
    """Input data does not fit the schema; the message names the file, row and field."""


@dataclass
class ReadReport:
    """What a reader saw: rows read, rows rejected (with the first few reasons) and where they went."""

    source: str = ""
    rows: int = 0
    bad_rows: int = 0
    examples: list[str] = field(default_factory=list)
    bad_rows_path: str | None = None

    def add_bad(self, line_no: int | None, reason: str) -> None:
        """Count one rejected row and keep its reason while fewer than five are kept."""
        self.bad_rows += 1
        if len(self.examples) < 5:
            where = f"line {line_no}" if line_no is not None else "row"
            self.examples.append(f"{self.source} {where}: {reason}")

    def summary(self) -> str:
        """One line for logs and the CLI."""
        s = f"{self.source}: {self.rows:,} rows read, {self.bad_rows:,} rejected"
        if self.bad_rows_path:
            s += f" (written to {self.bad_rows_path})"
        if self.examples:
            s += "; e.g. " + "; ".join(self.examples[:3])
        return s

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"source": self.source, "rows": self.rows, "bad_rows": self.bad_rows,
                "examples": self.examples, "bad_rows_path": self.bad_rows_path}


class _BadRowSink:
    """Writes rejected raw lines, each with its line number and reason, to a text file (created on first use)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._fh: IO[str] | None = None

    def write(self, line_no: int | None, reason: str, text: str) -> None:
        if self.path is None:
            return
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "w", encoding="utf-8")
        self._fh.write(f"{line_no if line_no is not None else ''}\t{reason}\t{text}\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# --- format detection -------------------------------------------------------------------------------
def detect_format(path: str | Path) -> str:
    """csv, tsv, parquet or libfm from the file name; a plain ``.txt`` is sniffed from its first line."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".libfm", ".libsvm", ".svm")):
        return "libfm"
    if name.endswith(".tsv"):
        return "tsv"
    if name.endswith(".csv"):
        return "csv"
    first = _first_line(path)
    if first.count("\t") > first.count(","):
        return "tsv"
    tokens = first.split()
    if len(tokens) > 1 and all(":" in t for t in tokens[1:]):
        return "libfm"
    return "csv"


def _open_binary(path: str | Path) -> IO[bytes]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    with open(p, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(p, "rb") if magic == b"\x1f\x8b" else open(p, "rb")


def _first_line(path: str | Path) -> str:
    with _open_binary(path) as fh:
        return fh.readline().decode("utf-8", errors="replace").rstrip("\r\n")


def _separator(fmt: str) -> str:
    return "\t" if fmt == "tsv" else ","


# --- chunk coercion (shared by every source) ------------------------------------------------------
def needed_columns(schema: Schema, with_label: bool = True) -> list[str]:
    """Columns a reader must deliver: features, then label / time / group when set."""
    cols = [f.name for f in schema.fields]
    for c in (*(schema.label_columns if with_label else ()), schema.time, schema.group):
        if c and c not in cols:
            cols.append(c)
    return cols


def _label_expr(col: str) -> pl.Expr:
    v = pl.col(col).cast(pl.Float64, strict=False)
    return pl.when(v == -1.0).then(0.0).otherwise(v).cast(pl.Float32)


def _time_expr(col: str, dtype: pl.DataType) -> pl.Expr:
    if dtype.is_temporal():
        return pl.col(col).cast(pl.Datetime("us")).dt.epoch("us")
    if dtype == pl.String:
        return pl.col(col).str.strip_chars().str.to_datetime(strict=False, time_zone="UTC").dt.epoch("us")
    return pl.col(col).cast(pl.Int64, strict=False)


def _as_string(col: str, dtype: pl.DataType) -> pl.Expr:
    e = pl.col(col)
    if dtype == pl.String:
        return e
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

    A non-number in a numeric field, a time string that does not parse, a label outside {-1, 0, 1} or a missing
    label makes a row bad; an empty categorical string counts as missing, and so does an empty time. Columns
    absent from the chunk raise a DataError naming them.
    """
    cols = needed_columns(schema, with_label)
    types = df.schema  # once: a frame builds its schema anew on every access
    absent = [c for c in cols if c not in types]
    if absent:
        raise DataError(f"missing columns {absent}; the data has {df.columns}")
    exprs: list[pl.Expr] = []
    checks: list[pl.Expr] = []
    for f in schema.fields:
        dtype = types[f.name]
        if f.kind == "categorical":
            exprs.append(_as_string(f.name, dtype).alias(f.name))
        elif f.is_list:
            exprs.append(_as_list(f, dtype).alias(f.name))
        else:
            if dtype == pl.String:
                raw = pl.col(f.name).str.strip_chars()
                val = raw.cast(pl.Float64, strict=False)
                checks.append(pl.when(raw.is_not_null() & (raw != "") & val.is_null())
                              .then(pl.lit(f"field {f.name!r}: not a number"))
                              .otherwise(None))
                exprs.append(val.alias(f.name))
            elif dtype.is_numeric() or dtype == pl.Boolean:
                exprs.append(pl.col(f.name).cast(pl.Float64).alias(f.name))
            else:
                raise DataError(f"field {f.name!r} is numeric but the data has type {dtype}")
    for label in schema.label_columns if with_label else ():
        lab = _label_expr(label)
        exprs.append(lab.alias(label))
        checks.append(pl.when(lab.is_null() | ~lab.is_in([0.0, 1.0]))
                      .then(pl.lit(f"label {label!r}: expected 0/1 or -1/1"))
                      .otherwise(None))
    if schema.time and schema.time not in [f.name for f in schema.fields]:
        time = _time_expr(schema.time, types[schema.time])
        exprs.append(time.alias(schema.time))
        if types[schema.time] == pl.String:
            raw = pl.col(schema.time)
            checks.append(pl.when(raw.is_not_null() & (raw != "") & time.is_null())
                          .then(pl.lit(f"time {schema.time!r}: not a date and time"))
                          .otherwise(None))
    if schema.group and schema.group not in [f.name for f in schema.fields]:
        exprs.append(_as_string(schema.group, types[schema.group]).alias(schema.group))
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


# --- CSV / TSV ----------------------------------------------------------------------------------
def _byte_blocks(fh: IO[bytes], size: int) -> Iterator[bytes]:
    """Blocks of about ``size`` bytes that end at a line end (the last one gets a newline if it lacks one).

    In a plain file the end of the line that straddles ``size`` is looked up first and the block is read in
    one piece: appending the rest of that line to a block that has been read already would copy the whole
    block into fresh memory (a sixth of the page faults of encoding a large file). The first block is an
    eighth of ``size``, so that the work on parsed rows starts sooner.
    """
    want = max(size // 8, 1)
    if fh.seekable() and not isinstance(fh, gzip.GzipFile):
        while True:
            start = fh.tell()
            fh.seek(want - 1, io.SEEK_CUR)
            end = fh.tell() + len(fh.readline())
            fh.seek(start)
            data = fh.read(end - start)
            if not data:
                return
            want = size
            yield data if data.endswith(b"\n") else data + b"\n"
    while True:
        data = fh.read(want)
        want = size
        if not data:
            return
        if not data.endswith(b"\n"):
            data += fh.readline()
            if not data.endswith(b"\n"):
                data += b"\n"
        yield data


def _csv_layout(path: str | Path, schema: Schema | None, sep: str,
                has_header: bool | None) -> tuple[list[str], bool]:
    """Column names and whether the first line is a header."""
    first = _first_line(path)
    tokens = [t.strip().strip('"') for t in first.split(sep)]
    if schema is not None and schema.columns:
        if has_header is None:
            has_header = tokens == list(schema.columns)
        if len(schema.columns) != len(tokens):
            raise DataError(f"{path}: the schema lists {len(schema.columns)} columns but line 1 has "
                            f"{len(tokens)} fields")
        return list(schema.columns), has_header
    if has_header is False:
        raise DataError(f"{path}: a file without a header needs `columns` in the schema")
    return tokens, True


def _parse_block_careful(block: bytes, names: list[str], sep: str, first_line_no: int,
                         report: ReadReport, sink: _BadRowSink) -> pl.DataFrame:
    """Slow path: pyarrow with a handler that sets aside rows with a wrong number of fields."""
    bad_idx: list[tuple[int, str]] = []

    def handler(row: Any) -> str:
        bad_idx.append((row.number, row.text))
        return "skip"

    table = pacsv.read_csv(
        pa.py_buffer(block),
        read_options=pacsv.ReadOptions(column_names=names, use_threads=False),
        parse_options=pacsv.ParseOptions(delimiter=sep, quote_char='"' if sep == "," else False,
                                         invalid_row_handler=handler, newlines_in_values=False),
        convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                             strings_can_be_null=True, quoted_strings_can_be_null=True),
    )
    # pyarrow numbers the rows it reads, skipping blank lines: row k is on the k-th non-blank line
    rows = first_line_no + np.flatnonzero(~_blank_lines(block))
    for number, text in bad_idx:
        line_no = int(rows[number - 1]) if number is not None else None
        reason = f"expected {len(names)} fields, got {len(text.split(sep))}"
        report.add_bad(line_no, reason)
        sink.write(line_no, reason, text)
    df = pl.from_arrow(table)
    assert isinstance(df, pl.DataFrame)
    # line numbers of the good rows, for messages about bad values further on
    lines = np.delete(rows, [n - 1 for n, _ in bad_idx if n is not None])
    return df.with_columns(pl.Series("_line", lines[: df.height]))


def _blank_lines(block: bytes) -> np.ndarray:
    """Which lines of a block (each ending in a newline) are empty, a lone carriage return counting as empty."""
    raw = np.frombuffer(block, dtype=np.uint8)
    ends = np.flatnonzero(raw == 10)
    length = ends - np.concatenate([[0], ends[:-1] + 1])
    return (length == 0) | ((length == 1) & (raw[ends - 1] == 13))


def _parse_block_fast(block: bytes, names: list[str], sep: str, dtypes: dict[str, pl.DataType],
                      proj: list[int] | None) -> pl.DataFrame | None:
    """polars' parse of a block, or None where the careful path must decide: a field that does not parse, a row
    with too few or too many fields, a blank line, a stray carriage return.

    polars fills a short row with nulls and skips blank lines, so the counts of line ends and separators are
    what catch them: a good block has one line end per row and ``len(names) - 1`` separators per line end. The
    two are counted apart, since a blank line and a short row would cancel in their sum.
    """
    try:
        df = pl.read_csv(block, has_header=False, schema=dtypes, separator=sep, quote_char=None, columns=proj,
                         raise_if_empty=False)
    except (pl.exceptions.ComputeError, pl.exceptions.SchemaError):
        return None
    raw = np.frombuffer(block, dtype=np.uint8)
    n_lines = int(np.count_nonzero(raw == 10))  # 2-3x faster than bytes.count
    if n_lines != df.height or int(np.count_nonzero(raw == ord(sep))) != n_lines * (len(names) - 1):
        return None
    return df


def _csv_chunks(path: str | Path, schema: Schema | None, fmt: str, report: ReadReport, sink: _BadRowSink,
                has_header: bool | None, block_bytes: int,
                usecols: list[str] | None) -> Iterator[pl.DataFrame]:
    sep = _separator(fmt)
    names, header = _csv_layout(path, schema, sep, has_header)
    # numbers are parsed as numbers on the fast path (a label too: casting its strings later costs more);
    # a block where one does not parse goes to the careful path, which reports the row
    num_fields = ({f.name for f in schema.fields if f.kind == "numeric"} | set(schema.label_columns)
                  if schema else set())
    dtypes: dict[str, pl.DataType] = {n: (pl.Float64() if n in num_fields else pl.String()) for n in names}
    proj = [names.index(c) for c in usecols] if usecols else None
    line_no = 2 if header else 1
    with _open_binary(path) as fh:
        if header:
            fh.readline()
        for block in _byte_blocks(fh, block_bytes):
            quoted = sep == "," and b'"' in block
            df = None if quoted else _parse_block_fast(block, names, sep, dtypes, proj)
            if df is not None:
                n_lines = df.height
                # one contiguous chunk per column: later selects, hashes and joins are ~3x cheaper
                df = df.rechunk().with_columns(pl.int_range(line_no, line_no + df.height, dtype=pl.Int64)
                                               .alias("_line"))
            else:
                n_lines = block.count(b"\n")
                df = _parse_block_careful(block, names, sep, line_no, report, sink)
                if usecols:
                    df = df.select([*usecols, "_line"])
            line_no += n_lines
            yield df


# --- libFM / libSVM ----------------------------------------------------------------------------------
def _libfm_chunks(path: str | Path, schema: Schema, report: ReadReport, sink: _BadRowSink,
                  block_bytes: int) -> Iterator[pl.DataFrame]:
    """``label idx:val idx:val ...``: the k-th token belongs to the k-th feature field of the schema."""
    names = [f.name for f in schema.fields]
    k = len(names)
    line_no = 1
    with _open_binary(path) as fh:
        for block in _byte_blocks(fh, block_bytes):
            n_lines = block.count(b"\n")
            lines = pl.Series("line", block.decode("utf-8", errors="replace").split("\n")[:n_lines])
            df = pl.DataFrame({"line": lines, "_line": np.arange(line_no, line_no + n_lines, dtype=np.int64)})
            line_no += n_lines
            df = df.with_columns(pl.col("line").str.strip_chars().str.split(" ").alias("tok"))
            ok = df["tok"].list.len() == k + 1
            if not ok.all():
                for row in df.filter(~ok).iter_rows(named=True):
                    if row["line"].strip() == "":
                        continue
                    reason = f"expected a label and {k} tokens, got {len(row['tok']) - 1}"
                    report.add_bad(row["_line"], reason)
                    sink.write(row["_line"], reason, row["line"])
                df = df.filter(ok)
            cols = [df["tok"].list.get(0).alias(schema.label)]
            for i, n in enumerate(names):
                cols.append(df["tok"].list.get(i + 1).str.split(":").list.get(0).alias(n))
            yield pl.DataFrame(cols).with_columns(df["_line"])


# --- public entry points ---------------------------------------------------------------------------
Source = str | Path | pl.DataFrame


def iter_chunks(source: Source, schema: Schema, *, fmt: str | None = None, has_header: bool | None = None,
                report: ReadReport | None = None, bad_rows: str | Path | None = None,
                with_label: bool = True, block_bytes: int = BLOCK_BYTES,
                chunk_rows: int = 500_000) -> Iterator[pl.DataFrame]:
    """Yield typed chunks (see module doc) of ``source``; bad rows are counted in ``report``.

    Each chunk also carries ``_line``, the 1-based line (or row) number in the source, for messages.
    """
    report = report if report is not None else ReadReport()
    report.source = report.source or (str(source) if not isinstance(source, pl.DataFrame) else "<frame>")
    sink = _BadRowSink(bad_rows)
    report.bad_rows_path = str(bad_rows) if bad_rows else None
    # rows read = good rows + every rejected row, whether the parser or the type checks rejected it
    base_rows, base_bad, good_rows = report.rows, report.bad_rows, 0
    try:
        for raw in _raw_chunks(source, schema, fmt, has_header, report, sink, with_label, block_bytes,
                               chunk_rows):
            good, bad = coerce_chunk(raw, schema, with_label)
            if bad.height:
                for row in bad.select("_line", "_reason").iter_rows():
                    report.add_bad(row[0], row[1])
                if sink.path is not None:
                    for row in bad.with_columns(pl.exclude("_line").cast(pl.String)).iter_rows(named=True):
                        line, reason = row.pop("_line"), row.pop("_reason")
                        sink.write(line, reason, "\t".join("" if v is None else v for v in row.values()))
            good_rows += good.height
            report.rows = base_rows + good_rows + report.bad_rows - base_bad
            if good.height:
                yield good
    finally:
        report.rows = base_rows + good_rows + report.bad_rows - base_bad
        sink.close()


def _raw_chunks(source: Source, schema: Schema, fmt: str | None, has_header: bool | None, report: ReadReport,
                sink: _BadRowSink, with_label: bool, block_bytes: int,
                chunk_rows: int) -> Iterator[pl.DataFrame]:
    if isinstance(source, pl.DataFrame):
        for start in range(0, max(source.height, 1), chunk_rows):
            part = source.slice(start, chunk_rows)
            yield part.with_columns(pl.int_range(start + 1, start + 1 + part.height, dtype=pl.Int64).alias("_line"))
        return
    fmt = fmt or detect_format(source)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(str(source))
        cols = needed_columns(schema, with_label)
        have = pf.schema_arrow.names
        absent = [c for c in cols if c not in have]
        if absent:
            raise DataError(f"{source}: missing columns {absent}; the file has {have}")
        start = 1
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=cols):
            df = pl.from_arrow(batch)
            assert isinstance(df, pl.DataFrame)
            yield df.with_columns(pl.int_range(start, start + df.height, dtype=pl.Int64).alias("_line"))
            start += df.height
        return
    if fmt == "libfm":
        yield from _libfm_chunks(source, schema, report, sink, block_bytes)
        return
    usecols = needed_columns(schema, with_label)
    names, _ = _csv_layout(source, schema, _separator(fmt), has_header)
    absent = [c for c in usecols if c not in names]
    if absent:
        raise DataError(f"{source}: missing columns {absent}; the file has {names}")
    yield from _csv_chunks(source, schema, fmt, report, sink, has_header, block_bytes, usecols)


_T = TypeVar("_T")
_DONE = object()


class Prefetch(Iterator[_T]):
    """``items`` produced in a background thread, ``depth`` ahead: reading overlaps the work on what was read.

    The thread starts at construction, not at the first ``next``: work done before the first item is asked for
    (finishing a fit, say) overlaps the reading too. Parsing and encoding run in polars / numpy, which release
    the GIL, so two cores stay busy. Errors raised by the producer are re-raised by ``next``; ``close`` (or
    leaving a ``with`` block) stops the producer.
    """

    def __init__(self, items: Iterable[_T], depth: int = 1) -> None:
        self._queue: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._finished = False
        self._worker = threading.Thread(target=self._produce, args=(items,), name="ctrkit-prefetch",
                                        daemon=True)
        self._worker.start()

    def _put(self, item: tuple[bool, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, items: Iterable[_T]) -> None:
        try:
            for item in items:
                if not self._put((True, item)):
                    return
            self._put((True, _DONE))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put((False, exc))

    def __next__(self) -> _T:
        if self._finished:
            raise StopIteration
        ok, item = self._queue.get()
        if not ok:
            self.close()
            raise item
        if item is _DONE:
            self.close()
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the producer and wait for it; later ``next`` calls end the iteration."""
        self._finished = True
        self._stop.set()
        if self._worker is not threading.current_thread():
            self._worker.join()

    def __enter__(self) -> Prefetch[_T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self._stop.set()


def read_frame(source: Source, schema: Schema, **kwargs: Any) -> tuple[pl.DataFrame, ReadReport]:
    """Read a whole (small) source into one typed frame, with its report."""
    report = ReadReport()
    chunks = list(iter_chunks(source, schema, report=report, **kwargs))
    if not chunks:
        raise DataError(f"{report.source}: no usable rows ({report.bad_rows} rejected)")
    return pl.concat(chunks), report


def read_sample(path: str | Path, n_rows: int = 100_000) -> pl.DataFrame:
    """The first ``n_rows`` rows of a file with a header, with types inferred (for schema inference)."""
    fmt = detect_format(path)
    if fmt == "parquet":
        return pl.read_parquet(path, n_rows=n_rows)
    if fmt == "libfm":
        raise SchemaError(f"{path}: libFM files have no column names; use --format libfm --fields a,b,...")
    with _open_binary(path) as fh:
        head = b"".join(_take_lines(fh, n_rows + 1))
    return pl.read_csv(io.BytesIO(head), separator=_separator(fmt), infer_schema_length=n_rows)


def _take_lines(fh: IO[bytes], n: int) -> Iterator[bytes]:
    for i, line in enumerate(fh):
        if i >= n:
            return
        yield line


def libfm_schema(field_names: list[str], label: str = "label") -> Schema:
    """The schema of a libFM file whose k-th token is field k (all categorical)."""
    if not field_names:
        raise SchemaError("--fields needs at least one name")
    return Schema(fields=[Field(name=n, kind="categorical") for n in field_names], label=label)
