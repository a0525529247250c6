"""Build a click log from MovieLens-100K: one row per rating, click = rating >= 4, with user and movie columns.

    python examples/movielens_clicklog.py /path/to/movielens_100k clicks.csv

Reads ``u.data`` (or ``u.data.gz``), ``u.user``, ``u.item`` and ``u.genre`` (the names of u.item's genre flag
columns, in order) from the folder and writes a CSV sorted by time:
user_id, item_id, timestamp (epoch seconds), age, gender, occupation, zip_code, release_year, genres (the movie's
genres joined by ``|``) and click. The rating itself is not written: it is the outcome.
"""

from __future__ import annotations

import argparse
import gzip
import io
from pathlib import Path

import polars as pl

def _table(path: Path, names: list[str], sep: str) -> pl.DataFrame:
    """A headerless MovieLens table (latin-1 text, gzipped or not), every column as text."""
    raw = path.read_bytes()
    text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("latin-1").encode()
    return pl.read_csv(io.BytesIO(text), separator=sep, has_header=False, new_columns=names, quote_char=None,
                       schema_overrides={n: pl.String for n in names})


def build(folder: Path) -> pl.DataFrame:
    """The click log of the MovieLens-100K files in ``folder``, sorted by timestamp (then user and item)."""
    data = folder / "u.data" if (folder / "u.data").exists() else folder / "u.data.gz"
    ratings = _table(data, ["user_id", "item_id", "rating", "timestamp"], "\t")
    users = _table(folder / "u.user", ["user_id", "age", "gender", "occupation", "zip_code"], "|")
    names = (_table(folder / "u.genre", ["genre", "index"], "|").drop_nulls()
             .sort(pl.col("index").cast(pl.Int64))["genre"].to_list())
    items = _table(folder / "u.item", ["item_id", "title", "release_date", "video_release_date", "url", *names],
                   "|")
    genres = pl.concat_str([pl.when(pl.col(g) == "1").then(pl.lit(g)) for g in names], separator="|",
                           ignore_nulls=True)
    items = items.select("item_id",
                         pl.col("release_date").str.slice(-4).cast(pl.Int64, strict=False).alias("release_year"),
                         genres.alias("genres"))
    log = (ratings.join(users, on="user_id", how="left").join(items, on="item_id", how="left")
           .with_columns((pl.col("rating").cast(pl.Int64) >= 4).cast(pl.Int8).alias("click"),
                         pl.col("timestamp").cast(pl.Int64), pl.col("age").cast(pl.Int64),
                         pl.col("user_id").cast(pl.Int64), pl.col("item_id").cast(pl.Int64)))
    return log.sort(["timestamp", "user_id", "item_id"]).select(
        "user_id", "item_id", "timestamp", "age", "gender", "occupation", "zip_code", "release_year", "genres",
        "click")


def main() -> None:
    """Command line: the MovieLens folder and the CSV to write."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("movielens", type=Path, help="folder with u.data(.gz), u.user, u.item and u.genre")
    ap.add_argument("out", type=Path, help="CSV file to write")
    args = ap.parse_args()
    log = build(args.movielens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log.write_csv(args.out)
    print(f"{log.height:,} rows, {log['click'].mean():.3f} clicks -> {args.out}")


if __name__ == "__main__":
    main()
