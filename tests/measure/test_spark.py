"""The same query definitions on Spark local[2] give the same tables as on DuckDB."""

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from ctrkit.measure import ope
from ctrkit.measure.attribution import Attribution
from ctrkit.measure.engine import DuckDBEngine, SparkEngine
from ctrkit.measure.simulate import simulate_logs
from ctrkit.measure.tables import ctr_table


@pytest.fixture(scope="module")
def spark():
    from pyspark.sql import SparkSession

    s = (SparkSession.builder.master("local[2]").appName("ctrkit-test")
         .config("spark.sql.session.timeZone", "UTC").config("spark.ui.enabled", "false")
         .config("spark.sql.shuffle.partitions", "1").getOrCreate())
    yield s
    s.stop()


pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


def test_spark_tables_equal_duckdb(spark, tmp_path: Path) -> None:
    logs = simulate_logs(n_impressions=4_000, n_items=20, variants={"A": 0.0, "B": 0.1}, bot_users=1,
                         duplicate_rate=0.01, non_viewable_rate=0.05, repeat_click_rate=0.1, conversion_rate=0.2,
                         view_conversion_rate=0.002, seed=11)
    paths = {}
    for name in ("impressions", "clicks", "conversions"):
        paths[name] = str(tmp_path / f"{name}.parquet")
        pq.write_table(getattr(logs, name), paths[name])
    results, sets = {}, {}
    for label, engine in (("duckdb", DuckDBEngine()), ("spark", SparkEngine(spark))):
        att = Attribution(engine, paths["impressions"], paths["clicks"], paths["conversions"])
        cube = att.cube(["position", "variant"])
        by_pos, by_var = att.cubes([["position"], ["variant"]])
        sets[label] = [ctr_table(by_pos, ["position"]), ctr_table(by_var, ["variant"], conversions=True)]
        results[label] = (ctr_table(cube, ["position", "variant"], conversions=True), att.report)
    (t_d, r_d), (t_s, r_s) = results["duckdb"], results["spark"]
    for a, b in zip(sets["duckdb"], sets["spark"]):
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_dtype=False,
                                      rtol=1e-12)
    pd.testing.assert_frame_equal(t_d.reset_index(drop=True), t_s.reset_index(drop=True), check_dtype=False,
                                  rtol=1e-12)
    steps = lambda r: sorted((s.log.rsplit("/", 1)[-1], s.rule, s.removed) for s in r.steps)  # noqa: E731
    assert steps(r_d) == steps(r_s)
    assert r_d.click_delay_hist == r_s.click_delay_hist
    assert r_d.impressions_kept == r_s.impressions_kept > 0


def test_spark_ope_equals_duckdb(spark) -> None:
    rng = np.random.default_rng(0)
    log = pd.DataFrame({"position": rng.integers(1, 3, 2000), "item_id": rng.integers(0, 4, 2000),
                        "click": rng.integers(0, 2, 2000), "p0": 0.25})
    pol = pd.DataFrame({"position": [1, 1, 2, 2], "item_id": [0, 1, 2, 3], "propensity": [0.5, 0.5, 0.9, 0.1]})
    out = []
    for engine in (DuckDBEngine(), SparkEngine(spark)):
        engine.register("log", log)
        out.append([e.value for e in ope.ips_snips(engine, "log", "click", "p0", pol, ["position"], "item_id")])
    assert np.allclose(out[0], out[1], rtol=1e-12)
