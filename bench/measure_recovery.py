"""Recovery of a planted examination curve and item relevance on 10M simulated impressions.

(a) CTR by position on randomised traffic, (b) power law, (c) regression-EM on production-ranker traffic
(no randomisation); Kendall tau of raw vs IPS / self-normalised item CTR against the planted relevance.
Usage: python bench/measure_recovery.py [--rows 10000000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

from ctrkit.measure import position as pb
from ctrkit.measure.attribution import Attribution
from ctrkit.measure.engine import DuckDBEngine
from ctrkit.measure.simulate import simulate_logs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--items", type=int, default=1000)
    args = ap.parse_args()
    out: dict[str, object] = {"rows": args.rows, "items": args.items}
    t0 = time.time()
    for randomized in (True, False):
        logs = simulate_logs(n_impressions=args.rows, n_items=args.items, randomized=randomized, seed=7)
        cube = Attribution(DuckDBEngine(threads=2), logs.impressions, logs.clicks).cube(["position", "item_id"])
        truth = logs.truth.examination
        methods = ([pb.propensity_randomized(cube), pb.propensity_power_law(cube)] if randomized
                   else [pb.propensity_randomized(cube)]) + [pb.regression_em(cube)]
        key = "randomized_traffic" if randomized else "ranker_traffic"
        res: dict[str, object] = {}
        for p in methods:
            err = p.theta / truth - 1
            name = p.method if randomized or p.method != "randomized" else "naive_ctr_by_position"
            res[name] = {"max_abs_rel_error": float(np.max(np.abs(err))), "rel_error": np.round(err, 4).tolist()}
            print(f"[{key}] {name:22s} max |rel err| pos 1-10 = {np.max(np.abs(err)):.2%}")
        items = pb.ips_item_ctr(cube, methods[-1], min_impressions=200)
        rel = logs.truth.item_relevance[items["item_id"].to_numpy()]
        taus = {c: float(kendalltau(items[c], rel)[0]) for c in ("raw_ctr", "ips_ctr", "snips_ctr")}
        res["kendall_tau_vs_planted_relevance"] = taus
        print(f"[{key}] Kendall tau vs planted relevance ({len(items)} items): " +
              ", ".join(f"{k} {v:.3f}" for k, v in taus.items()))
        out[key] = res
    out["seconds"] = time.time() - t0
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/measure_recovery.json").write_text(json.dumps(out, indent=1))
    print(f"done in {out['seconds']:.0f} s")


if __name__ == "__main__":
    main()
