"""Position-bias estimators recover a planted examination curve; IPS/SNIPS/DR against literal loops."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import kendalltau

from ctrkit.measure import ope
from ctrkit.measure import position as pb
from ctrkit.measure.abtest import ABConfig, ab_test
from ctrkit.measure.attribution import Attribution
from ctrkit.measure.engine import DuckDBEngine, MeasureError
from ctrkit.measure.simulate import simulate_logs


def cube_of(logs, dims):
    return Attribution(DuckDBEngine(), logs.impressions, logs.clicks).cube(dims)


def test_randomized_and_power_law_recover_the_curve() -> None:
    logs = simulate_logs(n_impressions=400_000, randomized=True, n_items=200, seed=3)
    cube = cube_of(logs, ["position"])
    truth = logs.truth.examination
    rnd = pb.propensity_randomized(cube)
    assert np.max(np.abs(rnd.theta / truth - 1)) < 0.12
    assert np.all(rnd.low <= rnd.theta) and np.all(rnd.theta <= rnd.high)
    pl = pb.propensity_power_law(cube)
    assert abs(pl.eta - 1.0) < 0.05


def test_regression_em_without_randomization_and_ips_ranks_items_better() -> None:
    logs = simulate_logs(n_impressions=600_000, randomized=False, n_items=200, seed=4)
    cube = cube_of(logs, ["position", "item_id"])
    truth = logs.truth.examination
    raw = pb.propensity_randomized(cube)  # the naive curve is biased by the ranker
    em = pb.regression_em(cube)
    assert np.max(np.abs(em.theta / truth - 1)) < 0.15
    assert np.max(np.abs(em.theta / truth - 1)) < np.max(np.abs(raw.theta / truth - 1))
    items = pb.ips_item_ctr(cube, em, min_impressions=200)
    rel = logs.truth.item_relevance[items["item_id"].to_numpy()]
    tau_raw = kendalltau(items["raw_ctr"], rel)[0]
    tau_ips = kendalltau(items["ips_ctr"], rel)[0]
    tau_sn = kendalltau(items["snips_ctr"], rel)[0]
    assert tau_ips > tau_raw + 0.03 and tau_sn > tau_raw + 0.03
    dec = pb.examination_decomposition(cube, em)
    assert np.allclose(dec["ctr"], dec["propensity"] * dec["relevance_shown"])


def test_em_with_item_features_runs() -> None:
    logs = simulate_logs(n_impressions=100_000, randomized=False, n_items=50, seed=5)
    cube = cube_of(logs, ["position", "item_id"])
    feats = pd.DataFrame({"q": np.log(logs.truth.item_relevance)}, index=np.arange(50))
    em = pb.regression_em(cube, features=feats, iters=30)
    assert em.theta[0] == 1.0 and np.all(np.diff(em.theta) < 0.1)


def test_ab_test_detects_planted_lift() -> None:
    logs = simulate_logs(n_impressions=400_000, variants={"control": 0.0, "treatment": 0.15, "t2": 0.0}, seed=6)
    res = ab_test(cube_of(logs, ["variant"]), config=ABConfig(guardrails=()))
    comp = res.comparisons.set_index("variant")
    assert bool(comp.loc["treatment", "significant"]) and res.verdicts["treatment"]["ship"]
    assert not res.verdicts["t2"]["ship"]
    assert comp.loc["treatment", "rel_ci_low"] < 0.15 < comp.loc["treatment", "rel_ci_high"]
    assert (comp["p_holm"] >= comp["p_value"]).all() and (comp["p_bonferroni"] >= comp["p_holm"]).all()


def test_ab_test_bad_input() -> None:
    cube = pd.DataFrame({"variant": ["a"], "impressions": [10], "clicks": [1], "conversions": [0],
                         "revenue": [0.0], "revenue_sq": [0.0], "bounces": [0], "click_conversions": [0],
                         "view_conversions": [0]})
    with pytest.raises(MeasureError, match="at least two variants"):
        ab_test(cube)
    with pytest.raises(MeasureError, match="no variant column 'arm'"):
        ab_test(cube, "arm")


def bandit_log(n: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """Uniform logging over 5 items x 2 positions; a target policy table; its true CTR."""
    rng = np.random.default_rng(seed)
    ctr = np.array([[0.1, 0.05, 0.02, 0.2, 0.01], [0.05, 0.02, 0.01, 0.1, 0.005]])
    pos = rng.integers(1, 3, n)
    item = rng.integers(0, 5, n)
    click = (rng.random(n) < ctr[pos - 1, item]).astype(int)
    log = pd.DataFrame({"position": pos, "item_id": item, "click": click, "p0": 0.2, "u": rng.integers(0, 3, n)})
    pe = np.array([[0.1, 0.1, 0.1, 0.6, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2]])
    pol = pd.DataFrame([(k + 1, a, pe[k, a]) for k in range(2) for a in range(5)],
                       columns=["position", "item_id", "propensity"])
    true = 0.5 * (pe[0] @ ctr[0]) + 0.5 * (pe[1] @ ctr[1])
    return log, pol, float(true)


def test_ips_snips_dr_match_literal_loops_and_truth() -> None:
    log, pol, true = bandit_log(40_000, 0)
    e = DuckDBEngine()
    e.register("log", log)
    ips, sn = ope.ips_snips(e, "log", "click", "p0", pol, ["position"], "item_id")
    lookup = {(p, a): w for p, a, w in pol.itertuples(index=False)}
    w = np.array([lookup[(p, a)] / 0.2 for p, a in zip(log["position"], log["item_id"])])
    r = log["click"].to_numpy()
    assert abs(ips.value - np.mean(w * r)) < 1e-12
    assert abs(sn.value - np.sum(w * r) / np.sum(w)) < 1e-12
    assert ips.ci_low < true < ips.ci_high and sn.ci_low < true < sn.ci_high

    def q(df: pd.DataFrame) -> np.ndarray:  # a deliberately biased reward model
        return np.full(len(df), 0.03)

    dr = ope.doubly_robust(e, "log", "click", "p0", pol, q, ["position"], "item_id")
    slow = []
    for p, a, y in zip(log["position"], log["item_id"], r):
        slow.append(sum(pe * 0.03 for (pp, _), pe in lookup.items() if pp == p) + lookup[(p, a)] / 0.2 * (y - 0.03))
    assert abs(dr.value - np.mean(slow)) < 1e-12
    model = ope.LogisticRewardModel(["position", "item_id"]).fit(log, "click")
    dr2 = ope.doubly_robust(e, "log", "click", "p0", pol, model, ["position"], "item_id")
    assert dr2.ci_low < true < dr2.ci_high
    assert dr2.ci_high - dr2.ci_low < ips.ci_high - ips.ci_low


def test_ope_clipping_policy_from_log_and_bad_propensities() -> None:
    log, pol, _ = bandit_log(5_000, 1)
    e = DuckDBEngine()
    e.register("log", log)
    clipped = ope.ips_snips(e, "log", "click", "p0", pol, ["position"], "item_id", max_weight=1.0)[0]
    assert clipped.max_weight <= 1.0
    emp = ope.policy_from_log(e, "log", ["position"], "item_id")
    assert np.allclose(emp.groupby("position")["propensity"].sum(), 1.0)
    e.register("bad", log.assign(p0=0.0))
    with pytest.raises(MeasureError, match="outside \\(0, 1\\]"):
        ope.ips_snips(e, "bad", "click", "p0", pol, ["position"], "item_id")
