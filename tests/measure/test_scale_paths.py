"""The fast paths give exactly what the general ones give: the bitmap duplicate-id check and GROUPING SETS cubes."""

import numpy as np
import pandas as pd
import pytest

from ctrkit.measure import attribution
from ctrkit.measure.attribution import Attribution, AttributionConfig
from ctrkit.measure.engine import DuckDBEngine
from ctrkit.measure.simulate import simulate_logs

from tests.measure.test_attribution import clicks, imps


class SpyEngine(DuckDBEngine):
    """A DuckDB engine that records the names of the tables it materialises."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[str] = []

    def materialize(self, name: str, sql: str) -> None:
        self.made.append(name)
        super().materialize(name, sql)


def steps(att: Attribution) -> dict[str, int]:
    return {s.rule: s.removed for s in att.report.steps}


def test_unique_integer_ids_skip_the_hash_check() -> None:
    e = SpyEngine()
    att = Attribution(e, imps().drop_duplicates("impression_id"), clicks())
    att.cube([])
    assert "_dup_ids" not in e.made
    assert steps(att)["duplicate impression_id"] == 0
    assert not any("not checked" in n for n in att.report.notes)


@pytest.mark.parametrize("kind", ["int", "wide_int", "string", "null_ids"])
def test_duplicates_found_by_every_path(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    i, c = imps(), clicks()
    extra = i.iloc[[0]].assign(impression_id=1)  # id 1 logged a third time, id 5 twice
    i = pd.concat([i, extra, extra], ignore_index=True)
    if kind == "wide_int":
        monkeypatch.setattr(attribution, "BITMAP_MAX_RANGE", 3)
    if kind == "string":
        i["impression_id"] = "id" + i["impression_id"].astype(str)
        c["impression_id"] = "id" + c["impression_id"].astype(str)
    if kind == "null_ids":
        i = pd.concat([i, i.iloc[[1, 2]].assign(impression_id=None)], ignore_index=True)
        i["impression_id"] = i["impression_id"].astype("Int64")
    e = SpyEngine()
    att = Attribution(e, i, c)
    att.cube([])
    assert "_dup_ids" in e.made
    got = steps(att)
    assert got["duplicate impression_id"] == 3
    assert got.get("impression without impression_id", 0) == (2 if kind == "null_ids" else 0)
    assert att.report.impressions_read == len(i)


def test_bitmap_counts_are_exact_near_the_range_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    ids = rng.choice(np.arange(10_000, 10_000 + 5_000), 4_000, replace=False)
    df = pd.DataFrame({"impression_id": ids, "timestamp": pd.Timestamp("2026-01-01", tz="UTC"), "click": 0})
    monkeypatch.setattr(attribution, "BITMAP_MAX_RANGE", int(ids.max() - ids.min() + 1))
    e = SpyEngine()
    Attribution(e, df).cube([])
    assert "_dup_ids" not in e.made
    df.loc[len(df)] = [int(ids.max()), pd.Timestamp("2026-01-01", tz="UTC"), 0]
    e = SpyEngine()
    att = Attribution(e, df)
    att.cube([])
    assert "_dup_ids" in e.made and steps(att)["duplicate impression_id"] == 1


def test_no_dedup_still_notes_it() -> None:
    e = SpyEngine()
    att = Attribution(e, imps(), clicks(), config=AttributionConfig(dedup_ids=False))
    att.cube([])
    assert "_dup_ids" not in e.made
    assert any("not checked" in n for n in att.report.notes)


def _sim():
    return simulate_logs(n_impressions=5_000, n_items=15, variants={"A": 0.0, "B": 0.1}, bot_users=1,
                         duplicate_rate=0.01, non_viewable_rate=0.05, repeat_click_rate=0.1, conversion_rate=0.2,
                         view_conversion_rate=0.002, seed=5)


def test_grouping_sets_equal_separate_cubes() -> None:
    logs = _sim()
    sets = [["item_id", "position"], ["variant"], ["position", "item_id"], []]
    one = Attribution(DuckDBEngine(), logs.impressions, logs.clicks, logs.conversions)
    together = one.cubes(sets)
    assert len(together) == len(sets)
    for dims, got in zip(sets, together):
        alone = Attribution(DuckDBEngine(), logs.impressions, logs.clicks, logs.conversions)
        want = alone.cube(dims)
        key = dims or list(want.columns[:1])
        pd.testing.assert_frame_equal(got.sort_values(key).reset_index(drop=True),
                                      want.sort_values(key).reset_index(drop=True), check_dtype=False)
        assert one.report.to_dict() == alone.report.to_dict()
    assert one.report.impressions_kept < one.report.impressions_read


def test_filter_counts_survive_integer_status_codes() -> None:
    logs = _sim()
    att = Attribution(DuckDBEngine(), logs.impressions, logs.clicks, logs.conversions)
    kept = att.cubes([["variant"]])[0]
    imp_steps = [s for s in att.report.steps if s.log == "impressions"]
    assert all(not s.rule.isdigit() for s in imp_steps)
    assert int(kept["impressions"].sum()) == att.report.impressions_kept
    assert att.report.impressions_read == att.report.impressions_kept + sum(s.removed for s in imp_steps)
