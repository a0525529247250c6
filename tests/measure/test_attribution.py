"""Join and attribution on hand-made logs whose every outcome is known; bad input gives clear errors."""

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from ctrkit.measure.attribution import Attribution, AttributionConfig
from ctrkit.measure.cli import app
from ctrkit.measure.engine import DuckDBEngine, MeasureError
from ctrkit.measure.tables import ctr_table

T0 = pd.Timestamp("2026-01-05 12:00:00", tz="UTC")


def imps() -> pd.DataFrame:
    rows = [
        # id, user, item, position, variant, seconds
        (1, "u1", "a", 1, "A", 0), (2, "u1", "b", 2, "A", 10), (3, "u2", "a", 1, "B", 20),
        (4, "u2", "c", 3, "B", 30), (5, "u3", "b", 2, "A", 40), (5, "u3", "b", 2, "A", 41),  # duplicate id 5
        (6, "bot", "a", 1, "B", 50), (7, "u4", "c", 3, "A", 60),
    ]
    df = pd.DataFrame(rows, columns=["impression_id", "user_id", "item_id", "position", "variant", "s"])
    df["timestamp"] = T0 + pd.to_timedelta(df.pop("s"), unit="s")
    return df


def clicks() -> pd.DataFrame:
    rows = [(1, 5), (1, 9), (2, -5), (3, 4000), (4, 100), (99, 10), (5, 3)]  # dup, before, late, ok, orphan, ok
    rows += [(6, 1 + i) for i in range(30)]  # a bot: 30 clicks in a minute on its impression
    df = pd.DataFrame(rows, columns=["impression_id", "s"])
    base = imps().drop_duplicates("impression_id").set_index("impression_id")["timestamp"]
    df["timestamp"] = [base.get(i, T0) + pd.Timedelta(seconds=s) for i, s in zip(df["impression_id"], df["s"])]
    return df.drop(columns="s")


def steps(att: Attribution) -> dict[str, int]:
    return {s.rule: s.removed for s in att.report.steps}


def test_every_rule_counts_its_rows() -> None:
    att = Attribution(DuckDBEngine(), imps(), clicks())
    cube = att.cube(["position"])
    got = steps(att)
    assert got["duplicate impression_id"] == 1
    assert got["repeat click on an impression (first click kept)"] == 1 + 29  # impression 1 and the bot's
    assert got["click timestamped before its impression"] == 1
    assert got["click later than the 1800 s window"] == 1
    assert got["click whose impression is not in the log"] == 1
    assert got["user with > 20 clicks in a minute (bot)"] == 1
    rep = att.report
    assert rep.impressions_read == 8 and rep.impressions_kept == 6
    assert rep.clicks_read == 37
    # clicks attributed on kept impressions: 1, 4, 5
    assert rep.clicks_attributed == 3
    t = ctr_table(cube, []).iloc[0]
    assert (t["impressions"], t["clicks"]) == (6, 3)
    # read = kept + every removal, nothing lost
    imp_removed = sum(s.removed for s in rep.steps if s.log == "impressions")
    assert rep.impressions_read == rep.impressions_kept + imp_removed


def test_click_window_is_configurable() -> None:
    att = Attribution(DuckDBEngine(), imps(), clicks(), config=AttributionConfig(click_window_s=5000))
    att.cube([])
    assert att.report.clicks_attributed == 4


def test_clicks_matched_by_user_and_item() -> None:
    c = clicks().merge(imps().drop_duplicates("impression_id")[["impression_id", "user_id", "item_id"]],
                       on="impression_id").drop(columns="impression_id")
    att = Attribution(DuckDBEngine(), imps(), c, config=AttributionConfig(max_clicks_per_user_minute=None))
    cube = att.cube(["user_id"])
    assert int(cube["clicks"].sum()) == 4  # 1, 4, 5 and the bot's first click
    assert steps(att)["click with no impression of that (user, item) in the window"] == 2


def test_conversions_click_and_view_through() -> None:
    conv = pd.DataFrame({"impression_id": [1, 2, 1, 7, 42], "revenue": [10.0, 5.0, 3.0, 1.0, 2.0]})
    base = imps().drop_duplicates("impression_id").set_index("impression_id")["timestamp"]
    conv["timestamp"] = [base.get(i, T0) + pd.Timedelta(hours=1) for i in conv["impression_id"]]
    conv.loc[3, "timestamp"] = base[7] + pd.Timedelta(days=3)  # outside the 1-day view window
    att = Attribution(DuckDBEngine(), imps(), clicks(), conv)
    cube = att.cube([])
    got = steps(att)
    assert got["repeat conversion on an impression (first kept)"] == 1
    assert got["conversion outside the click-through and view-through windows"] == 1
    assert got["conversion whose impression is not in the log"] == 1
    assert int(cube["click_conversions"].sum()) == 1 and int(cube["view_conversions"].sum()) == 1
    assert float(cube["revenue"].sum()) == 15.0


def test_user_agent_and_viewability_rules() -> None:
    df = imps().drop_duplicates("impression_id")
    df["user_agent"] = ["Mozilla", "Mozilla", "Googlebot/2.1", "Mozilla", "Mozilla", "x", "Mozilla"]
    df["viewable_fraction"] = [0.9, 0.2, 0.9, 0.9, 0.9, 0.9, None]
    df["viewable_seconds"] = [2.0, 2.0, 2.0, 0.5, 2.0, 2.0, None]
    df["click"] = 0
    att = Attribution(DuckDBEngine(), df)
    att.cube([])
    got = steps(att)
    assert got["bot user agent"] == 1
    assert got["not viewable (< 50% visible or < 1 s)"] == 2
    assert att.report.impressions_kept == 4


def test_time_zones_and_text_timestamps() -> None:
    i = imps().drop_duplicates("impression_id")
    c = clicks()
    c["timestamp"] = c["timestamp"].dt.tz_convert("Asia/Tokyo").dt.strftime("%Y-%m-%dT%H:%M:%S%z")
    i["timestamp"] = i["timestamp"].dt.tz_convert(None)  # zone-less, read as UTC
    att = Attribution(DuckDBEngine(), i, c)
    att.cube([])
    assert att.report.clicks_attributed == 3
    assert any("timestamp types differ" in n for n in att.report.notes)


def test_unparseable_timestamps_are_counted() -> None:
    df = pd.DataFrame({"impression_id": [1, 2, 3], "timestamp": ["2026-01-01 00:00:00", "garbage", None],
                       "click": [1, 0, 1]})
    c = pd.DataFrame({"impression_id": [1], "timestamp": ["2026-01-01 00:00:05"]})
    att = Attribution(DuckDBEngine(), df, c)
    att.cube([])
    assert steps(att)["impression timestamp missing or not parseable"] == 2
    assert att.report.clicks_attributed == 1


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.drop(columns="impression_id"), "no impression_id column"),
    (lambda d: d.drop(columns="timestamp"), "no timestamp column"),
    (lambda d: d.assign(position=d["position"].astype(str) + "th"), "column 'position' has type string"),
])
def test_bad_impressions_name_the_problem(mutate, message: str) -> None:
    with pytest.raises(MeasureError, match=message):
        Attribution(DuckDBEngine(), mutate(imps()), clicks())


def test_missing_click_source_and_group_column() -> None:
    with pytest.raises(MeasureError, match="no click column and no click file"):
        Attribution(DuckDBEngine(), imps())
    att = Attribution(DuckDBEngine(), imps(), clicks())
    with pytest.raises(MeasureError, match="no column 'country' to group by"):
        att.cube(["country"])


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(MeasureError, match="does not exist"):
        Attribution(DuckDBEngine(), str(tmp_path / "nope.parquet"))


def test_cli_ctr_json_contract(tmp_path: Path) -> None:
    i, c = tmp_path / "imps.csv", tmp_path / "clicks.parquet"
    imps().to_csv(i, index=False)
    clicks().to_parquet(c)
    res = CliRunner().invoke(app, ["ctr", str(i), "--clicks", str(c), "--by", "position,variant", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout.strip().splitlines()[0])
    assert isinstance(rows, list) and rows
    assert set(rows[0]) == {"position", "variant", "impressions", "clicks", "ctr", "ci_low", "ci_high"}
    assert sum(r["impressions"] for r in rows) == 6 and sum(r["clicks"] for r in rows) == 3


def test_cli_click_column_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "log.csv"
    pd.DataFrame({"position": [1, 1, 2, 2], "click": [1, 0, 0, 0]}).to_csv(p, index=False)
    res = CliRunner().invoke(app, ["ctr", str(p), "--by", "position", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout.strip().splitlines()[0])
    assert [r["clicks"] for r in rows] == [1, 0]
    bad = CliRunner().invoke(app, ["ctr", str(p), "--by", "country"])
    assert bad.exit_code == 2 and "country" in bad.output


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_folders_of_parts_read_as_training_reads_them(tmp_path: Path, fmt: str) -> None:
    """Impressions split by variant into Hive folders (the variant read back from the folder name), clicks in two
    parts, Spark's markers and a half-written _temporary part beside them: the same counts as the frames."""
    for variant, part in imps().groupby("variant"):
        (tmp_path / "imps" / f"variant={variant}").mkdir(parents=True)
        getattr(part.drop(columns="variant"), f"to_{fmt}")(tmp_path / "imps" / f"variant={variant}" / f"p.{fmt}",
                                                           index=False)
    (tmp_path / "clicks" / "_temporary").mkdir(parents=True)
    (tmp_path / "clicks" / "_temporary" / f"p.{fmt}").write_text("half written")
    (tmp_path / "clicks" / "_SUCCESS").write_text("")
    for i, part in enumerate((clicks().iloc[:4], clicks().iloc[4:])):
        getattr(part, f"to_{fmt}")(tmp_path / "clicks" / f"part-{i}.{fmt}", index=False)
    want = ctr_table(Attribution(DuckDBEngine(), imps(), clicks()).cube(["variant"]), ["variant"])
    att = Attribution(DuckDBEngine(), str(tmp_path / "imps"), str(tmp_path / "clicks"))
    got = ctr_table(att.cube(["variant"]), ["variant"])
    assert got[["variant", "impressions", "clicks"]].values.tolist() == \
        want[["variant", "impressions", "clicks"]].values.tolist()
    (tmp_path / "clicks" / "part-9.tsv").write_text("impression_id\ttimestamp\n")
    with pytest.raises(MeasureError, match="holds parts of several formats"):
        Attribution(DuckDBEngine(), str(tmp_path / "imps"), str(tmp_path / "clicks"))
