"""Open Bandit Dataset sample: CTR by position (random policy) and off-policy estimates of the BTS policy.

The Bernoulli-TS policy is context-free, so its action distribution per position is estimated by the share
of each item at each position in the BTS log; IPS, SNIPS and DR (logistic reward model on position, item and
user features) estimate its CTR from the random-policy log, and are compared with the CTR in the BTS log.
Usage: python bench/measure_obd.py [--data ../shared/datasets/obd_small]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ctrkit.measure import ope
from ctrkit.measure.attribution import Attribution, AttributionConfig
from ctrkit.measure.engine import DuckDBEngine
from ctrkit.measure.tables import ctr_table, records


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/obd_small"))
    ap.add_argument("--out", default="bench/results/measure_obd.json")
    args = ap.parse_args()
    t0 = time.time()
    out: dict[str, object] = {}
    for campaign in ("all", "men", "women"):
        rnd = f"{args.data}/random/{campaign}/{campaign}.csv.gz"
        bts = f"{args.data}/bts/{campaign}/{campaign}.csv.gz"
        eng = DuckDBEngine(threads=2)
        att = Attribution(eng, rnd, config=AttributionConfig(max_clicks_per_user_minute=None))
        by_pos = ctr_table(att.cube(["position"]), ["position"])
        eng.register("rnd", rnd)
        eng.register("bts", bts)
        policy = ope.policy_from_log(eng, "bts", ["position"], "item_id")
        ests = ope.ips_snips(eng, "rnd", "click", "propensity_score", policy, ["position"], "item_id")
        rows = eng.query("SELECT * FROM rnd")
        model = ope.LogisticRewardModel(["position", "item_id", "user_feature_0", "user_feature_1",
                                         "user_feature_2", "user_feature_3"], c=0.1).fit(rows, "click")
        ests.append(ope.doubly_robust(eng, "rnd", "click", "propensity_score", policy, model, ["position"],
                                      "item_id"))
        actual = eng.query("SELECT COUNT(*) AS n, SUM(click) AS k FROM bts").iloc[0]
        ctr_bts = float(actual["k"]) / float(actual["n"])
        out[campaign] = {
            "random_ctr_by_position": records(by_pos),
            "bts_actual": {"impressions": int(actual["n"]), "clicks": int(actual["k"]), "ctr": ctr_bts},
            "estimates": [{**e.to_dict(), "relative_error": (e.value - ctr_bts) / ctr_bts} for e in ests],
        }
        print(f"[{campaign}] random-policy CTR by position:")
        for r in records(by_pos):
            print(f"  pos {r['position']}: {r['ctr']:.5f} [{r['ci_low']:.5f}, {r['ci_high']:.5f}] "
                  f"({r['clicks']}/{r['impressions']})")
        print(f"[{campaign}] BTS actual CTR {ctr_bts:.5f}")
        for e in ests:
            print(f"  {e.estimator:5s} {e.value:.5f} [{e.ci_low:.5f}, {e.ci_high:.5f}] "
                  f"rel.err {(e.value - ctr_bts) / ctr_bts:+.1%}  ESS {e.effective_sample_size:,.0f}")
    out["seconds"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} in {out['seconds']:.1f} s")


if __name__ == "__main__":
    main()
