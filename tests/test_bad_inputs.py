"""A corpus of bad inputs across train, predict, evaluate, schema infer, measure and the Python API.

Every case asserts its exact outcome: a one-line error (exit 2) whose text names what is wrong, or rows that are
counted, reported by reason and kept aside as read. None may end in a traceback or succeed silently; the same bad
value gets the same answer from a file, a frame and a dict.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import pytest
from typer.testing import CliRunner

from ctrkit.cli import app
from ctrkit.schema import Schema, SchemaError
from ctrkit.serve.bundle import Bundle, BundleError
from ctrkit.validate import DataError

runner = CliRunner()
HEADER = "ts,user,item,price,hour,click"
SCHEMA_YAML = """label: click
time: ts
group: user
fields:
- {name: user, kind: categorical}
- {name: item, kind: categorical}
- {name: price, kind: numeric}
- {name: hour, kind: categorical}
"""
N_ROWS = 400
BAD_ROW = 7  # the 0-based data row that gets a bad value: line 9 of the file (line 1 is the header)
BAD_LINE = BAD_ROW + 2


def _rows(n: int = N_ROWS, seed: int = 0) -> list[list[str]]:
    """A small click log whose click depends on user, item and price, as text fields."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        user, item, price = int(rng.integers(0, 30)), int(rng.integers(0, 20)), float(rng.gamma(2.0, 10.0))
        p = 1 / (1 + np.exp(-(0.15 * (user % 7) - 0.2 * (item % 5) + 0.02 * price - 0.5)))
        out.append([f"2026-01-{1 + i * 20 // n:02d}T{i % 24:02d}:00:00", f"u{user}", f"i{item}", f"{price:.2f}",
                    str(i % 24), str(int(rng.random() < p))])
    return out


def _write(path: Path, rows: list[list[str]], header: str | None = HEADER) -> Path:
    lines = ([header] if header is not None else []) + [",".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _with(rows: list[list[str]], column: str, value: str, row: int = BAD_ROW) -> list[list[str]]:
    out = [list(r) for r in rows]
    out[row][HEADER.split(",").index(column)] = value
    return out


def _flat(text: str) -> str:
    """Output with its line wrapping undone, to match messages however wide the console was."""
    return " ".join(text.split())


def _cli(args: list[str]) -> tuple[int, str]:
    res = runner.invoke(app, [str(a) for a in args])
    # a clean outcome is an exit through typer (0 or 2), never an exception escaping the command
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    return res.exit_code, _flat(res.output)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Clean files, a schema and a bundle trained on them once, for every case to start from."""
    d = tmp_path_factory.mktemp("bad")
    rows = _rows()
    _write(d / "train.csv", rows)
    _write(d / "valid.csv", _rows(200, seed=1))
    (d / "schema.yaml").write_text(SCHEMA_YAML)
    code, out = _cli(["train", d / "train.csv", "--valid", d / "valid.csv", "--schema", d / "schema.yaml",
                      "--model", "lr", "--epochs", "1", "--out", d / "run", "--quiet"])
    assert code == 0, out
    return {"dir": d, "rows": rows, "bundle": d / "run" / "bundle"}


def _train(work: dict[str, Any], tmp_path: Path, train_file: Path, *extra: Any) -> tuple[int, str, Path]:
    bad = tmp_path / "bad.tsv"
    code, out = _cli(["train", train_file, "--valid", work["dir"] / "valid.csv", "--schema",
                      work["dir"] / "schema.yaml", "--model", "lr", "--epochs", "1", "--out", tmp_path / "run",
                      "--bad-rows", bad, "--quiet", *extra])
    return code, out, bad


# --- one bad value: the same answer from a training file, an evaluated file, a scored file, a frame, a dict ----
BAD_NUMBERS = [
    ("inf", "not a finite number"), ("-inf", "not a finite number"), ("Infinity", "not a finite number"),
    ("1e400", "not a finite number"), ("-1e400", "not a finite number"), ("nan", "not a finite number"),
    ("NaN", "not a finite number"), ("abc", "not a number"), ("1.2.3", "not a number"), ("--1", "not a number"),
    ("12 e", "not a number"),
]


@pytest.mark.parametrize("value, reason", BAD_NUMBERS)
def test_train_counts_and_keeps_a_bad_number(work, tmp_path, value, reason):
    rows = _with(work["rows"], "price", value)
    code, out, bad = _train(work, tmp_path, _write(tmp_path / "t.csv", rows))
    assert code == 0, out
    assert f"{N_ROWS:,} rows read, 1 rejected (1 x field 'price': {reason}; first at line {BAD_LINE})" in out
    kept = bad.read_text().splitlines()
    assert kept == ["line\treason\toriginal", f"{BAD_LINE}\tfield 'price': {reason}\t{','.join(rows[BAD_ROW])}"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["data"]["train"]["bad_rows"] == 1 and metrics["train"]["rows"] == N_ROWS - 1


def test_bad_rows_file_is_not_the_training_file(work, tmp_path):
    """The rejected rows went to a file opened for writing: naming the training file emptied it at the first one."""
    path = _write(tmp_path / "t.csv", _with(work["rows"], "price", "abc"))
    before = path.read_bytes()
    code, out = _cli(["train", path, "--valid", work["dir"] / "valid.csv", "--schema", work["dir"] / "schema.yaml",
                      "--model", "lr", "--epochs", "1", "--out", tmp_path / "run", "--bad-rows", path, "--quiet"])
    assert code == 2 and "is the file being read: the first rejected row would empty it" in out, out
    assert path.read_bytes() == before


def test_a_folder_with_no_data_files_is_named_as_one(work, tmp_path):
    """A folder was '[Errno 21] Is a directory', or an empty line from predict; a folder of parts reads now."""
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "rows.txt").write_text(HEADER + "\n")
    said = "parts is a folder with no data files (*.parquet, *.csv, *.tsv, .gz or not)"
    for args in (["evaluate", work["bundle"], tmp_path / "parts"], ["schema", "infer", tmp_path / "parts"],
                 ["predict", work["bundle"], tmp_path / "parts", "--out", tmp_path / "p.csv"]):
        code, out = _cli(args)
        assert code == 2 and said in out, out


def test_a_folder_of_parquet_parts_trains_and_scores_like_the_file(work, tmp_path):
    """A Spark-style folder (parts by day, _SUCCESS) trains to the metrics of the CSV holding the same rows."""
    rows = pl.read_csv(work["dir"] / "train.csv", infer_schema_length=0)
    for (day,), part in rows.group_by(pl.col("ts").str.slice(0, 10), maintain_order=True):
        (tmp_path / "log" / f"day={day}").mkdir(parents=True)
        part.write_parquet(tmp_path / "log" / f"day={day}" / "part-00000.parquet")
    (tmp_path / "log" / "_SUCCESS").write_text("")
    want = json.loads((work["dir"] / "run" / "metrics.json").read_text())
    for source in (tmp_path / "log", tmp_path / "log" / "day=*" / "*.parquet"):  # a folder, and a glob pattern
        code, out = _cli(["train", source, "--valid", work["dir"] / "valid.csv", "--schema",
                          work["dir"] / "schema.yaml", "--model", "lr", "--epochs", "1", "--out", tmp_path / "run",
                          "--quiet"])
        assert code == 0, out
        got = json.loads((tmp_path / "run" / "metrics.json").read_text())
        assert got["data"]["train"]["rows"] == N_ROWS and got["valid"] == want["valid"]
    code, out = _cli(["predict", work["bundle"], tmp_path / "log", "--out", tmp_path / "log" / "scores.csv"])
    assert code == 2 and "is inside" in out and "the folder being scored" in out
    for source, name in ((tmp_path / "log", "a.csv"), (work["dir"] / "train.csv", "b.csv")):
        code, out = _cli(["predict", work["bundle"], source, "--out", tmp_path / name])
        assert code == 0, out
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


@pytest.mark.parametrize("value, reason", BAD_NUMBERS)
def test_evaluate_counts_a_bad_number(work, tmp_path, value, reason):
    path = _write(tmp_path / "e.csv", _with(work["rows"], "price", value))
    code, out = _cli(["evaluate", work["bundle"], path, "--json"])
    assert code == 0, out
    assert '"bad_rows": 1' in out
    assert f"1 rejected (1 x field 'price': {reason}; first at line {BAD_LINE})" in out


@pytest.mark.parametrize("value, reason", BAD_NUMBERS)
def test_predict_file_refuses_a_bad_number(work, tmp_path, value, reason):
    path = _write(tmp_path / "p.csv", _with(work["rows"], "price", value))
    code, out = _cli(["predict", work["bundle"], path, "--out", tmp_path / "s.csv"])
    assert code == 2
    assert f"1 row(s) cannot be scored: {path} line {BAD_LINE}: field 'price': {reason}" in out
    assert not (tmp_path / "s.csv").exists()


def _records(work: dict[str, Any]) -> list[dict[str, Any]]:
    cols = HEADER.split(",")
    return [dict(zip(cols, r)) for r in work["rows"][:20]]


@pytest.mark.parametrize("value, reason", BAD_NUMBERS)
def test_predict_dicts_refuse_a_bad_number(work, value, reason):
    b = Bundle.load(work["bundle"])
    recs = _records(work)
    recs[BAD_ROW]["price"] = value
    with pytest.raises(DataError, match=rf"^record {BAD_ROW}: field 'price': {reason}$"):
        b.predict(recs)


@pytest.mark.parametrize("value, reason", BAD_NUMBERS)
def test_predict_frame_refuses_a_bad_number(work, value, reason):
    b = Bundle.load(work["bundle"])
    frame = pl.DataFrame(_records(work)).with_columns(
        pl.when(pl.int_range(pl.len()) == BAD_ROW).then(pl.lit(value)).otherwise(pl.col("price")).alias("price"))
    with pytest.raises(DataError, match=rf"^record {BAD_ROW}: field 'price': {reason}$"):
        b.predict(frame)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), np.float64("inf"), np.float32("nan")])
def test_predict_refuses_non_finite_python_numbers(work, value):
    b = Bundle.load(work["bundle"])
    recs = _records(work)
    recs[3]["price"] = value
    with pytest.raises(DataError, match=r"^record 3: field 'price': not a finite number$"):
        b.predict(recs)
    typed = pl.DataFrame(_records(work)).with_columns(pl.col("price").cast(pl.Float64)).with_columns(
        pl.when(pl.int_range(pl.len()) == 3).then(pl.lit(float(value))).otherwise(pl.col("price")).alias("price"))
    with pytest.raises(DataError, match=r"^record 3: field 'price': not a finite number$"):
        b.predict(typed)


BAD_LABELS = ["2", "yes", "0.5", "nan", "", "-2", "true"]


@pytest.mark.parametrize("value", BAD_LABELS)
def test_train_counts_a_bad_label(work, tmp_path, value):
    rows = _with(work["rows"], "click", value)
    code, out, bad = _train(work, tmp_path, _write(tmp_path / "t.csv", rows))
    assert code == 0, out
    assert f"1 rejected (1 x label 'click': expected 0/1 or -1/1; first at line {BAD_LINE})" in out
    assert bad.read_text().splitlines()[1] == (f"{BAD_LINE}\tlabel 'click': expected 0/1 or -1/1\t"
                                               f"{','.join(rows[BAD_ROW])}")


@pytest.mark.parametrize("value", BAD_LABELS)
def test_evaluate_counts_a_bad_label(work, tmp_path, value):
    path = _write(tmp_path / "e.csv", _with(work["rows"], "click", value))
    code, out = _cli(["evaluate", work["bundle"], path])
    assert code == 0, out
    assert f"1 rejected (1 x label 'click': expected 0/1 or -1/1; first at line {BAD_LINE})" in out


@pytest.mark.parametrize("value", ["yesterday", "2026-13-45", "2026-02-30T10:00:00", "1700000000", "12:00"])
def test_train_counts_a_bad_time(work, tmp_path, value):
    rows = _with(work["rows"], "ts", value)
    code, out, bad = _train(work, tmp_path, _write(tmp_path / "t.csv", rows))
    assert code == 0, out
    assert f"1 rejected (1 x time 'ts': not a date and time (for epoch numbers set time_format: epoch_s or " \
           f"epoch_ms); first at line {BAD_LINE})" in out
    assert bad.read_text().splitlines()[1].endswith(",".join(rows[BAD_ROW]))


@pytest.mark.parametrize("line, reason", [("a,b", "expected 6 fields, got 2"),
                                          ("2026-01-01T00:00:00,u1,i1,1.0,3,1,extra", "expected 6 fields, got 7"),
                                          ("", None)])
def test_train_counts_a_row_of_the_wrong_width(work, tmp_path, line, reason):
    rows = work["rows"]
    text = "\n".join([HEADER] + [",".join(r) for r in rows[:BAD_ROW]] + [line]
                     + [",".join(r) for r in rows[BAD_ROW:]]) + "\n"
    path = tmp_path / "t.csv"
    path.write_text(text)
    code, out, bad = _train(work, tmp_path, path)
    assert code == 0, out
    if reason is None:  # a blank line is no row at all
        assert f"{N_ROWS + 200:,} rows read, none rejected" in out and not bad.exists()
    else:
        assert f"1 rejected (1 x {reason}; first at line {BAD_LINE})" in out
        assert bad.read_text().splitlines()[1] == f"{BAD_LINE}\t{reason}\t{line}"


def test_train_reports_several_reasons_in_order_of_count(work, tmp_path):
    rows = _with(_with(_with(work["rows"], "price", "inf", 3), "price", "x", 5), "price", "nan", 9)
    rows = _with(rows, "click", "7", 11)
    code, out, bad = _train(work, tmp_path, _write(tmp_path / "t.csv", rows))
    assert code == 0
    assert ("4 rejected (2 x field 'price': not a finite number; 1 x field 'price': not a number; "
            "1 x label 'click': expected 0/1 or -1/1; first at line 5)") in out
    assert [k.split("\t")[0] for k in bad.read_text().splitlines()] == ["line", "5", "7", "11", "13"]


def test_quiet_train_without_rejects_still_says_so(work, tmp_path):
    code, out, bad = _train(work, tmp_path, work["dir"] / "train.csv")
    assert code == 0 and f"{N_ROWS + 200:,} rows read, none rejected" in out and not bad.exists()


# --- fatal training inputs: one line that says what is wrong --------------------------------------------------
def test_no_training_rows_names_the_reasons(work, tmp_path):
    rows = [_with([r], "price", "inf", 0)[0] for r in work["rows"][:50]] + \
           [_with([r], "click", "9", 0)[0] for r in work["rows"][50:60]]
    code, out, _ = _train(work, tmp_path, _write(tmp_path / "t.csv", rows))
    assert code == 2
    assert ("no training rows (60 of 60 rejected: 50 x field 'price': not a finite number; "
            "10 x label 'click': expected 0/1 or -1/1)") in out
    assert not (tmp_path / "run").exists()  # no empty output folder after a failed run


@pytest.mark.parametrize("value, word", [("0", 0), ("1", 1), ("-1", 0)])
def test_constant_label_is_an_error(work, tmp_path, value, word):
    rows = [r[:-1] + [value] for r in work["rows"]]
    code, out, _ = _train(work, tmp_path, _write(tmp_path / "t.csv", rows))
    assert code == 2
    assert f"the label 'click' is {word} in all {N_ROWS:,} training rows" in out
    assert not (tmp_path / "run").exists()


def test_validation_without_positives_is_an_error(work, tmp_path):
    valid = _write(tmp_path / "v.csv", [r[:-1] + ["0"] for r in _rows(100, seed=4)])
    code, out = _cli(["train", work["dir"] / "train.csv", "--valid", valid, "--schema", work["dir"] / "schema.yaml",
                      "--model", "lr", "--epochs", "1", "--out", tmp_path / "run", "--quiet"])
    assert code == 2 and f"{valid}: the label 'click' is 0 in all 100 validation rows" in out


def test_time_split_without_positives_in_validation_is_an_error(work, tmp_path):
    rows = [r[:-1] + (["0"] if i >= N_ROWS * 0.8 else [r[-1]]) for i, r in enumerate(work["rows"])]
    code, out = _cli(["train", _write(tmp_path / "t.csv", rows), "--schema", work["dir"] / "schema.yaml",
                      "--model", "lr", "--epochs", "1", "--out", tmp_path / "run", "--quiet"])
    assert code == 2 and "the label 'click' is 0 in all 40 validation rows" in out


def test_a_label_that_is_also_a_feature_is_an_error(work, tmp_path):
    schema = tmp_path / "s.yaml"
    schema.write_text(SCHEMA_YAML + "- {name: click, kind: categorical}\n")
    code, out = _cli(["train", work["dir"] / "train.csv", "--schema", schema, "--out", tmp_path / "run"])
    assert code == 2 and "the label 'click' cannot also be a feature field" in out


def test_duplicated_column_name_in_train_and_predict(work, tmp_path):
    path = _write(tmp_path / "dup.csv", [r + [r[3]] for r in work["rows"]], header=HEADER + ",price")
    code, out, _ = _train(work, tmp_path, path)
    assert code == 2 and f"{path}: line 1 names the column(s) ['price'] more than once" in out
    code, out = _cli(["predict", work["bundle"], path, "--out", tmp_path / "s.csv"])
    assert code == 2 and "names the column(s) ['price'] more than once" in out


def test_out_naming_an_existing_file(work, tmp_path):
    (tmp_path / "taken").write_text("x")
    code, out = _cli(["train", work["dir"] / "train.csv", "--schema", work["dir"] / "schema.yaml",
                      "--out", tmp_path / "taken"])
    assert code == 2 and f"--out {tmp_path / 'taken'} exists and is not a folder" in out
    assert (tmp_path / "taken").read_text() == "x"


def test_fields_with_a_schema_is_an_error(work, tmp_path):
    code, out = _cli(["train", work["dir"] / "train.csv", "--schema", work["dir"] / "schema.yaml", "--fields",
                      "a,b", "--out", tmp_path / "run"])
    assert code == 2 and "--fields names the tokens of a libFM file without a schema" in out


def test_bom_in_train_file(work, tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (work["dir"] / "train.csv").read_bytes())
    code, out, _ = _train(work, tmp_path, path)
    assert code == 0 and f"{N_ROWS + 200:,} rows read, none rejected" in out


def _truncated_gz(src: Path, dst: Path) -> Path:
    data = gzip.compress(src.read_bytes())
    dst.write_bytes(data[: len(data) // 2])
    return dst


@pytest.mark.parametrize("command", ["train", "predict", "evaluate", "infer"])
def test_truncated_gzip_is_named(work, tmp_path, command):
    path = _truncated_gz(work["dir"] / "train.csv", tmp_path / "cut.csv.gz")
    args = {"train": ["train", path, "--schema", work["dir"] / "schema.yaml", "--out", tmp_path / "run"],
            "predict": ["predict", work["bundle"], path, "--out", tmp_path / "s.csv"],
            "evaluate": ["evaluate", work["bundle"], path],
            "infer": ["schema", "infer", path]}[command]
    code, out = _cli(args)
    assert code == 2 and f"{path}: the compressed file is damaged or cut short" in out


def test_an_unknown_format_is_named(work, tmp_path):
    """The settings checked before any data is read are tested in test_cli; a format is checked at the read."""
    code, out = _cli(["train", work["dir"] / "train.csv", "--schema", work["dir"] / "schema.yaml",
                      "--out", tmp_path / "run", "--format", "xls"])
    assert code == 2 and "unknown format 'xls'" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("target, message", [
    ("missing.csv", "missing.csv: no such file"),
    ("empty.csv", "empty.csv: the file is empty"),
    ("header_only.csv", "no training rows (0 of 0 rejected)"),
    ("other.csv", "missing columns ['user', 'item', 'price', 'hour', 'click', 'ts']"),
])
def test_unusable_training_files(work, tmp_path, target, message):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header_only.csv").write_text(HEADER + "\n")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    code, out = _cli(["train", tmp_path / target, "--schema", work["dir"] / "schema.yaml", "--out",
                      tmp_path / "run"])
    assert code == 2 and message in out


# --- schema files -----------------------------------------------------------------------------------------------
BAD_SCHEMAS = [
    ("label: click\nfields:\n- {name: user, min_count: two}\n", "field 'user': min_count must be an integer, got 'two'"),
    ("label: click\nfields:\n- {name: user, min_count: 0}\n", "field 'user': min_count must be >= 1"),
    ("label: click\nfields:\n- {name: user, kind: text}\n", "kind must be one of"),
    ("label: click\nfields:\n- {name: p, kind: numeric, transform: sqrt}\n", "transform must be one of"),
    ("label: click\nfields:\n- {name: p, kind: numeric, transform: bucketize, n_buckets: 1}\n", "n_buckets must be >= 2"),
    ("label: click\nfields:\n- {name: u, hash_buckets: 0}\n", "hash_buckets must be >= 1"),
    ("label: click\nfields:\n- {name: u, colour: red}\n", "field 'u' has unknown keys ['colour']"),
    ("label: click\nfields: []\n", "a schema needs at least one feature field"),
    ("label: click\nfields: user\n", "`fields` must be a list"),
    ("fields:\n- user\n", "needs both `label` and `fields`"),
    ("label: click\nfields:\n- user\n- user\n", "duplicate field names: ['user']"),
    ("label: click\nfields:\n- user\nlabelz: x\n", "unknown keys ['labelz']"),
    ("label: click\nfields:\n- user\nlabels: x\n", "labels must be a list of column names"),
    ("label: click\ntime_format: '%Y'\nfields:\n- user\n", "`time_format` is set but the schema has no `time`"),
    ("label: click\ntime: ts\ntime_format: seconds\nfields:\n- user\n", "time_format must be a strftime format"),
    ("label: click\nfields:\n- {name: u, required: maybe}\n", "required must be true or false"),
    ("label: [a, b]\nfields:\n- user\n", "a schema needs a label column name"),
    ("label: click\ncolumns: [user]\nfields:\n- user\n", "`columns` does not list ['click']"),
    ("- just\n- a list\n", "expected a mapping at the top level"),
    ("label: click\nfields:\n- {name: u\n", "not valid YAML"),
    ("label: click\nfields:\n- 42\n", "fields[0] must be a mapping or a name"),
]


@pytest.mark.parametrize("text, message", BAD_SCHEMAS)
def test_bad_schema_files(work, tmp_path, text, message):
    schema = tmp_path / "s.yaml"
    schema.write_text(text)
    with pytest.raises(SchemaError) as info:
        Schema.load(schema)
    assert message in str(info.value)
    code, out = _cli(["train", work["dir"] / "train.csv", "--schema", schema, "--out", tmp_path / "run"])
    assert code == 2 and message in out


def test_epoch_seconds_train_with_a_time_format(work, tmp_path):
    rows = [[str(1_767_225_600 + i * 60)] + r[1:] for i, r in enumerate(work["rows"])]
    path = _write(tmp_path / "epoch.csv", rows)
    schema = tmp_path / "s.yaml"
    schema.write_text(SCHEMA_YAML.replace("time: ts\n", "time: ts\ntime_format: epoch_s\n"))
    code, out = _cli(["train", path, "--schema", schema, "--model", "lr", "--epochs", "1", "--out",
                      tmp_path / "run", "--quiet"])
    assert code == 0 and f"{N_ROWS:,} rows read, none rejected" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["valid"]["n"] == 40  # the latest 10% by time


# --- predict and evaluate -------------------------------------------------------------------------------------
def test_keep_a_column_that_is_not_a_feature(work, tmp_path):
    rows = work["rows"][:30]
    path = _write(tmp_path / "p.csv", [[f"r{i}"] + r for i, r in enumerate(rows)], header="id," + HEADER)
    code, out = _cli(["predict", work["bundle"], path, "--out", tmp_path / "s.csv", "--keep", "id,user,click"])
    assert code == 0, out
    scored = pl.read_csv(tmp_path / "s.csv")
    assert scored.columns == ["id", "user", "click", "pctr"]
    assert scored["id"].to_list() == [f"r{i}" for i in range(30)]
    assert scored["click"].to_list() == [int(r[-1]) for r in rows]
    code, out = _cli(["predict", work["bundle"], path, "--out", tmp_path / "s2.csv", "--keep", "nope"])
    assert code == 2 and "--keep: " in out and "missing columns ['nope']" in out


@pytest.mark.parametrize("out_name, message", [("s.txt", "--out must end in .csv or .parquet"),
                                                ("folder.csv", "is a folder")])
def test_predict_out_names(work, tmp_path, out_name, message):
    (tmp_path / "folder.csv").mkdir()
    code, out = _cli(["predict", work["bundle"], work["dir"] / "train.csv", "--out", tmp_path / out_name])
    assert code == 2 and message in out


def test_predict_file_of_another_schema(work, tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    code, out = _cli(["predict", work["bundle"], path, "--out", tmp_path / "s.csv"])
    assert code == 2 and "missing columns ['user', 'item', 'price', 'hour']" in out


@pytest.mark.parametrize("damage, message", [
    (lambda b: (b / "encoder" / "encoder.json").unlink(), "encoder/encoder.json is missing"),
    (lambda b: (b / "weights.safetensors").write_bytes(b"garbage"), "weights.safetensors: contents differ"),
    (lambda b: (b / "model.json").write_text("{"), "model.json: contents differ"),
    (lambda b: shutil.rmtree(b), "no such bundle folder"),
    (lambda b: (b / "manifest.json").write_text("[]"), "manifest.json: not a valid manifest"),
])
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_damaged_bundle_is_one_line(work, tmp_path, damage, message, command):
    b = tmp_path / "bundle"
    shutil.copytree(work["bundle"], b)
    damage(b)
    args = ["predict", b, work["dir"] / "train.csv", "--out", tmp_path / "s.csv"] if command == "predict" else \
        ["evaluate", b, work["dir"] / "train.csv"]
    code, out = _cli(args)
    assert code == 2 and message in out


# --- the Python API: dict records and frames --------------------------------------------------------------------
@pytest.mark.parametrize("records, message", [
    ({}, r"record 0: missing field\(s\) \['user', 'item', 'price', 'hour'\]; pass None"),
    ({"user_idd": "u1", "item": "i1", "price": 1.0, "hour": 3},
     r"record 0: missing field\(s\) \['user'\] \(it has unknown keys \['user_idd'\]\)"),
    ([{"user": "u1", "item": "i1", "price": 1.0, "hour": 3}, {"user": "u1", "item": "i1", "hour": 3}],
     r"record 1: missing field\(s\) \['price'\]"),
    ([{"user": "u1", "item": "i1", "price": 1.0, "hour": 3}, "u1"], r"record 1: expected a mapping"),
    ("user=u1", r"expected a dict, a list of dicts or a DataFrame, got str"),
    (42, r"expected a dict, a list of dicts or a DataFrame, got int"),
    (Path("log.csv"), r"got PosixPath; a file is scored by Scorer.score_file or `ctrkit predict`, evaluated by"),
    ({"user": ["u1"], "item": "i1", "price": 1.0, "hour": 3}, r"record 0: field 'user' has a list value"),
    ({"user": "u1", "item": {"id": 1}, "price": 1.0, "hour": 3}, r"record 0: field 'item' has a dict value"),
    ({"user": "u1", "item": "i1", "price": b"1", "hour": 3}, r"record 0: field 'price' has a bytes value"),
    ({"user": "u1", "item": "i1", "price": "cheap", "hour": 3}, r"record 0: field 'price': not a number"),
    ({"user": "u1", "item": "i1", "price": "1e999", "hour": 3}, r"record 0: field 'price': not a finite number"),
    (pl.DataFrame({"user": ["u1"], "item": ["i1"]}), r"lacks the feature columns \['price', 'hour'\]"),
    (pd.DataFrame({"user": ["u1"], "item": ["i1"], "price": [1.0]}), r"lacks the feature columns \['hour'\]"),
    (pl.DataFrame({"user": ["u1"], "item": ["i1"], "price": [[1.0]], "hour": [3]}),
     r"field 'price' is numeric but the data has type List"),
])
def test_predict_refuses_bad_records(work, records, message):
    with pytest.raises(DataError, match=message):
        Bundle.load(work["bundle"]).predict(records)


def test_predict_missing_values_given_as_none_score(work):
    b = Bundle.load(work["bundle"])
    p = b.predict([{"user": None, "item": None, "price": None, "hour": None},
                   {"user": "never-seen", "item": "i1", "price": "", "hour": 99}])
    assert p.shape == (2,) and np.isfinite(p).all() and ((p > 0) & (p < 1)).all()
    frame = pd.DataFrame({"user": ["u1"], "item": ["i1"], "price": [np.nan], "hour": [3]})
    assert np.isfinite(b.predict(frame)).all()  # pandas' NaN is its missing value


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_predict_batch_size_must_be_positive(work, batch_size):
    with pytest.raises(ValueError, match=f"batch_size must be a positive integer, got {batch_size!r}"):
        Bundle.load(work["bundle"]).predict(_records(work), batch_size=batch_size)


def test_required_field_dict_and_file_agree(work, tmp_path):
    b = Bundle.load(work["bundle"])
    b.schema.field("item").required = True
    recs = _records(work)
    recs[4]["item"] = None
    with pytest.raises(DataError, match=r"^record 4: required field 'item' is missing$"):
        b.predict(recs)
    path = _write(tmp_path / "p.csv", _with(work["rows"][:20], "item", "", 4))
    with pytest.raises(DataError, match=r"row 6: required field 'item' is missing"):
        b.predict_file(path)


def test_bundle_save_over_a_file(work, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(BundleError, match="exists and is not a folder"):
        Bundle.load(work["bundle"]).save(tmp_path / "f")


# --- schema infer ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty"),
    (b"\n\n", "the file is empty"),
    (b"\x00\x01\x02binary\xff\xfe" * 20, "this is not a text (CSV/TSV) file"),
    (b"a,b,click\n", "a header line but no rows to infer from"),
    (b"a,b\n1,2\n3,4\n", "cannot guess the label column among ['a', 'b']; pass --label COLUMN"),
    (b"a,a,click\n1,2,0\n", "line 1 names the column(s) ['a'] more than once"),
    (b"a,click\n1,2\n3,5\n", "the label column 'click' is not 0/1"),
    (b"a,click\nx,1\ny,1\n", "the label column 'click' is 1 in all 2 sampled rows: a label must take both values"),
    (b"a,click\nx,0.0\ny,0.0\n", "the label column 'click' is 0.0 in all 2 sampled rows"),
    (b"a,click\nx,yes\ny,no\n", "the label column 'click' is not 0/1"),
    (b"a;b;click\n1;x;1\n2;y;0\n", "the file looks separated by ';'; ctrkit reads commas in .csv files and tabs"),
])
def test_schema_infer_refuses_unusable_files(tmp_path, content, message):
    path = tmp_path / "f.csv"
    path.write_bytes(content)
    code, out = _cli(["schema", "infer", path])
    assert code == 2 and message in out


def test_schema_infer_bad_rows_option(tmp_path):
    path = _write(tmp_path / "f.csv", _rows(50))
    code, out = _cli(["schema", "infer", path, "--rows", "0"])
    assert code == 2 and "--rows must be >= 1" in out


def _infer(tmp_path: Path, frame: pl.DataFrame, *args: str) -> tuple[dict[str, Any], str]:
    import yaml

    path = tmp_path / "log.csv"
    frame.write_csv(path)
    res = runner.invoke(app, ["schema", "infer", str(path), *args])
    assert res.exit_code == 0, res.output
    return yaml.safe_load(res.stdout), res.stdout


def _log(n: int = 600, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.DataFrame({
        "row_id": np.arange(n), "user_id": rng.integers(1, 80, n), "item_id": rng.integers(1, 500, n),
        "hour": rng.integers(0, 24, n), "views": rng.poisson(30, n) * rng.integers(1, 40, n),
        "country": rng.choice(["fr", "de", "it"], n), "constant": ["web"] * n,
        "timestamp": 1_767_225_600 + np.sort(rng.integers(0, 86400 * 7, n)),
        "genres": [("|".join(sorted(set(rng.choice(["a", "b", "c", "d", "e", "f"], 2))))) for _ in range(n)],
        "purchase": rng.integers(0, 2, n), "click": rng.integers(0, 2, n),
    })


def test_schema_infer_judges_columns_like_a_careful_user(tmp_path):
    data, text = _infer(tmp_path, _log())
    kinds = {f["name"]: f["kind"] for f in data["fields"]}
    assert kinds == {"user_id": "categorical", "item_id": "categorical", "hour": "categorical",
                     "views": "numeric", "country": "categorical", "genres": "categorical"}
    assert data["label"] == "click" and data["time"] == "timestamp" and data["time_format"] == "epoch_s"
    assert data["group"] == "user_id"
    assert "# left out: row_id: unique in every one of the 600 sampled rows: a row id" in text
    assert "# left out: constant: constant ('web' in every sampled row that has a value)" in text
    assert "# left out: purchase: a second label-like 0/1 column beside 'click'" in text
    assert "# note: genres looks multi-valued (values joined by '|')" in text
    code, out = _cli(["schema", "infer", tmp_path / "log.csv"])  # the summary a person reads on stderr
    assert code == 0
    assert ("600 rows sampled; label: click; time: timestamp (epoch_s), group: user_id "
            "5 categorical (user_id, item_id, hour, country, genres), 1 numeric (views)") in out
    assert "left out purchase: a second label-like 0/1 column" in out


def test_schema_infer_proposes_min_count_from_the_frequency_profile(tmp_path):
    rng = np.random.default_rng(1)
    n = 2000
    frame = pl.DataFrame({"query": [f"q{i}" if i % 3 == 0 else f"q{rng.integers(0, 20)}" for i in range(n)],
                          "site": [f"s{rng.integers(0, 20)}" for _ in range(n)], "click": rng.integers(0, 2, n)})
    data, _ = _infer(tmp_path, frame)
    counts = {f["name"]: f.get("min_count", 1) for f in data["fields"]}
    assert counts == {"query": 2, "site": 1}


@pytest.mark.parametrize("values, fmt", [
    (["2026-01-0{} 10:00:00".format(d) for d in range(1, 8)], "%Y-%m-%d %H:%M:%S"),
    (["2026-01-0{}".format(d) for d in range(1, 8)], "%Y-%m-%d"),
    (["0{}-Jan-1995".format(d) for d in range(1, 8)], "%d-%b-%Y"),
    ([str(1_700_000_000_000 + d * 1000) for d in range(7)], "epoch_ms"),
])
def test_schema_infer_detects_time_formats_and_train_reads_them(tmp_path, values, fmt):
    n = 140
    rng = np.random.default_rng(2)
    frame = pl.DataFrame({"event_time": [values[i % 7] for i in range(n)], "u": rng.integers(0, 5, n).astype(str),
                          "click": rng.integers(0, 2, n)})
    if fmt.startswith("epoch"):
        frame = frame.with_columns(pl.col("event_time").cast(pl.Int64))
    data, text = _infer(tmp_path, frame)
    assert data["time"] == "event_time" and data["time_format"] == fmt
    schema = tmp_path / "s.yaml"
    schema.write_text(text)
    code, out = _cli(["train", tmp_path / "log.csv", "--schema", schema, "--model", "lr", "--epochs", "1",
                      "--out", tmp_path / "run", "--quiet"])
    assert code == 0 and f"{n} rows read, none rejected" in out


def test_schema_infer_headerless_file_names_columns_and_finds_the_label(tmp_path):
    rng = np.random.default_rng(3)
    lines = [f"{rng.integers(0, 2)}\t{rng.integers(0, 500)}\t\t{rng.choice(['a1f', '9bc', '77e'])}" for _ in range(300)]
    path = tmp_path / "raw.tsv"
    path.write_text("\n".join(lines) + "\n")
    code, out = _cli(["schema", "infer", path])
    assert code == 0
    assert "label: c1" in out and "columns: [c1, c2, c3, c4]" in out
    assert "left out: c3: empty in every sampled row" in out
    assert "the first line holds data, not names" in out


# --- measure --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("measure")
    code, out = _cli(["measure", "simulate", d, "--impressions", "5000", "--items", "30"])
    assert code == 0, out
    return d


def test_simulate_writes_exactly_n_impressions(logs):
    assert pl.read_parquet(logs / "impressions.parquet").height == 5000


def test_simulate_does_not_replace_logs_unless_told(tmp_path):
    (tmp_path / "clicks.parquet").write_bytes(b"a real log")
    code, out = _cli(["measure", "simulate", tmp_path, "--impressions", "100", "--items", "10"])
    assert code == 2 and "already holds ['clicks.parquet']; --overwrite replaces them" in " ".join(out.split())
    assert (tmp_path / "clicks.parquet").read_bytes() == b"a real log" and not (tmp_path / "impressions.parquet").exists()
    code, out = _cli(["measure", "simulate", tmp_path, "--impressions", "100", "--items", "10", "--overwrite"])
    assert code == 0 and pl.read_parquet(tmp_path / "impressions.parquet").height == 100


@pytest.mark.parametrize("n", [1, 3999, 4000, 20000])
def test_simulate_writes_exactly_n_for_any_n(tmp_path, n):
    code, out = _cli(["measure", "simulate", tmp_path, "--impressions", n, "--items", "10"])
    assert code == 0 and pl.read_parquet(tmp_path / "impressions.parquet").height == n


@pytest.mark.parametrize("change", [pl.col("position") - 1, pl.col("position") * -1])
def test_measure_refuses_positions_below_one(logs, tmp_path, change):
    path = tmp_path / "imp.parquet"
    imp = pl.read_parquet(logs / "impressions.parquet").with_columns(change.alias("position"))
    imp.write_parquet(path)
    n_bad, lowest = int((imp["position"] < 1).sum()), int(imp["position"].min())
    code, out = _cli(["measure", "ctr", path, "--clicks", logs / "clicks.parquet"])
    assert code == 2
    assert f"column 'position': {n_bad:,} row(s) have a position below 1 (smallest {lowest})" in out


def test_measure_refuses_viewable_share_in_percent(logs, tmp_path):
    path = tmp_path / "imp.parquet"
    pl.read_parquet(logs / "impressions.parquet").with_columns(pl.col("viewable_fraction") * 100).write_parquet(path)
    code, out = _cli(["measure", "ctr", path, "--clicks", logs / "clicks.parquet"])
    assert code == 2 and "column 'viewable_fraction':" in out and "a percentage divided by 100" in out


@pytest.mark.parametrize("args, message", [
    (["--col", "colour=red"], "--col colour=red: unknown role 'colour'; roles are"),
    (["--col", "user="], "--col user=: no column name after '='"),
    (["--col", "user"], "--col expects ROLE=NAME, got 'user'"),
    (["--col", "user=nobody"], "column 'nobody' (given for user) not found"),
    (["--alpha", "1.5"], "alpha must be in (0, 1), got 1.5"),
    (["--alpha", "0"], "alpha must be in (0, 1), got 0.0"),
    (["--min-viewable-fraction", "50"], "min_viewable_fraction must be in [0, 1], got 50.0"),
])
def test_measure_ctr_bad_flags(logs, args, message):
    code, out = _cli(["measure", "ctr", logs / "impressions.parquet", "--clicks", logs / "clicks.parquet", *args])
    assert code == 2 and message in out


@pytest.mark.parametrize("args, message", [
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--memory-limit", "lots"], "--memory-limit 'lots' is not a size DuckDB reads, such as 3GB"),
    (["--memory-limit", "3GB'; SELECT 1; --"], "is not a size DuckDB reads"),
    (["--engine", "spark", "--threads", "2"], "--threads and --memory-limit are DuckDB settings"),
])
def test_measure_engine_bad_flags(logs, args, message):
    """A DuckDB setting it cannot read was a ParserException traceback; with Spark, the flags were ignored."""
    code, out = _cli(["measure", "ctr", logs / "impressions.parquet", "--clicks", logs / "clicks.parquet", *args])
    assert code == 2 and message in " ".join(out.split()) and "Traceback" not in out, out


@pytest.mark.parametrize("args, message", [
    (["--power", "0"], "--power must be in (0, 1), got 0.0"),
    (["--alpha", "1"], "--alpha must be in (0, 1), got 1.0"),
    (["--min-impressions", "-5"], "--min-impressions must be >= 0, got -5"),
    (["--mde", "-1"], "--mde is a relative change: above -1 and not 0, got -1.0"),
    (["--mde", "0"], "--mde is a relative change: above -1 and not 0, got 0.0"),
    (["--primary", "ctrr"], "unknown metric 'ctrr'"), (["--correction", "none"], "correction must be 'holm' or"),
])
def test_abtest_settings_are_named_before_the_logs_are_read(tmp_path, args, message):
    code, out = _cli(["measure", "abtest", tmp_path / "nope.parquet", *args])
    assert code == 2 and message in " ".join(out.split()) and "nope.parquet" not in out, out


@pytest.mark.parametrize("overrides, message", [
    ({"variants": {"control": 0.0, "b": -1.0}}, "a variant's lift must be above -1 (-100%), got {'b': -1.0}"),
    ({"ctr": 0.0}, "ctr must be in (0, 1), got 0.0"), ({"duplicate_rate": 1.5}, "duplicate_rate must be in [0, 1]"),
    ({"conversion_rate": -0.1}, "conversion_rate must be in [0, 1]"), ({"days": 0.0}, "days must be > 0, got 0.0"),
])
def test_simulate_refuses_a_world_it_cannot_draw(overrides, message):
    """A lift of -200% planted a click probability below zero, clipped to none at all, without a word."""
    from ctrkit.measure.simulate import simulate_logs

    with pytest.raises(ValueError, match=re.escape(message)):
        simulate_logs(n_impressions=100, **overrides)


@pytest.mark.parametrize("args, message", [
    (["--clip", "0"], "--clip is the lowest examination probability"), (["--clip", "2"], "be in (0, 1], got 2.0"),
    (["--top-items", "-2"], "--top-items must be >= 0 (0: no item table), got -2"),
    (["--min-item-impressions", "-1"], "--min-item-impressions must be >= 0, got -1"),
])
def test_measure_propensity_bad_flags(logs, args, message):
    """--top-items -2 showed every item but the last two; --clip 2 halved every IPS CTR; --clip -1 went through."""
    code, out = _cli(["measure", "propensity", logs / "impressions.parquet", "--clicks", logs / "clicks.parquet",
                      *args])
    assert code == 2 and message in " ".join(out.split()), out


def test_measure_report_does_not_write_over_a_log(logs, tmp_path):
    """--out imps.parquet wrote the HTML report over the impression log."""
    imps = tmp_path / "imps.parquet"
    shutil.copy(logs / "impressions.parquet", imps)
    before = imps.read_bytes()
    code, out = _cli(["measure", "report", imps, "--clicks", logs / "clicks.parquet", "--out", imps])
    assert code == 2 and "must end in .html" in out and imps.read_bytes() == before


def test_measure_impression_log_as_click_log(logs, tmp_path):
    code, out = _cli(["measure", "ctr", logs / "impressions.parquet", "--clicks", logs / "impressions.parquet"])
    assert code == 2 and "is the impression log itself; give the clicks log" in out
    copy = tmp_path / "copy.parquet"
    shutil.copy(logs / "impressions.parquet", copy)
    code, out = _cli(["measure", "ctr", logs / "impressions.parquet", "--clicks", copy])
    assert code == 2 and "is the impression log itself" in out


def test_measure_missing_file(logs, tmp_path):
    code, out = _cli(["measure", "ctr", tmp_path / "nope.parquet"])
    assert code == 2 and "nope.parquet" in out
