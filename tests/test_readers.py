"""Readers: every format yields the same typed chunks, and no row is lost without being counted."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ctrkit.data.readers import (DataError, Prefetch, ReadReport, coerce_chunk, data_parts, dataset_root,
                                 detect_format, iter_chunks, libfm_schema, read_frame, read_sample, would_read)
from ctrkit.schema import Field, Schema

CRITEO_COLUMNS = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]

SCHEMA = Schema(fields=[Field("city"), Field("price", kind="numeric")], label="click")
GOOD = [("paris", "1.5", "1"), ("rome", "", "0"), ("", "3", "1"), ("oslo", "4", "0")]


def _write(path: Path, rows: list[tuple[str, ...]], sep: str = ",", header: bool = True, gz: bool = False,
           raw_lines: list[str] | None = None) -> Path:
    lines = ([sep.join(("city", "price", "click"))] if header else []) + [sep.join(r) for r in rows]
    lines += raw_lines or []
    data = ("\n".join(lines) + "\n").encode()
    if gz:
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def _criteo_schema() -> Schema:
    return Schema(fields=[Field(f"I{i}", kind="numeric") for i in range(1, 14)]
                  + [Field(f"C{i}", min_count=2) for i in range(1, 27)], label="label", columns=CRITEO_COLUMNS)


def test_detect_format(tmp_path):
    assert detect_format("a.csv") == "csv" and detect_format("a.tsv.gz") == "tsv"
    assert detect_format("a.parquet") == "parquet" and detect_format("x.libfm") == "libfm"
    txt = tmp_path / "x.txt"
    txt.write_text("1 3:1 7:1\n")
    assert detect_format(txt) == "libfm"
    txt.write_text("a\tb\n")
    assert detect_format(txt) == "tsv"


@pytest.mark.parametrize("sep, name", [(",", "d.csv"), ("\t", "d.tsv")])
def test_csv_tsv_with_header_types_and_missing(tmp_path, sep, name):
    df, rep = read_frame(_write(tmp_path / name, GOOD, sep=sep), SCHEMA)
    assert df.schema["city"] == pl.String and df.schema["price"] == pl.Float64 and df.schema["click"] == pl.Float32
    assert df["city"].to_list() == ["paris", "rome", None, "oslo"]
    assert df["price"].to_list() == [1.5, None, 3.0, 4.0]
    assert df["click"].to_list() == [1.0, 0.0, 1.0, 0.0]
    assert df["_line"].to_list() == [2, 3, 4, 5]
    assert (rep.rows, rep.bad_rows) == (4, 0)


def test_gz_is_transparent(tmp_path):
    plain, _ = read_frame(_write(tmp_path / "d.csv", GOOD), SCHEMA)
    gz, _ = read_frame(_write(tmp_path / "d.csv.gz", GOOD, gz=True), SCHEMA)
    assert plain.equals(gz)


def test_headerless_needs_columns(tmp_path):
    path = _write(tmp_path / "d.tsv", GOOD, sep="\t", header=False)
    with_cols = Schema(fields=SCHEMA.fields, label="click", columns=["city", "price", "click"])
    df, rep = read_frame(path, with_cols)
    assert df.height == 4 and df["_line"].to_list() == [1, 2, 3, 4]
    with pytest.raises(DataError, match="columns"):
        read_frame(path, SCHEMA, has_header=False)


def test_raw_criteo_layout(tmp_path):
    """Raw Criteo lines: no header, label, 13 counts, 26 hex tokens, empty fields for missing values."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(409):
        ints = ["" if rng.random() < 0.2 else str(int(rng.integers(-2, 500))) for _ in range(13)]
        cats = ["" if rng.random() < 0.1 else f"{int(rng.integers(0, 2**32)):08x}" for _ in range(26)]
        lines.append("\t".join([str(i % 2)] + ints + cats))
    lines[0] = "\t".join(["0", "", "-1", ""] + ["5"] * 10 + ["8cf07265"] + [""] * 17 + ["00ab01cd"] + [""] * 7)
    path = tmp_path / "train.tsv.gz"
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    df, rep = read_frame(path, _criteo_schema())
    assert (rep.rows, rep.bad_rows, df.height) == (409, 0, 409)
    assert df["label"].to_list()[:2] == [0.0, 1.0]
    assert df["I1"][0] is None and df["I2"][0] == -1.0 and df["I3"][0] is None
    assert df["C1"][0] == "8cf07265" and df["C2"][0] is None and df["C19"][0] == "00ab01cd"


def test_parquet_matches_csv(tmp_path):
    csv, _ = read_frame(_write(tmp_path / "d.csv", GOOD), SCHEMA)
    pq = tmp_path / "d.parquet"
    pl.DataFrame({"city": ["paris", "rome", None, "oslo"], "price": [1.5, None, 3.0, 4.0], "click": [1, 0, 1, 0],
                  "unused": [0, 0, 0, 0]}).write_parquet(pq)
    df, rep = read_frame(pq, SCHEMA)
    assert df.equals(csv.with_columns(pl.int_range(1, 5, dtype=pl.Int64).alias("_line")))
    assert rep.rows == 4


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("labels", [("1", "-1"), ("1", "0")])
def test_libfm(tmp_path, newline, labels):
    pos, neg = labels
    path = tmp_path / "f.libfm"
    path.write_bytes(newline.join([f"{pos} 3:1 10:1", f"{neg} 4:1 11:1", f"{neg} 3:1 12:1"]).encode() + newline.encode())
    df, rep = read_frame(path, libfm_schema(["user", "item"]))
    assert df["label"].to_list() == [1.0, 0.0, 0.0]
    assert df["user"].to_list() == ["3", "4", "3"]
    assert df["item"].to_list() == ["10", "11", "12"]
    assert (rep.rows, rep.bad_rows) == (3, 0)


BAD_CSV = [
    ("paris,1,1,extra", "expected 3 fields"),
    ("rome,2", "expected 3 fields"),
    ("oslo,abc,1", "'price': not a number"),
    ("oslo,2,2", "label 'click'"),
    ("oslo,2,", "label 'click'"),
    ("oslo,2,yes", "label 'click'"),
]


@pytest.mark.parametrize("sep, gz", [(",", False), ("\t", False), (",", True)])
@pytest.mark.parametrize("bad, reason", BAD_CSV)
def test_bad_rows_are_counted_and_kept_aside(tmp_path, sep, gz, bad, reason):
    name = "d.csv" if sep == "," else "d.tsv"
    path = _write(tmp_path / (name + (".gz" if gz else "")), GOOD[:2], sep=sep, gz=gz,
                  raw_lines=[bad.replace(",", sep)] + [sep.join(r) for r in GOOD[2:]])
    aside = tmp_path / "bad.tsv"
    report = ReadReport()
    good = pl.concat(list(iter_chunks(path, SCHEMA, report=report, bad_rows=aside)))
    assert good.height == 4 and report.bad_rows == 1
    assert report.rows == good.height + report.bad_rows
    assert reason in report.examples[0] and "line 4" in report.examples[0]
    written = aside.read_text().splitlines()
    assert written[0] == "line\treason\toriginal" and len(written) == 2
    line_no, why, text = written[1].split("\t", 2)
    assert line_no == "4" and reason in why and text == bad.replace(",", sep)
    assert good["_line"].to_list() == [2, 3, 5, 6]


@pytest.mark.parametrize("sep", [",", "\t"])
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_bad_rows_after_blank_lines_name_their_own_line(tmp_path, newline, sep):
    lines = ["city,price,click", "paris,1,0", "", "rome,2,1", "oslo,3", "nice,zz,1", "lyon,4,0", "", "", "pisa,5,1"]
    path = tmp_path / ("blank.csv" if sep == "," else "blank.tsv")
    path.write_bytes(newline.join(line.replace(",", sep) for line in lines).encode() + newline.encode())
    aside = tmp_path / "bad.tsv"
    report = ReadReport()
    good = pl.concat(list(iter_chunks(path, SCHEMA, report=report, bad_rows=aside)))
    assert good["city"].to_list() == ["paris", "rome", "lyon", "pisa"]
    assert good["_line"].to_list() == [2, 4, 7, 10]
    assert "line 5: expected 3 fields" in report.examples[0] and "line 6: field 'price'" in report.examples[1]
    assert [row.split("\t")[0] for row in aside.read_text().splitlines()] == ["line", "5", "6"]


@pytest.mark.parametrize("sep", [",", "\t"])
@pytest.mark.parametrize("extra", ["", "\x01"])
def test_a_short_row_is_caught_beside_a_blank_line_or_a_control_byte(tmp_path, sep, extra):
    # one line end or control byte too many and one separator too few: in a sum of the counts they cancel
    lines = ["city,price,click", f"paris{extra},1,0", "" if not extra else "rome,2,1", "oslo,3", "lyon,4,0"]
    path = tmp_path / ("d.csv" if sep == "," else "d.tsv")
    path.write_bytes(("\n".join(line.replace(",", sep) for line in lines) + "\n").encode())
    report = ReadReport()
    good = pl.concat(list(iter_chunks(path, SCHEMA, report=report)))
    assert report.bad_rows == 1 and "line 4: expected 3 fields" in report.examples[0]
    assert good["_line"].to_list() == ([2, 5] if not extra else [2, 3, 5])


def test_control_bytes_in_a_tsv_value_are_kept(tmp_path):
    path = tmp_path / "ctl.tsv"
    path.write_bytes(b"city\tprice\tclick\nparis\x01\t1\t0\nro\x08me\t2\t1\n")
    good, report = read_frame(path, SCHEMA)
    assert good["city"].to_list() == ["paris\x01", "ro\x08me"] and good["_line"].to_list() == [2, 3]
    assert report.bad_rows == 0


def test_a_time_that_does_not_parse_makes_a_bad_row_and_an_empty_one_is_missing(tmp_path):
    schema = Schema(fields=[Field("city")], label="click", time="ts")
    path = tmp_path / "t.csv"
    path.write_text("city,ts,click\nparis,2024-01-02T03:04:05,1\nrome,,0\noslo,next tuesday,1\n"
                    "nice,2024-01-02T03:04:06 ,0\n")
    report = ReadReport()
    good = pl.concat(list(iter_chunks(path, schema, report=report)))
    assert good["city"].to_list() == ["paris", "rome", "nice"]
    # microseconds since the epoch, UTC; spaces around a time do not matter
    assert good["ts"].to_list() == [1704164645000000, None, 1704164646000000]
    assert report.bad_rows == 1 and "line 4: time 'ts': not a date and time" in report.examples[0]


def test_many_bad_rows_across_blocks(tmp_path):
    rows = []
    for i in range(3000):
        rows.append(f"c{i % 7},{i},{i % 2}" if i % 10 else f"c{i},{'x' if i % 20 else ''},{i % 2},9")
    path = tmp_path / "many.csv"
    path.write_text("city,price,click\n" + "\n".join(rows) + "\n")
    report = ReadReport()
    got = sum(c.height for c in iter_chunks(path, SCHEMA, report=report, block_bytes=4096))
    assert report.bad_rows == 300 and got == 2700 and report.rows == 3000


def test_libfm_bad_rows(tmp_path):
    path = tmp_path / "f.libfm"
    path.write_text("1 3:1 10:1\n0 4:1\nabc 3:1 12:1\n1 5:1 13:1 14:1\n0 6:1 15:1\n")
    aside = tmp_path / "bad.txt"
    report = ReadReport()
    df = pl.concat(list(iter_chunks(path, libfm_schema(["user", "item"]), report=report, bad_rows=aside)))
    assert df["user"].to_list() == ["3", "6"]
    assert report.bad_rows == 3 and report.rows == 5
    assert len(aside.read_text().splitlines()) == 4  # the header and three rows


def test_parquet_bad_rows(tmp_path):
    pq = tmp_path / "d.parquet"
    pl.DataFrame({"city": ["a", "b", "c", "d"], "price": ["1", "x", "2", "3"],
                  "click": [1, 0, 2, None]}).write_parquet(pq)
    report = ReadReport()
    df = pl.concat(list(iter_chunks(pq, SCHEMA, report=report)))
    assert df["city"].to_list() == ["a"]
    assert report.bad_rows == 3 and report.rows == 4


def _parts(root: Path) -> Path:
    """GOOD as a Hive-partitioned folder: Spark's markers and a hidden file beside the parts, read in path order."""
    frames = {"day=2026-01-03/part-0.parquet": GOOD[3:], "day=2026-01-01/part-0.parquet": GOOD[:2],
              "day=2026-01-01/part-1.pq": GOOD[2:3]}
    for name, rows in frames.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        pl.DataFrame({"city": [r[0] or None for r in rows], "price": [r[1] for r in rows],
                      "click": [int(r[2]) for r in rows]}).write_parquet(root / name)
    (root / "_SUCCESS").write_text("")
    (root / "day=2026-01-01" / ".part-0.parquet.crc").write_bytes(b"\0\1")
    (root / "_temporary" / "0").mkdir(parents=True)
    (root / "_temporary" / "0" / "part-9.parquet").write_bytes(b"half written")
    return root


def test_a_folder_of_data_parts_reads_as_one_file(tmp_path):
    """Parts in path order, each row numbered in its part; the Hive folder values are a column a schema can use."""
    root = _parts(tmp_path / "log")
    assert detect_format(root) == "parquet"
    assert [p.relative_to(root).as_posix() for p in data_parts(root)] == [
        "day=2026-01-01/part-0.parquet", "day=2026-01-01/part-1.pq", "day=2026-01-03/part-0.parquet"]
    csv, _ = read_frame(_write(tmp_path / "d.csv", GOOD), SCHEMA)
    df, rep = read_frame(root, SCHEMA)
    assert df.drop("_line").equals(csv.drop("_line"))
    assert df["_line"].to_list() == [1, 2, 1, 1] and rep.rows == 4 and rep.bad_rows == 0
    with_day = Schema(fields=[*SCHEMA.fields, Field("day")], label="click")
    days = read_frame(root, with_day)[0]["day"].to_list()
    assert days == ["2026-01-01", "2026-01-01", "2026-01-01", "2026-01-03"]
    sample = read_sample(root)
    assert sample.height == 4 and sample.columns == ["city", "price", "click", "day"]


def test_a_bad_row_of_a_part_names_the_part(tmp_path):
    root = _parts(tmp_path / "log")
    (root / "day=2026-01-02").mkdir()
    pl.DataFrame({"city": ["x", "y"], "price": ["2", "lots"], "click": [0, 1]}).write_parquet(
        root / "day=2026-01-02" / "part-1.parquet")
    report, aside = ReadReport(), tmp_path / "bad.tsv"
    df = pl.concat(list(iter_chunks(root, SCHEMA, report=report, bad_rows=aside)))
    assert df["city"].to_list() == ["paris", "rome", None, "x", "oslo"]
    assert report.rows == 6 and report.bad_rows == 1
    assert report.examples == [f"{root}/day=2026-01-02/part-1.parquet line 2: field 'price': not a number"]
    assert "first at day=2026-01-02/part-1.parquet line 2" in report.summary()
    assert aside.read_text().splitlines()[1].startswith("day=2026-01-02/part-1.parquet:2\t")


def test_a_folder_of_csv_parts_names_the_part_of_a_bad_line(tmp_path):
    """Spark's CSV output: a header in each part, gzip or not; a line of the wrong width is named in its part."""
    root = tmp_path / "log"
    (root / "day=2026-01-01").mkdir(parents=True)
    (root / "day=2026-01-02").mkdir()
    _write(root / "day=2026-01-01" / "part-0.csv.gz", GOOD[:2], gz=True)
    _write(root / "day=2026-01-02" / "part-0.csv", GOOD[2:])
    (root / "_SUCCESS").write_text("")
    assert detect_format(root) == "csv"
    assert read_sample(root).columns == ["city", "price", "click", "day"]
    _write(root / "day=2026-01-02" / "part-0.csv", GOOD[2:], raw_lines=["rome,1,0,extra"])
    report, aside = ReadReport(), tmp_path / "bad.tsv"
    with_day = Schema(fields=[*SCHEMA.fields, Field("day")], label="click")
    df = pl.concat(list(iter_chunks(root, with_day, report=report, bad_rows=aside)))
    assert df["city"].to_list() == ["paris", "rome", None, "oslo"] and df["_line"].to_list() == [2, 3, 2, 3]
    assert df["day"].to_list() == ["2026-01-01"] * 2 + ["2026-01-02"] * 2
    assert report.rows == 5 and report.bad_rows == 1 and report.examples[0].startswith(
        f"{root}/day=2026-01-02/part-0.csv line 4: ")
    assert aside.read_text().splitlines()[1] == f"day=2026-01-02/part-0.csv:4\t{report.examples[0].split(': ', 1)[1]}" \
        "\trome,1,0,extra"


def test_a_glob_pattern_reads_the_parts_it_matches(tmp_path, monkeypatch):
    """``logs/day=2026-01-0[13]`` takes two of the three days' folders, Hive columns named from ``logs``; a pattern of
    files and ``**`` work too; a pattern that matches nothing is named."""
    root = _parts(tmp_path / "log")
    (root / "day=2026-01-02").mkdir()
    pl.DataFrame({"city": ["x"], "price": [1.0], "click": [0]}).write_parquet(root / "day=2026-01-02" / "p.parquet")
    with_day = Schema(fields=[*SCHEMA.fields, Field("day")], label="click")
    pattern = root / "day=2026-01-0[13]"
    assert dataset_root(pattern) == root and dataset_root(root) == root and dataset_root(root / "x.csv") is None
    df, rep = read_frame(pattern, with_day)
    assert df["city"].to_list() == ["paris", "rome", None, "oslo"] and rep.rows == 4
    assert df["day"].to_list() == ["2026-01-01"] * 3 + ["2026-01-03"]
    assert [p.name for p in data_parts(root / "**" / "*.parquet")] == ["part-0.parquet", "p.parquet",
                                                                       "part-0.parquet"]
    assert detect_format(pattern) == "parquet" and read_sample(pattern).height == 4
    monkeypatch.chdir(root)
    assert dataset_root("day=*") == Path(".") and len(data_parts("day=*")) == 4
    with pytest.raises(DataError, match=r"day=2027-\* matches no data files"):
        read_frame("day=2027-*", SCHEMA)


def test_rejected_rows_are_not_kept_inside_the_folder_being_read(tmp_path):
    """A later read of the folder would take the kept rows (a .tsv) for a part of it."""
    root = _parts(tmp_path / "log")
    with pytest.raises(DataError, match="--bad-rows .*bad.tsv is inside .*log, the folder being read"):
        read_frame(root, SCHEMA, bad_rows=root / "bad.tsv")
    with pytest.raises(DataError, match="the folder being read"):
        read_frame(root / "day=*", SCHEMA, bad_rows=root / "day=2026-01-01" / "bad.tsv")
    assert read_frame(root, SCHEMA, bad_rows=tmp_path / "bad.tsv")[1].rows == 4
    # beside what a pattern matches is not inside it: log/bad.tsv is no day=* part
    assert read_frame(root / "day=*", SCHEMA, bad_rows=root / "bad.tsv")[1].rows == 4
    assert would_read(root / "day=*", root / "day=2027-01-01" / "x.csv")  # a folder the pattern will match
    assert not would_read(root / "*.parquet", root / "day=2026-01-01" / "x.tsv") and not would_read(tmp_path / "f.csv",
                                                                                                 tmp_path / "x")


def test_a_folder_without_parts_or_with_a_broken_one_is_named(tmp_path):
    (tmp_path / "empty" / "_temporary").mkdir(parents=True)
    (tmp_path / "empty" / "_temporary" / "part-0.csv").write_text("city,click\n")
    (tmp_path / "empty" / "notes.txt").write_text("city,click\n")
    with pytest.raises(DataError, match=r"empty is a folder with no data files \(\*.parquet, \*.csv, \*.tsv"):
        read_frame(tmp_path / "empty", SCHEMA)
    with pytest.raises(FileNotFoundError, match="nowhere: no such file or folder"):
        data_parts(tmp_path / "nowhere")
    root = _parts(tmp_path / "log")
    _write(root / "day=2026-01-03" / "extra.csv", GOOD)
    with pytest.raises(DataError, match=r"several formats \(csv: day=2026-01-03/extra.csv, parquet: day=2026-01-01/"):
        read_frame(root, SCHEMA)
    (root / "day=2026-01-03" / "extra.csv").unlink()
    pl.DataFrame({"city": ["x"], "click": [0]}).write_parquet(root / "day=2026-01-03" / "part-0.parquet")
    with pytest.raises(DataError, match=r"day=2026-01-03/part-0.parquet: missing columns \['price'\]"):
        read_frame(root, SCHEMA)
    (root / "day=2026-01-03" / "part-0.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="day=2026-01-03/part-0.parquet: cannot be read as parquet"):
        read_frame(root, SCHEMA)


def test_missing_columns_are_named(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("city,click\na,1\n")
    with pytest.raises(DataError, match="price"):
        read_frame(path, SCHEMA)
    with pytest.raises(DataError, match="price"):
        coerce_chunk(pl.DataFrame({"city": ["a"], "click": [1]}), SCHEMA)


def test_frame_source_and_unlabelled(tmp_path):
    frame = pl.DataFrame({"city": ["a", "b"], "price": [1, 2]})
    df, rep = read_frame(frame, SCHEMA, with_label=False)
    assert df.columns == ["city", "price", "_line"] and df.schema["price"] == pl.Float64


def test_float_categories_match_integer_text(tmp_path):
    frame = pl.DataFrame({"city": [3.0, 2.5, None], "price": [1, 2, 3], "click": [0, 1, 0]})
    df, _ = read_frame(frame, SCHEMA)
    assert df["city"].to_list() == ["3", "2.5", None]


def test_read_sample(tmp_path):
    path = _write(tmp_path / "d.csv", GOOD)
    assert read_sample(path, n_rows=2).height == 2


def test_prefetch_passes_items_and_errors():
    assert list(Prefetch(iter(range(50)), depth=2)) == list(range(50))

    def boom():
        yield 1
        raise RuntimeError("broken source")

    it = Prefetch(boom())
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="broken source"):
        next(it)
    assert list(it) == []  # the error ended the iteration
    early = Prefetch(iter(range(1000)))
    assert next(early) == 0
    early.close()
    assert list(early) == []


def test_prefetch_starts_producing_before_the_first_item_is_asked_for():
    import threading

    started = threading.Event()

    def items():
        started.set()
        yield "first"

    with Prefetch(items()) as stream:
        assert started.wait(5)  # work done before the first `next` overlaps the reading
        assert list(stream) == ["first"]


def test_prefetch_close_stops_a_producer_that_is_waiting_on_a_full_queue():
    produced = []

    def items():
        for i in range(100):
            produced.append(i)
            yield i

    stream = Prefetch(items(), depth=1)
    assert next(stream) == 0
    stream.close()
    assert not stream._worker.is_alive()
    assert len(produced) <= 3  # one handed out, one queued, one waiting to be queued
