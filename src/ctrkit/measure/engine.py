"""SQL engines for the measurement queries: one set of query definitions, two executors.

Every measurement in ``ctrkit.measure`` is written once as SQL text built by small Python functions that
take a :class:`Dialect`. The dialect covers the handful of places where DuckDB and Spark SQL spell
things differently (identifier quoting, epoch seconds, temp views); everything else is the common subset
of the two (CASE, window functions, LEFT JOIN, GROUP BY, aggregates). :class:`DuckDBEngine` runs the text
in-process over CSV/Parquet files, streaming and spilling to disk; :class:`SparkEngine` runs the very same
text through ``spark.sql``. Results come back as small pandas frames (aggregates, never raw logs).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd


class MeasureError(ValueError):
    """Input that the measurement cannot use; the message names the file, the column and what was expected."""


# Normalised column kinds, the only types the query builders reason about.
INT, FLOAT, STRING, TIMESTAMP, TIMESTAMPTZ, BOOL, OTHER = (
    "int", "float", "string", "timestamp", "timestamptz", "bool", "other")


@dataclass(frozen=True)
class Dialect:
    """The few spellings that differ between DuckDB and Spark SQL."""

    name: str

    def q(self, ident: str) -> str:
        """Quote an identifier."""
        if self.name == "spark":
            return "`" + ident.replace("`", "``") + "`"
        return '"' + ident.replace('"', '""') + '"'

    def epoch(self, expr: str, kind: str) -> str:
        """Seconds since 1970-01-01 UTC as DOUBLE, for a column of the given normalised kind."""
        if kind in (INT, FLOAT):
            return f"CAST({expr} AS DOUBLE)"
        if self.name == "spark":
            ts = expr if kind in (TIMESTAMP, TIMESTAMPTZ) else f"CAST({expr} AS TIMESTAMP)"
            return f"(CAST(unix_micros({ts}) AS DOUBLE) / 1000000.0)"
        if kind in (TIMESTAMP, TIMESTAMPTZ):
            return f"epoch({expr})"
        return f"epoch(CAST({expr} AS TIMESTAMPTZ))"

    def try_epoch(self, expr: str) -> str:
        """Like :meth:`epoch` for a string column, but NULL instead of an error where it does not parse."""
        if self.name == "spark":
            return f"(CAST(unix_micros(try_to_timestamp({expr})) AS DOUBLE) / 1000000.0)"
        return f"epoch(TRY_CAST({expr} AS TIMESTAMPTZ))"

    @property
    def has_bitmap(self) -> bool:
        """Whether :meth:`bitmap_distinct` is available (an exact distinct count of integers via a bitmap)."""
        return self.name == "duckdb"

    def bitmap_distinct(self, expr: str, lo: int, hi: int, source: str) -> str:
        """SQL for the exact number of distinct integer values of ``expr`` in [lo, hi] over ``source``."""
        if not self.has_bitmap:
            raise NotImplementedError(f"{self.name} has no bitmap aggregate")
        return (f"SELECT bit_count(bitstring_agg({expr}, {int(lo)}, {int(hi)})) AS n FROM {source} "
                f"WHERE {expr} IS NOT NULL")

    def temp_view(self, name: str, sql: str) -> str:
        """DDL for a temporary view."""
        return f"CREATE OR REPLACE TEMPORARY VIEW {self.q(name)} AS {sql}"


DUCKDB = Dialect("duckdb")
SPARK = Dialect("spark")


class Engine(Protocol):
    """What the measurement code needs from an executor."""

    dialect: Dialect

    def register(self, name: str, source: Any, *, what: str = "input") -> None:
        """Expose a file (CSV/Parquet, glob ok) or an in-memory frame as a view called ``name``."""

    def view(self, name: str, sql: str) -> None:
        """Define ``name`` as a lazy view over ``sql``."""

    def materialize(self, name: str, sql: str) -> None:
        """Compute ``sql`` once and keep it as ``name`` (used only for small intermediate results)."""

    def query(self, sql: str) -> pd.DataFrame:
        """Run ``sql`` and return the (small) result as pandas."""

    def columns(self, name: str) -> dict[str, str]:
        """Column name -> normalised kind (int, float, string, timestamp, timestamptz, bool, other)."""


def _kind_from_duckdb(t: str) -> str:
    t = t.upper()
    if t in ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
             "UBIGINT"):
        return INT
    if t in ("FLOAT", "DOUBLE", "REAL") or t.startswith("DECIMAL"):
        return FLOAT
    if t == "VARCHAR" or t.startswith("VARCHAR") or t == "ENUM" or t.startswith("ENUM"):
        return STRING
    if t == "TIMESTAMP WITH TIME ZONE":
        return TIMESTAMPTZ
    if t.startswith("TIMESTAMP") or t == "DATE":
        return TIMESTAMP
    if t == "BOOLEAN":
        return BOOL
    return OTHER


def _source_sql_duckdb(source: str | Path, what: str) -> str:
    """A DuckDB table function reading ``source`` (a file, a glob, or a folder of CSV/TSV/Parquet parts with
    Hive ``key=value`` folders, listed as training lists them); errors name the file."""
    from ctrkit.data.readers import DataError, data_parts, detect_format

    path = str(source)
    low = path.lower()
    if "*" not in path and not Path(path).exists():
        raise MeasureError(f"{what} file {path} does not exist")

    def quoted(p: str) -> str:
        return "'" + p.replace("'", "''") + "'"

    if Path(path).is_dir():
        try:
            parts, fmt = data_parts(path), detect_format(path)
        except DataError as exc:
            raise MeasureError(f"{what} file {exc}") from None
        files = "[" + ", ".join(quoted(str(p)) for p in parts) + "]"
        if fmt == "parquet":
            return f"read_parquet({files}, hive_partitioning = true, union_by_name = true)"
        sep = "\t" if fmt == "tsv" else ","
        return f"read_csv({files}, header = true, delim = '{sep}', hive_partitioning = true, union_by_name = true)"
    if low.endswith((".parquet", ".pq")):
        return f"read_parquet({quoted(path)})"
    if low.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".txt.gz")):
        return f"read_csv({quoted(path)}, header=true)"
    raise MeasureError(f"{what} file {path}: expected .csv, .csv.gz, .tsv or .parquet (or a folder of parts)")


class DuckDBEngine:
    """Runs the measurement SQL in-process with DuckDB: streaming scans, hash joins that spill to disk."""

    dialect = DUCKDB

    def __init__(self, threads: int | None = None, memory_limit: str | None = None,
                 temp_directory: str | None = None, database: str = ":memory:") -> None:
        import duckdb

        self.con = duckdb.connect(database)
        self.con.execute("SET preserve_insertion_order = false")
        self.con.execute("SET enable_progress_bar = false")
        if threads is not None:
            if threads < 1:
                raise MeasureError(f"--threads must be at least 1, got {threads}")
            self.con.execute(f"SET threads = {int(threads)}")
        if memory_limit:
            try:
                self.con.execute("SET memory_limit = ?", [memory_limit])
            except duckdb.Error as exc:
                raise MeasureError(f"--memory-limit {memory_limit!r} is not a size DuckDB reads, such as 3GB "
                                   f"({exc})") from None
        tmp = temp_directory or os.path.join(tempfile.gettempdir(), "ctrkit-duckdb-spill")
        self.con.execute(f"SET temp_directory = '{tmp}'")
        self._frames: dict[str, Any] = {}

    def register(self, name: str, source: Any, *, what: str = "input") -> None:
        """Expose a file or an in-memory frame (pandas, polars, arrow) as a view called ``name``."""
        if isinstance(source, (str, Path)):
            sql = f"SELECT * FROM {_source_sql_duckdb(source, what)}"
            try:
                self.con.execute(self.dialect.temp_view(name, sql))
                self.con.execute(f"SELECT * FROM {self.dialect.q(name)} LIMIT 0")
            except MeasureError:
                raise
            except Exception as exc:
                raise MeasureError(f"{what} file {source}: cannot be read ({exc})") from exc
            return
        frame = source
        if hasattr(frame, "to_arrow"):
            frame = frame.to_arrow()
        self._frames[name] = frame
        self.con.register(f"__frame_{name}", frame)
        self.con.execute(self.dialect.temp_view(name, f"SELECT * FROM {self.dialect.q('__frame_' + name)}"))

    def view(self, name: str, sql: str) -> None:
        """Define a lazy view."""
        self.con.execute(self.dialect.temp_view(name, sql))

    def materialize(self, name: str, sql: str) -> None:
        """Compute a small intermediate once as a temp table."""
        self.con.execute(f"CREATE OR REPLACE TEMP TABLE {self.dialect.q(name)} AS {sql}")

    def query(self, sql: str) -> pd.DataFrame:
        """Run a query, return pandas."""
        return self.con.execute(sql).df()

    def columns(self, name: str) -> dict[str, str]:
        """Column kinds of a view or table."""
        rows = self.con.execute(f"DESCRIBE SELECT * FROM {self.dialect.q(name)}").fetchall()
        return {r[0]: _kind_from_duckdb(str(r[1])) for r in rows}

    def close(self) -> None:
        """Release the connection."""
        self.con.close()


def _kind_from_spark(t: str) -> str:
    t = t.lower()
    if t in ("tinyint", "smallint", "int", "bigint", "byte", "short", "long", "integer"):
        return INT
    if t in ("float", "double") or t.startswith("decimal"):
        return FLOAT
    if t == "string" or t.startswith("varchar") or t.startswith("char"):
        return STRING
    if t in ("timestamp", "date"):
        return TIMESTAMPTZ if t == "timestamp" else TIMESTAMP
    if t == "timestamp_ntz":
        return TIMESTAMP
    if t == "boolean":
        return BOOL
    return OTHER


class SparkEngine:
    """Runs the same measurement SQL through Spark SQL (``pip install 'ctrkit[spark]'``, Java 17)."""

    dialect = SPARK

    def __init__(self, spark: Any = None, master: str = "local[2]") -> None:
        if spark is None:
            try:
                from pyspark.sql import SparkSession
            except ImportError as exc:
                raise MeasureError("--engine spark needs PySpark: pip install 'ctrkit[spark]'") from exc
            spark = (SparkSession.builder.master(master).appName("ctrkit-measure")
                     .config("spark.sql.session.timeZone", "UTC")
                     .config("spark.ui.enabled", "false")
                     .config("spark.sql.shuffle.partitions", "4")
                     .getOrCreate())
        self.spark = spark
        self._cached: dict[str, Any] = {}

    def register(self, name: str, source: Any, *, what: str = "input") -> None:
        """Expose a file or an in-memory frame as a temp view."""
        if isinstance(source, (str, Path)):
            path = str(source)
            if "*" not in path and not Path(path).exists():
                raise MeasureError(f"{what} file {path} does not exist")
            low = path.lower()
            if Path(path).is_dir():  # Spark reads a folder of parts itself: Hive folders, no _ or . files
                from ctrkit.data.readers import DataError, detect_format

                try:
                    low = "." + detect_format(path)
                except DataError as exc:
                    raise MeasureError(f"{what} file {exc}") from None
            try:
                if low.endswith(".parquet"):
                    df = self.spark.read.parquet(path)
                else:
                    sep = "\t" if ".tsv" in low else ","
                    df = self.spark.read.csv(path, header=True, inferSchema=True, sep=sep)
            except Exception as exc:
                raise MeasureError(f"{what} file {path}: cannot be read ({exc})") from exc
        else:
            frame = source
            if hasattr(frame, "to_pandas"):
                frame = frame.to_pandas()
            df = self.spark.createDataFrame(frame)
        df.createOrReplaceTempView(name)

    def view(self, name: str, sql: str) -> None:
        """Define a lazy temp view."""
        self.spark.sql(self.dialect.temp_view(name, sql))

    def materialize(self, name: str, sql: str) -> None:
        """Compute once and cache."""
        old = self._cached.pop(name, None)
        if old is not None:
            old.unpersist()
        df = self.spark.sql(sql).cache()
        df.count()
        df.createOrReplaceTempView(name)
        self._cached[name] = df

    def query(self, sql: str) -> pd.DataFrame:
        """Run a query, return pandas."""
        return self.spark.sql(sql).toPandas()

    def columns(self, name: str) -> dict[str, str]:
        """Column kinds of a temp view."""
        return {f.name: _kind_from_spark(f.dataType.simpleString()) for f in self.spark.table(name).schema.fields}

    def close(self) -> None:
        """Drop cached intermediates (the session is left to its owner)."""
        for df in self._cached.values():
            df.unpersist()
        self._cached.clear()


def make_engine(name: str = "duckdb", **kwargs: Any) -> Engine:
    """An engine by name: ``duckdb`` (default) or ``spark``."""
    if name == "duckdb":
        return DuckDBEngine(**kwargs)
    if name == "spark":
        return SparkEngine(**kwargs)
    raise MeasureError(f"unknown engine {name!r}; expected 'duckdb' or 'spark'")
