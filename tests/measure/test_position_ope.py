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
    with pytest.raises(MeasureError, match="^logs/bad.csv: 5000 rows have a logging propensity"):
        ope.ips_snips(e, "bad", "click", "p0", pol, ["position"], "item_id", what="logs/bad.csv")
    with pytest.raises(MeasureError, match="^logs/t.csv: no column 'arm'"):
        ope.policy_from_log(e, "log", ["position"], "arm", what="logs/t.csv")
    for clip in (0.0, -1.0):  # -1 made every weight -1: an IPS CTR of -0.10
        with pytest.raises(MeasureError, match=f"--max-weight clips importance weights: it must be > 0, got {clip}"):
            ope.ips_snips(e, "log", "click", "p0", pol, ["position"], "item_id", max_weight=clip)


def test_top_slot_value_of_a_greedy_model_matches_the_literal_case() -> None:
    logged = pd.DataFrame({"request_id": ["r1", "r2", "r3", "r4", "r5", "r1"],
                           "item_id": ["a", "b", "b", "b", "a", "b"], "position": [1, 1, 1, 1, 1, 2],
                           "propensity": [0.6, 0.4, 0.4, 0.5, 0.5, 1.0], "click": [0, 1, 0, 1, 1, 1]})
    cands = pd.DataFrame({"request_id": ["r1", "r1", "r2", "r2", "r3", "r3", "r4", "r4", "r4"],
                          "item_id": ["a", "b", "a", "b", "a", "b", "a", "b", "c"]})
    pctr = {"a": 0.2, "b": 0.5, "c": 0.1}  # the target shows b on top of every request
    res = ope.top_slot_value(logged, cands, lambda df: df["item_id"].map(pctr).to_numpy(), recalibrate=False)
    est = {e["estimator"]: e for e in res["estimates"]}
    # weights 1{logged = b} / q: 0, 2.5, 2.5, 2; r5 has no candidates and the position-2 row is not a top slot
    assert est["ips"]["value"] == pytest.approx((2.5 + 2.0) / 4)
    assert est["snips"]["value"] == pytest.approx(4.5 / 7.0)
    # DR: q(b) + w (r - q(logged)) = 0.5, 0.5 + 2.5 * 0.5, 0.5 - 2.5 * 0.5, 0.5 + 2 * 0.5
    assert est["dr"]["value"] == pytest.approx((0.5 + 1.75 - 0.75 + 1.5) / 4)
    assert all(e["ci_low"] <= e["value"] <= e["ci_high"] and e["n"] == 4 for e in est.values())
    assert res["requests"] == 4 and res["without_candidates"] == 1 and res["agreement"] == 0.75
    assert res["logged_ctr"] == 0.5
    with pytest.raises(MeasureError, match="'r1': the logged top item 'a' is not among its candidates"):
        ope.top_slot_value(logged, cands[cands["item_id"] != "a"], lambda df: df["item_id"].map(pctr).to_numpy())
    with pytest.raises(MeasureError, match="no logged request has its candidates"):
        ope.top_slot_value(logged, cands.assign(request_id="x"), lambda df: np.ones(len(df)))


def test_top_slot_dr_recalibrates_a_click_model_to_the_top_slot() -> None:
    # a logger that shows its pick on top with probability 0.9; the target always shows item 1 of each request;
    # the model's pCTR is a third of the top slot's CTR (fitted to every position): the direct part alone errs
    rng = np.random.default_rng(0)
    n, truth = 4000, np.array([0.3, 0.6])
    pick = np.where(rng.random(n) < 0.9, 0, 1)
    logged = pd.DataFrame({"request_id": np.arange(n), "item_id": pick, "position": 1,
                           "propensity": np.where(pick == 0, 0.9, 0.1), "click": rng.random(n) < truth[pick]})
    cands = pd.DataFrame({"request_id": np.repeat(np.arange(n), 2), "item_id": np.tile([0, 1], n)})
    model = lambda df: truth[df["item_id"].to_numpy()] / 3  # noqa: E731
    widths = []
    for recalibrate in (False, True):
        est = {e["estimator"]: e for e in ope.top_slot_value(logged, cands, model,
                                                            recalibrate=recalibrate)["estimates"]}
        assert est["ips"]["ci_low"] <= 0.6 <= est["ips"]["ci_high"]
        assert est["dr"]["ci_low"] <= 0.6 <= est["dr"]["ci_high"]
        widths.append(est["dr"]["ci_high"] - est["dr"]["ci_low"])
    assert widths[1] < 0.85 * widths[0]  # the residuals of a top-slot model are smaller
