"""Readers: CSV/TSV (header or not), Parquet, libFM/libSVM, a folder of such parts and in-memory frames,
``.gz`` transparently.

Every reader yields chunks as polars DataFrames with the columns a schema needs, typed the same way:
categorical fields as String, numeric fields as Float64, the label as Float32 in {0, 1}, the group as String
and the time as Int64 (epoch microseconds, or the raw number). Files are read in line-aligned byte blocks, so
a file larger than memory streams. Rows that cannot be parsed (wrong number of fields, a non-number in a
numeric column, a bad label) are never dropped silently: they are counted in a :class:`ReadReport`, kept
aside in a file when asked, and the good rows go on.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import io
import itertools
import queue
import threading
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv

from ctrkit.schema import Field, Schema, SchemaError
from ctrkit.validate import DataError, coerce_chunk, needed_columns

__all__ = ["DataError", "ReadReport", "Prefetch", "coerce_chunk", "detect_format", "has_header_line",
           "data_parts", "dataset_root", "iter_chunks", "libfm_schema", "needed_columns", "read_frame", "read_sample",
           "would_read"]

# Blocks under glibc's 32 MiB mmap ceiling are recycled from the heap instead of being mapped (and
# page-faulted) afresh each time, which halves the cost of reading them; larger blocks make fitting cheaper.
BLOCK_BYTES = 24 << 20
FORMATS = ("csv", "tsv", "parquet", "libfm")


@dataclass
class ReadReport:
    """What a reader saw: rows read, rows rejected (counted by reason, the first few with their line) and
    where they went."""

    source: str = ""
    rows: int = 0
    bad_rows: int = 0
    examples: list[str] = field(default_factory=list)
    bad_rows_path: str | None = None
    reasons: Counter[str] = field(default_factory=Counter)
    part: str | None = None  # the part being read when the source is a folder of parts; line numbers count in it

    @property
    def reading(self) -> str:
        """The file being read: the source, or the part of a folder."""
        return f"{self.source.rstrip('/')}/{self.part}" if self.part else self.source

    def add_bad(self, line_no: int | None, reason: str) -> None:
        """Count one rejected row under its reason and keep it as an example while fewer than five are kept."""
        self.bad_rows += 1
        self.reasons[reason] += 1
        if len(self.examples) < 5:
            where = f"line {line_no}" if line_no is not None else "row"
            self.examples.append(f"{self.reading} {where}: {reason}")

    def top_reasons(self, n: int = 3) -> str:
        """The ``n`` commonest reasons with their counts, e.g. ``7 x field 'price': not a number``."""
        return "; ".join(f"{c:,} x {r}" for r, c in self.reasons.most_common(n))

    def summary(self) -> str:
        """One line for logs and the CLI: rows read and rejected, the top reasons, the first bad line."""
        s = f"{self.source}: {self.rows:,} rows read, {self.bad_rows:,} rejected"
        if self.bad_rows:
            first = self.examples[0].removeprefix(self.source.rstrip("/")).lstrip("/ ").split(":", 1)[0]
            s += f" ({self.top_reasons()}; first at {first})"
        if self.bad_rows_path and self.bad_rows:
            s += f", kept in {self.bad_rows_path}"
        return s

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"source": self.source, "rows": self.rows, "bad_rows": self.bad_rows,
                "reasons": dict(self.reasons.most_common()), "examples": self.examples,
                "bad_rows_path": self.bad_rows_path}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReadReport:
        """The report :meth:`to_dict` wrote."""
        return cls(source=data["source"], rows=data["rows"], bad_rows=data["bad_rows"],
                   examples=list(data["examples"]), bad_rows_path=data["bad_rows_path"],
                   reasons=Counter(data.get("reasons", {})))


class _BadRowSink:
    """Writes rejected rows as read (the original line of a text file), each with its line number and reason,
    to a tab-separated file with a header line (created on first use). A row of a folder of parts has
    ``part/file.csv:N`` for its line."""

    HEADER = "line\treason\toriginal\n"

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self.part: str | None = None  # as ReadReport.part
        self._fh: IO[str] | None = None

    def write(self, line_no: int | None, reason: str, text: str) -> None:
        if self.path is None:
            return
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "w", encoding="utf-8")
            self._fh.write(self.HEADER)
        line = "" if line_no is None else f"{self.part}:{line_no}" if self.part else str(line_no)
        self._fh.write(f"{line}\t{reason}\t{text}\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# --- format detection -------------------------------------------------------------------------------
def detect_format(path: str | Path) -> str:
    """csv, tsv, parquet or libfm from the file name; a plain ``.txt`` is sniffed from its first line; a folder
    has the format of its parts."""
    if dataset_root(path) is not None:
        return _part_format(data_parts(path)[0]) or "csv"  # data_parts keeps only files with a format
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


def _existing_file(path: str | Path) -> Path:
    """``path`` when it is a file; a FileNotFoundError when nothing is there, a DataError for a folder."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if p.is_dir():
        raise DataError(f"{p} is a folder; give one file (CSV, TSV, Parquet or libFM, .gz or not) or a folder of "
                        "CSV, TSV or Parquet parts")
    return p


PART_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv"}


def _part_format(path: Path) -> str | None:
    """The format a part's name gives (``.csv.gz`` is csv), or None for a file that is not a part."""
    name = path.name.lower().removesuffix(".gz")
    return PART_SUFFIXES.get(name[name.rfind("."):]) if "." in name else None


def _is_pattern(path: str | Path) -> bool:
    return glob.has_magic(str(path)) and not Path(path).exists()


def dataset_root(path: str | Path) -> Path | None:
    """The folder a dataset of several parts lives in: ``path`` itself for a folder, the folder before the first
    wildcard for a glob pattern (``logs/day=2026-01-0*``: ``logs``); None for one file."""
    p = Path(path)
    if _is_pattern(p):
        plain = list(itertools.takewhile(lambda s: not glob.has_magic(s), p.parts[:-1]))
        return Path(*plain) if plain else Path(".")
    return p if p.is_dir() else None


def would_read(source: str | Path, path: str | Path) -> bool:
    """Whether a later read of the folder or pattern ``source`` could take a file written at ``path`` for one of its
    parts: ``path`` lies inside the folder, or it or a folder above it matches the pattern."""
    root = dataset_root(source)
    if root is None:
        return False
    target = Path(path).resolve()
    if not _is_pattern(source):
        return root.resolve() in target.parents
    pattern = str(Path(source).resolve())
    return any(fnmatch.fnmatchcase(str(p), pattern) for p in (target, *target.parents))


def data_parts(path: str | Path) -> list[Path]:
    """The files of a dataset: ``path`` itself when a file; for a folder (as Spark, DuckDB or Hive write one),
    every CSV, TSV or Parquet file below it (``.gz`` or not) in path order, leaving out hidden and
    ``_``-prefixed entries (``_SUCCESS``, ``_temporary/``, ``.crc`` files); for a glob pattern (``**`` too), the
    files it matches and the parts of the folders it matches. The parts must share one format."""
    p = Path(path)
    root = dataset_root(p)
    if root is None:
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or folder")
        return [p]
    found = [Path(m) for m in glob.glob(str(p), recursive=True)] if _is_pattern(p) else [p]
    parts = sorted({f for m in found for f in ([m] if m.is_file() else m.rglob("*")) if _part_format(f)
                    and f.is_file() and not any(s.startswith((".", "_")) for s in f.relative_to(root).parts)})
    if not parts:
        what = "matches" if _is_pattern(p) else "is a folder with"
        raise DataError(f"{p} {what} no data files (*.parquet, *.csv, *.tsv, .gz or not)")
    formats = sorted({_part_format(f) or "" for f in parts})
    if len(formats) > 1:
        first = {fmt: next(f for f in parts if _part_format(f) == fmt).relative_to(root).as_posix()
                 for fmt in formats}
        raise DataError(f"{p} holds parts of several formats ({', '.join(f'{k}: {v}' for k, v in first.items())}); "
                        "a folder is read as one dataset of one format")
    return parts


def _hive_values(root: Path, part: Path) -> dict[str, str]:
    """The ``key=value`` folders between ``root`` and ``part`` (Hive partitioning), as strings."""
    pairs = (s.split("=", 1) for s in part.relative_to(root).parts[:-1] if "=" in s)
    return {k: v for k, v in pairs if k}


def _open_binary(path: str | Path) -> IO[bytes]:
    p = _existing_file(path)
    with open(p, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(p, "rb") if magic == b"\x1f\x8b" else open(p, "rb")


def _first_line(path: str | Path) -> str:
    with _open_binary(path) as fh:
        try:
            line = fh.readline()
        except (EOFError, OSError, zlib.error) as exc:
            raise DataError(_gzip_message(path, exc)) from None
    return line.decode("utf-8", errors="replace").removeprefix("\ufeff").rstrip("\r\n")


def _gzip_message(path: str | Path, exc: BaseException) -> str:
    return f"{path}: the compressed file is damaged or cut short ({exc or type(exc).__name__})"


def _separator(fmt: str) -> str:
    return "\t" if fmt == "tsv" else ","


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
    if not first.strip():
        with _open_binary(path) as fh:
            if not fh.read(1 << 16).strip():
                raise DataError(f"{path}: the file is empty")
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
    dup = sorted({t for t in tokens if tokens.count(t) > 1})
    if dup:
        raise DataError(f"{path}: line 1 names the column(s) {dup} more than once")
    return tokens, True


def _parse_block_careful(block: bytes, names: list[str], sep: str, first_line_no: int,
                         report: ReadReport, sink: _BadRowSink) -> pl.DataFrame:
    """Slow path: pyarrow with a handler that sets aside rows with a wrong number of fields (and lines that are
    not UTF-8 text)."""
    try:
        block.decode("utf-8")
        stray_cr = b"\r" in block.replace(b"\r\n", b"")
    except UnicodeDecodeError:
        stray_cr = True
    if stray_cr:  # pyarrow would split a line at a lone carriage return; such lines are set aside whole
        lines = block.split(b"\n")
        for i, line in enumerate(lines[:-1]):
            try:
                line.decode("utf-8")
                reason = "a carriage return inside the line" if b"\r" in line.removesuffix(b"\r") else None
            except UnicodeDecodeError:
                reason = "not UTF-8 text"
            if reason:
                report.add_bad(first_line_no + i, reason)
                sink.write(first_line_no + i, reason, line.decode("utf-8", errors="replace"))
                lines[i] = b""
        block = b"\n".join(lines)
    bad_idx: list[tuple[int, str]] = []

    def handler(row: Any) -> str:
        bad_idx.append((row.number, row.text))
        return "skip"

    table = pacsv.read_csv(
        pa.py_buffer(block),
        read_options=pacsv.ReadOptions(column_names=names, use_threads=False),
        parse_options=pacsv.ParseOptions(delimiter=sep, quote_char='"' if sep == "," else False,
                                         invalid_row_handler=handler, newlines_in_values=False),
        # only an empty field is missing, as on the fast path: pyarrow would also read "nan", "NA", "null" as null
        convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, null_values=[""],
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


TextOf = Callable[[list[int]], list[str]]


def _block_text(block: bytes, first_line_no: int) -> TextOf:
    """The original text of lines of ``block`` by their line number in the file (split only when asked)."""
    def text_of(line_nos: list[int]) -> list[str]:
        lines = block.split(b"\n")
        return [lines[n - first_line_no].decode("utf-8", errors="replace").rstrip("\r") for n in line_nos]
    return text_of


def _csv_chunks(path: str | Path, schema: Schema | None, fmt: str, report: ReadReport, sink: _BadRowSink,
                has_header: bool | None, block_bytes: int,
                usecols: list[str] | None) -> Iterator[tuple[pl.DataFrame, TextOf]]:
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
            yield df, _block_text(block, line_no)
            line_no += n_lines


# --- libFM / libSVM ----------------------------------------------------------------------------------
def _libfm_chunks(path: str | Path, schema: Schema, report: ReadReport, sink: _BadRowSink,
                  block_bytes: int) -> Iterator[tuple[pl.DataFrame, TextOf]]:
    """``label idx:val idx:val ...``: the k-th token belongs to the k-th feature field of the schema."""
    names = [f.name for f in schema.fields]
    k = len(names)
    line_no = 1
    with _open_binary(path) as fh:
        for block in _byte_blocks(fh, block_bytes):
            n_lines = block.count(b"\n")
            lines = pl.Series("line", block.decode("utf-8", errors="replace").split("\n")[:n_lines])
            df = pl.DataFrame({"line": lines, "_line": np.arange(line_no, line_no + n_lines, dtype=np.int64)})
            text_of = _block_text(block, line_no)
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
            yield pl.DataFrame(cols).with_columns(df["_line"]), text_of


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
    if bad_rows and not isinstance(source, pl.DataFrame):
        if Path(bad_rows).resolve() == Path(source).resolve():
            raise DataError(f"--bad-rows {bad_rows} is the file being read: the first rejected row would empty it")
        if would_read(source, bad_rows):
            raise DataError(f"--bad-rows {bad_rows} is inside {dataset_root(source)}, the folder being read: a later "
                            "read of it would take the rejected rows for a part; keep them elsewhere")
    sink = _BadRowSink(bad_rows)
    report.bad_rows_path = str(bad_rows) if bad_rows else None
    # rows read = good rows + every rejected row, whether the parser or the type checks rejected it
    base_rows, base_bad, good_rows = report.rows, report.bad_rows, 0
    try:
        for raw, text_of in _raw_chunks(source, schema, fmt, has_header, report, sink, with_label, block_bytes,
                                        chunk_rows):
            good, bad = coerce_chunk(raw, schema, with_label)
            if bad.height:
                lines, reasons = bad["_line"].to_list(), bad["_reason"].to_list()
                for line, reason in zip(lines, reasons):
                    report.add_bad(line, reason)
                if sink.path is not None:
                    for line, reason, text in zip(lines, reasons, (text_of or _row_text(raw))(lines)):
                        sink.write(line, reason, text)
            good_rows += good.height
            report.rows = base_rows + good_rows + report.bad_rows - base_bad
            if good.height:
                yield good
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(_gzip_message(report.reading, exc)) from None
    except pa.ArrowException as exc:
        raise DataError(f"{report.reading}: cannot be read as {fmt or detect_format(report.reading)}: {exc}") \
            from None
    finally:
        report.part = sink.part = None
        report.rows = base_rows + good_rows + report.bad_rows - base_bad
        sink.close()


def _row_text(raw: pl.DataFrame) -> TextOf:
    """Rows of a frame or Parquet chunk as read (tab-separated values), by their row number."""
    def text_of(line_nos: list[int]) -> list[str]:
        rows = raw.filter(pl.col("_line").is_in(line_nos)).with_columns(pl.exclude("_line").cast(pl.String))
        by_line = {r.pop("_line"): "\t".join("" if v is None else v for v in r.values())
                   for r in rows.iter_rows(named=True)}
        return [by_line[n] for n in line_nos]
    return text_of


def _raw_chunks(source: Source, schema: Schema, fmt: str | None, has_header: bool | None, report: ReadReport,
                sink: _BadRowSink, with_label: bool, block_bytes: int,
                chunk_rows: int) -> Iterator[tuple[pl.DataFrame, TextOf | None]]:
    """Untyped chunks with ``_line``, and how to get a row's text back by its line (None: from the chunk)."""
    usecols = needed_columns(schema, with_label)
    if isinstance(source, pl.DataFrame):
        for start in range(0, max(source.height, 1), chunk_rows):
            part = source.slice(start, chunk_rows)
            yield part.with_columns(pl.int_range(start + 1, start + 1 + part.height, dtype=pl.Int64)
                                    .alias("_line")), None
        return
    root = dataset_root(source)
    if root is None:
        yield from _file_chunks(Path(source), schema, fmt, has_header, report, sink, block_bytes, chunk_rows,
                                usecols)
        return
    for file in data_parts(source):
        report.part = sink.part = file.relative_to(root).as_posix()
        hive = {k: v for k, v in _hive_values(root, file).items() if k in usecols}
        for df, text_of in _file_chunks(file, schema, fmt, has_header, report, sink, block_bytes, chunk_rows,
                                        [c for c in usecols if c not in hive]):
            yield df.with_columns(pl.lit(v, pl.String).alias(k) for k, v in hive.items()), text_of
    report.part = sink.part = None


def _file_chunks(path: Path, schema: Schema, fmt: str | None, has_header: bool | None, report: ReadReport,
                 sink: _BadRowSink, block_bytes: int, chunk_rows: int,
                 usecols: list[str]) -> Iterator[tuple[pl.DataFrame, TextOf | None]]:
    """:func:`_raw_chunks` of one file, reading the columns ``usecols``."""
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(str(_existing_file(path)))
        have = pf.schema_arrow.names
        absent = [c for c in usecols if c not in have]
        if absent:
            raise DataError(f"{path}: missing columns {absent}; the file has {have}")
        start = 1
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=usecols):
            df = pl.from_arrow(batch)
            assert isinstance(df, pl.DataFrame)
            yield df.with_columns(pl.int_range(start, start + df.height, dtype=pl.Int64).alias("_line")), None
            start += df.height
        return
    if fmt == "libfm":
        yield from _libfm_chunks(path, schema, report, sink, block_bytes)
        return
    names, _ = _csv_layout(path, schema, _separator(fmt), has_header)
    absent = [c for c in usecols if c not in names]
    if absent:
        raise DataError(f"{path}: missing columns {absent}; the file has {names}")
    yield from _csv_chunks(path, schema, fmt, report, sink, has_header, block_bytes, usecols)


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
    """The first ``n_rows`` rows of a file, with types inferred (for schema inference).

    A text file whose first line holds data rather than names (a raw Criteo TSV, see :func:`has_header_line`)
    gets the columns ``c1..cN``.
    """
    fmt = detect_format(path)
    try:
        if dataset_root(path) is not None:
            return _sample_parts(path, n_rows)
        if fmt == "parquet":
            return pl.read_parquet(_existing_file(path), n_rows=n_rows)
        if fmt == "libfm":
            raise SchemaError(f"{path}: libFM files have no column names; use --format libfm --fields a,b,...")
        with _open_binary(path) as fh:
            head = b"".join(_take_lines(fh, n_rows + 1))
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(_gzip_message(path, exc)) from None
    except (pa.ArrowException, OSError, pl.exceptions.PolarsError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise DataError(f"{path}: cannot be read as {fmt}: {exc}") from None
    if not head.strip():
        raise DataError(f"{path}: the file is empty")
    if b"\x00" in head[:65536]:
        raise DataError(f"{path}: this is not a text (CSV/TSV) file; binary data found in its first bytes")
    sep = _separator(fmt)
    header = has_header_line(path, sep)
    try:
        df = pl.read_csv(io.BytesIO(head), separator=sep, infer_schema_length=n_rows, has_header=header,
                         quote_char='"' if sep == "," else None, encoding="utf8-lossy")
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"{path}: cannot be read as {fmt}: {str(exc).splitlines()[0]}") from None
    if header:
        _csv_layout(path, None, sep, True)  # names each column once
    else:
        df.columns = [f"c{i + 1}" for i in range(df.width)]
    return df


def _sample_parts(path: str | Path, n_rows: int) -> pl.DataFrame:
    """:func:`read_sample` of a folder or pattern: its first parts up to ``n_rows`` rows, with the Hive folder
    columns."""
    root = dataset_root(path)
    assert root is not None
    frames: list[pl.DataFrame] = []
    for file in data_parts(path):
        hive = _hive_values(root, file)
        df = read_sample(file, n_rows - sum(f.height for f in frames))
        frames.append(df.with_columns(pl.lit(v, pl.String).alias(k) for k, v in hive.items() if k not in df.columns))
        if sum(f.height for f in frames) >= n_rows:
            break
    return pl.concat(frames, how="diagonal_relaxed")


def has_header_line(path: str | Path, sep: str) -> bool:
    """Whether the first line of a text file (of the first part of a folder) names columns: every token non-empty
    and none a number."""
    tokens = [t.strip().strip('"') for t in _first_line(data_parts(path)[0]).split(sep)]
    for t in tokens:
        if not t:
            return False
        try:
            float(t)
            return False
        except ValueError:
            continue
    return True


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
