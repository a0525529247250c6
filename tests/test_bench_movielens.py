"""The MovieLens bench's behaviour histories: only the same user's strictly earlier rows, never the row's own
outcome or a later one, checked against a literal loop over random small logs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

_PATH = Path(__file__).resolve().parents[1] / "bench" / "bench_movielens.py"
_SPEC = importlib.util.spec_from_file_location("bench_movielens", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
bench_movielens = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_movielens)


def _reference(rows: list[tuple[int, int, int, int]], n: int) -> list[list[str]]:
    """For each (user, item, timestamp, click) row: the items of that user's rows with a smaller timestamp, in
    time order (ties in the order given), the n most recent."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i][2], i))
    out = []
    for user, _, ts, _ in rows:
        past = [rows[j][1] for j in order if rows[j][0] == user and rows[j][2] < ts]
        out.append([str(x) for x in past[-n:] if n])
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 9), st.integers(0, 5), st.integers(0, 1)),
                min_size=1, max_size=30), st.integers(0, 4))
def test_history_holds_only_earlier_rows_of_the_same_user(rows: list[tuple[int, int, int, int]], n: int) -> None:
    log = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp", "click"], orient="row")
    got = bench_movielens.earlier_items(log, "history", n)
    assert got.select("user_id", "item_id", "timestamp", "click").equals(log)  # row order kept
    assert got["history"].to_list() == _reference(rows, n)


def test_rows_of_one_second_never_see_each_other() -> None:
    log = pl.DataFrame({"user_id": [1, 1, 1, 2], "item_id": [10, 11, 12, 10], "timestamp": [5, 5, 6, 7],
                        "click": [1, 1, 1, 1]})
    got = bench_movielens.earlier_items(log, "history")
    assert got["history"].to_list() == [[], [], ["10", "11"], []]
