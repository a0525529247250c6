"""The feedback loop, simulated: synthetic users with a planted examination curve hit the server for several
rounds; after each round the model is retrained from the server's own event log and hot-swapped in.

World: items with a planted relevance (logit q_i), a genre each; users young or old with an age x genre
interaction; P(click | item shown at position k) = k^-eta * sigmoid(q_i + interaction + b). The log starts
with ``--seed-rows`` impressions of uniformly random rankings (every slot explored), written as the server
writes its impressions, and the seed model is trained on it. Each request then ranks ``--candidates`` random
items for one user, shows the top ``--k`` with exploration (epsilon-greedy, or Thompson sampling with
``--explore thompson``), and the simulated user clicks by the planted model; clicks go back through POST
/events in batches, as a client buffers them. A round reaches the server within seconds, so its users click
many times a minute: the log is read with attribution's bot rule (more than 20 clicks a user a minute) off,
which would otherwise drop the users who click most, with all their history.

After each round ``ctrkit.serve.retrain.retrain`` trains two candidates on the whole log so far (the seed
traffic and every round): naive (clicks as they are) and ``ips=True`` (relevance, the examination bias removed
by regression EM). Both are compared with the served bundle on the most recent 20 % of the log: held-out
logloss, and the off-policy top-slot CTR of their greedy rankings on the held-out requests (the round's
candidates are passed, as ``--candidates`` would be). With ``--rule not_worse`` (the default) a candidate is
promoted unless it is worse than the served bundle beyond the noise of that window (``--rule better`` wants
both point estimates better, which refuses a candidate that is as good within noise about half the time, and
the round after it serves the same model again); a promoted candidate is refit on the whole log, the held-out
window too (``--no-refit``: promote the candidate as gated). The naive candidate is served next if it is
promoted (its pCTR is calibrated to the logged clicks, which the monitor's pred/actual needs; the relevance
model's pCTR is the position-1 click probability).

Measured per round, all printed and written as JSON:
  realised CTR        clicks / impressions served with the round's model (should rise round over round), with
                      its standard error over requests (``--requests`` sets a round's size and so this error;
                      a round of data gains less as the model nears what this world's log can teach it, so the
                      last rounds' rises are the ones noise can hide), and the planted CTR of the shown rankings
                      (the expectation of the realised CTR given the rankings: the same figure without the
                      click noise, printed, not judged)
  panel CTR           the same model's greedy CTR on a fixed evaluation panel (``--panel`` requests, scored
                      in-process, never logged) whose clicks use common random numbers across rounds (see
                      :class:`Panel`); its round-over-round change is tested paired by request, so a rise is
                      told from click noise at a size the live traffic's CTR cannot resolve
  Kendall tau         of the items' relevance ranked by the naive and by the relevance (ips) retrained model,
                      against the planted q_i
  off-policy estimate of the promoted model's top-slot CTR (IPS / SNIPS / DR of ``ctrkit measure ope
                      --bundle`` on the round's logged top slots), and the top-slot CTR that model then
                      realises on its greedy picks in the next round: whether the interval holds it, and whether
                      the two agree within their joint 95 % error (the realised CTR is a mean of a few hundred
                      clicks itself)
  monitor             the server's live pred/actual and PSI; the last round shifts the traffic (users click
                      ``--shift`` times as often as the model expects) and pred/actual should leave the band.
                      PSI compares every scored candidate's pCTR with the bundle's validation pCTR; a bundle
                      retrained on its own served impressions was validated on shown items only, a selection
                      of the candidates, so its PSI reads high without any drift (printed, not judged)

    python bench/loop_sim.py --seed 0      # writes bench/results/loop_sim.json
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
from scipy.stats import kendalltau

from ctrkit.data.synth import examination_curve, sigmoid, solve_intercept
from ctrkit.measure.attribution import AttributionConfig
from ctrkit.measure.ope import bundle_top_slot_value
from ctrkit.pipeline import train
from ctrkit.schema import Field, Schema
from ctrkit.serve.bundle import Bundle
from ctrkit.serve.events import EventLog, attributed_impressions
from ctrkit.serve.rank import choose
from ctrkit.serve.retrain import RULES, retrain

GENRES = ("action", "comedy", "drama", "documentary", "kids")
ATTRIBUTION = AttributionConfig(max_clicks_per_user_minute=None)  # no bot rule: a round takes seconds


class World:
    """Planted users, items and click model."""

    def __init__(self, n_users: int, n_items: int, positions: int, eta: float, ctr: float, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.young = rng.random(n_users) < 0.5
        self.genre = rng.integers(0, len(GENRES), n_items)
        self.quality = rng.normal(0.0, 1.0, n_items)
        self.exam = examination_curve(positions, eta)
        action, comedy = self.genre[None, :] == 0, self.genre[None, :] == 1
        young = self.young[:, None]
        xor = ((young & action) | (~young & comedy)).astype(float) - ((young & comedy) | (~young & action))
        self.logit = self.quality[None, :] + 1.5 * xor
        self.b = solve_intercept(self.logit.ravel(), self.exam.mean(), ctr)
        self.shift = 1.0

    def relevance(self, user: int | np.ndarray, items: np.ndarray) -> np.ndarray:
        return sigmoid(self.logit[user, items] + self.b)

    def clicks(self, user: int, items: np.ndarray) -> np.ndarray:
        """Clicks on ``items`` shown in this order (position 1 first)."""
        p = np.minimum(self.exam[: len(items)] * self.relevance(user, items) * self.shift, 1.0)
        return self.rng.random(len(items)) < p

    def context(self, user: int) -> dict[str, str]:
        return {"user_id": f"u{user}", "age_group": "young" if self.young[user] else "old"}

    def candidate(self, item: int) -> dict[str, str]:
        return {"item_id": f"i{item}", "genre": GENRES[self.genre[item]]}


def schema() -> Schema:
    return Schema(fields=[Field(name=n, kind="categorical") for n in ("user_id", "age_group", "item_id", "genre")],
                  label="click", time="timestamp")


def seed_bundle(world: World, rows: int, log: Path, out: Path) -> Path:
    """A first model from the traffic before it: ``rows`` impressions of uniformly random rankings of 10 items,
    logged as the server logs its own (every slot explored, the propensity 1 / items left) into ``log``, so that
    each retraining learns from them too."""
    n_users, n_items, shown = len(world.young), len(world.genre), 10
    events: list[dict[str, Any]] = []
    for r in range(rows // shown):
        u = int(world.rng.integers(n_users))
        items = world.rng.choice(n_items, shown, replace=False)
        t = 1.7e9 + 10.0 * r
        for pos, (it, c) in enumerate(zip(items, world.clicks(u, items)), start=1):
            iid = f"seed-{r}-{pos}"
            events.append({**world.context(u), **world.candidate(int(it)), "event_id": iid,
                           "kind": "impression", "impression_id": iid, "timestamp": t, "request_id": f"seed-{r}",
                           "position": pos, "propensity": 1.0 / (shown - pos + 1), "explored": True})
            if c:
                events.append({"event_id": f"c-{iid}", "kind": "click", "impression_id": iid,
                               "timestamp": t + 1.0})
    with EventLog(log) as writer:
        writer.append(events)
    train(attributed_impressions(log, ATTRIBUTION), schema=schema(), model="fm", out=out, epochs=5,
          progress=False)
    return out / "bundle"


def item_tau(bundle_path: Path, world: World) -> float:
    """Kendall tau between the model's mean pCTR of each item (over all users) and the planted quality."""
    b = Bundle.load(bundle_path)
    n_users, n_items = len(world.young), len(world.genre)
    rows = [{**world.context(u), **world.candidate(i)} for u in range(0, n_users, 5) for i in range(n_items)]
    p = b.predict(pl.DataFrame(rows)).reshape(-1, n_items)
    return float(kendalltau(np.log(p / (1 - p)).mean(axis=0), world.quality).statistic)


def serve_round(client: Any, world: World, requests: int, n_cand: int, k: int, explore: dict[str, Any],
                click_batch: int = 50) -> dict[str, Any]:
    """One round of traffic; returns realised CTR (with its standard error and the planted CTR of the shown
    rankings), the top-slot log and every request's candidates. Clicks go back in batches of about
    ``click_batch``, as a client buffers its events."""
    n_users, n_items = len(world.young), len(world.genre)
    greedy1 = greedy1_clicks = 0
    slot1, cands, per_request, pending = [], [], [], []
    expected = 0.0
    for n in range(requests):
        u = int(world.rng.integers(n_users))
        items = world.rng.choice(n_items, n_cand, replace=False)
        r = client.post("/rank", json={"context": world.context(u), "candidates": [world.candidate(int(i))
                                                                                   for i in items],
                                       "k": k, "explore": explore})
        r.raise_for_status()
        out = r.json()
        order = np.array([items[it["index"]] for it in out["items"]])
        c = world.clicks(u, order)
        pending += [{"event_id": f"c-{it['impression_id']}", "kind": "click",
                     "impression_id": it["impression_id"]} for it, hit in zip(out["items"], c) if hit]
        if pending and (len(pending) >= click_batch or n == requests - 1):
            client.post("/events", json={"events": pending}).raise_for_status()
            pending = []
        per_request.append((len(order), int(c.sum())))
        expected += float(np.minimum(world.exam[: len(order)] * world.relevance(u, order) * world.shift,
                                     1.0).sum())
        first = out["items"][0]
        if first["score"] >= max(out["items"], key=lambda it: it["score"])["score"]:  # the greedy pick
            greedy1 += 1
            greedy1_clicks += int(c[0])
        slot1.append({"request_id": out["request_id"], "item_id": f"i{order[0]}", "position": 1,
                      "propensity": first["propensity"], "click": int(c[0])})
        cands += [{"request_id": out["request_id"], **world.context(u), **world.candidate(int(i))} for i in items]
    shown, clicks = np.array(per_request, dtype=np.float64).T
    return {"impressions": int(shown.sum()), "clicks": int(clicks.sum()), "ctr": clicks.sum() / shown.sum(),
            "ctr_se": ratio_se(clicks, shown), "planted_ctr": expected / shown.sum(),
            "greedy_slot1_ctr": greedy1_clicks / max(greedy1, 1), "greedy_slot1_n": greedy1,
            "slot1": pd.DataFrame(slot1), "candidates": pd.DataFrame(cands)}


class Panel:
    """A fixed evaluation traffic for comparing the models of successive rounds with common random numbers.

    ``requests`` (user, candidates) pairs and one uniform draw per (request, slot) are fixed once, from their
    own random stream; each round's served model ranks every panel request greedily (:func:`choose` with no
    exploration, ties by candidate order, as the server does) and slot k of request r is clicked when its
    uniform is below the planted click probability of the item shown there. Two models that rank a request
    alike get the same clicks on it, so the change of the panel's CTR between rounds is the change of the
    ranking with little of the click noise that the live traffic's CTR carries (a standard variance reduction
    for comparing policies in simulation). The panel is scored in-process and never reaches the event log, so
    no model is trained on its fixed draws."""

    def __init__(self, world: World, requests: int, n_cand: int, k: int, seed: int) -> None:
        rng = np.random.default_rng([seed, 1])
        n_users, n_items = len(world.young), len(world.genre)
        self.users = rng.integers(n_users, size=requests)
        self.items = np.stack([rng.choice(n_items, n_cand, replace=False) for _ in range(requests)])
        self.uniform = rng.random((requests, k))
        self.k = k
        self.frame = pl.DataFrame([{**world.context(int(u)), **world.candidate(int(i))}
                                   for u, row in zip(self.users, self.items) for i in row])

    def clicks(self, world: World, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per request: the clicks on its greedy slate under ``scores`` [requests, candidates] and their
        planted expectation."""
        shown = np.stack([row[choose(s, self.k).index] for row, s in zip(self.items, scores)])
        p = np.minimum(world.exam[: self.k] * world.relevance(self.users[:, None], shown) * world.shift, 1.0)
        return (self.uniform < p).sum(axis=1), p.sum(axis=1)

    def evaluate(self, world: World, bundle_path: Path) -> dict[str, Any]:
        """The served model's greedy CTR on the panel, with per-request clicks for paired comparisons."""
        scores = Bundle.load(bundle_path).predict(self.frame).reshape(self.items.shape)
        clicks, expected = self.clicks(world, scores)
        per_slot = clicks / self.k
        return {"ctr": float(per_slot.mean()), "ctr_se": float(per_slot.std(ddof=1) / np.sqrt(len(per_slot))),
                "planted_ctr": float(expected.mean() / self.k), "per_request": clicks}


def paired_rises(per_request: list[np.ndarray], k: int) -> list[dict[str, float]]:
    """Each round's change of the panel CTR over the round before, and its z: the mean of the per-request
    click differences over its standard error (the requests are the same, so the pairs share their noise)."""
    out = []
    for a, b in zip(per_request, per_request[1:]):
        d = (b - a).astype(float) / k
        mean, se = float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))
        z = mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
        out.append({"change": mean, "z": z})
    return out


def ratio_se(clicks: np.ndarray, shown: np.ndarray) -> float:
    """Standard error of Σclicks / Σshown with the request as the unit (a request's slots share its user and
    candidates, so its clicks are not independent draws): the delta method for a ratio of means."""
    n = len(clicks)
    ctr = clicks.sum() / shown.sum()
    if n < 2:
        return float("nan")
    return float(np.sqrt(np.sum((clicks - ctr * shown) ** 2) / (n * (n - 1))) / shown.mean())


def ope_of(bundle_path: Path, rnd: dict[str, Any]) -> dict[str, Any]:
    """IPS / SNIPS / DR of the top-slot CTR of ``bundle_path``'s greedy ranking on the round's logged top slots
    (``ctrkit measure ope --bundle``'s estimator)."""
    return bundle_top_slot_value(rnd["slot1"], rnd["candidates"], bundle_path)


def covers(e: dict[str, Any], realised: float, n: int) -> dict[str, Any]:
    """Whether the interval holds the realised CTR, and whether the two agree within their joint 95 % error
    (the realised CTR is itself a mean of ``n`` clicks)."""
    se_est = (e["ci_high"] - e["ci_low"]) / (2 * 1.959964)
    se_real = np.sqrt(realised * (1 - realised) / max(n, 1))
    return {"realised": realised, "covers_realised": bool(e["ci_low"] <= realised <= e["ci_high"]),
            "agrees_within_joint_error": bool(abs(e["value"] - realised) <= 1.959964 * np.hypot(se_est, se_real))}


def rises(ctrs: list[float], ses: list[float]) -> list[dict[str, float]]:
    """Each round's change of realised CTR over the round before, with the change in standard errors."""
    return [{"change": b - a, "z": (b - a) / float(np.hypot(sa, sb))}
            for a, b, sa, sb in zip(ctrs, ctrs[1:], ses, ses[1:])]


def summary_line(seed: int, rounds: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """One line per run: the realised CTR of every round before the shift and whether it rose every round."""
    ctrs = ", ".join(f"{r['ctr']:.4f} ± {r['ctr_se']:.4f}" for r in rounds[:-1])
    rose = "yes" if summary["ctr_rises_round_over_round"] else "no"
    z = ", ".join(f"{x['z']:+.1f}" for x in summary["ctr_rise"])
    ips = sum(summary["ips_tau_above_naive"])
    ope = "; ".join(f"{name} {sum(summary['ope_covers_realised'][name])}/{len(summary['ope_covers_realised'][name])}"
                    f" ({sum(summary['ope_agrees_within_joint_error'][name])} within the joint error)"
                    for name in ("ips", "snips", "dr"))
    planted = "yes" if summary["planted_ctr_rises_round_over_round"] else "no"
    panel = ""
    if summary["panel_ctr_rises_round_over_round"] is not None:
        pz = ", ".join(f"{x['z']:+.1f}" for x in summary["panel_ctr_rise"])
        panel = (f"panel CTR by round {', '.join(f'{c:.4f}' for c in summary['panel_ctr_by_round'])}; rises every "
                 f"round: {'yes' if summary['panel_ctr_rises_round_over_round'] else 'no'} (paired z: {pz}); ")
    return (f"seed {seed}: realised CTR by round (± SE) {ctrs}; rises every round before the shift: {rose} "
            f"(changes in SE: {z}; the planted CTR of the shown rankings rises every round: {planted}); {panel}tau ips > naive in {ips} of {len(summary['ips_tau_above_naive'])} rounds; "
            f"pred/actual {rounds[-2]['monitor']['pred_actual']:.3f} before the shift, "
            f"{rounds[-1]['monitor']['pred_actual']:.3f} at it (alert: "
            f"{'yes' if summary['pred_actual_alert_on_shift'] else 'no'}); top-slot OPE interval holds the "
            f"realised CTR: {ope}")


def main() -> None:
    from fastapi.testclient import TestClient

    from ctrkit.serve.app import ServerConfig, create_app

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=1600, help="requests per round")
    ap.add_argument("--candidates", type=int, default=30)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--epsilon", type=float, default=0.2)
    ap.add_argument("--explore", choices=("epsilon_greedy", "thompson"), default="epsilon_greedy")
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--items", type=int, default=120)
    ap.add_argument("--eta", type=float, default=1.0, help="examination curve k^-eta")
    ap.add_argument("--seed-rows", type=int, default=1500)
    ap.add_argument("--rule", choices=RULES, default="not_worse", help="retrain's promotion rule")
    ap.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True,
                    help="refit a promoted candidate on the whole log")
    ap.add_argument("--shift", type=float, default=0.4, help="click-rate multiplier of the last round")
    ap.add_argument("--panel", type=int, default=2000,
                    help="requests of the fixed evaluation panel (common random numbers; 0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/loop_sim.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ctrkit-loop-"))
    world = World(args.users, args.items, args.k, args.eta, 0.1, args.seed)
    log = work / "events"
    current = seed_bundle(world, args.seed_rows, log, work / "seed")
    panel = Panel(world, args.panel, args.candidates, args.k, args.seed) if args.panel > 0 else None
    panel_clicks: list[np.ndarray] = []
    rounds: list[dict[str, Any]] = []
    app = create_app(ServerConfig(bundle=current, events=log, seed=args.seed, segments=("age_group",),
                                  monitor_window=args.requests * args.k))
    with TestClient(app) as client:
        pending_ope = None
        for r in range(args.rounds + 1):
            last = r == args.rounds
            world.shift = args.shift if last else 1.0
            t0 = time.perf_counter()
            explore = {"method": args.explore, "epsilon": args.epsilon}
            rnd = serve_round(client, world, args.requests, args.candidates, args.k, explore)
            snap = app.state.monitor.snapshot()
            row: dict[str, Any] = {"round": r, "bundle": str(current), "ctr": round(rnd["ctr"], 5),
                                   "ctr_se": round(rnd["ctr_se"], 5), "planted_ctr": round(rnd["planted_ctr"], 5),
                                   "greedy_slot1_ctr": round(rnd["greedy_slot1_ctr"], 5),
                                   "impressions": rnd["impressions"], "tau_served": item_tau(current, world),
                                   "monitor": {"pred_actual": snap["overall"]["ratio"], "psi": snap["psi"],
                                               "alerts": snap["alerts"]},
                                   "shifted": last, "serve_seconds": round(time.perf_counter() - t0, 1)}
            if panel is not None and not last:
                ev = panel.evaluate(world, current)
                panel_clicks.append(ev.pop("per_request"))
                row["panel"] = {key: round(v, 5) for key, v in ev.items()}
            if pending_ope is not None:
                for e in pending_ope["estimates"]:
                    e.update(covers(e, rnd["greedy_slot1_ctr"], rnd["greedy_slot1_n"]))
                row["ope_of_this_model"] = pending_ope
            if not last:
                t0 = time.perf_counter()
                gate = {"candidates": rnd["candidates"], "epochs": 5, "seed": r, "keep_candidate": True,
                        "rule": args.rule, "attribution": ATTRIBUTION}
                naive = retrain(log, current, work / f"naive{r}", refit=args.refit, **gate)
                ips = retrain(log, current, work / f"ips{r}", ips=True, **gate)
                row["retrain"] = {"naive": naive.reason, "ips": ips.reason}
                row["promoted"] = naive.promoted
                row["log_rows"] = naive.rows["log"]
                row["tau_naive"] = item_tau(Path(str(naive.candidate_path)), world)
                row["tau_ips"] = item_tau(Path(str(ips.candidate_path)), world)
                if naive.promoted:
                    pending_ope = ope_of(work / f"naive{r}", rnd)
                    client.post("/admin/reload", json={"path": str(work / f"naive{r}")}).raise_for_status()
                    current = work / f"naive{r}"
                else:
                    pending_ope = None
                row["retrain_seconds"] = round(time.perf_counter() - t0, 1)
            rounds.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("retrain",)}, default=float), flush=True)
    ctrs = [r["ctr"] for r in rounds[:-1]]
    ses = [r["ctr_se"] for r in rounds[:-1]]
    planted = [r["planted_ctr"] for r in rounds[:-1]]
    summary = {
        "ctr_by_round": ctrs,
        "ctr_se_by_round": ses,
        "planted_ctr_by_round": planted,
        "ctr_rise": rises(ctrs, ses),
        "ctr_rises_round_over_round": all(b > a for a, b in zip(ctrs, ctrs[1:])),
        "planted_ctr_rises_round_over_round": all(b > a for a, b in zip(planted, planted[1:])),
        "panel_ctr_by_round": [r["panel"]["ctr"] for r in rounds[:-1] if "panel" in r],
        "panel_planted_ctr_by_round": [r["panel"]["planted_ctr"] for r in rounds[:-1] if "panel" in r],
        "panel_ctr_rise": paired_rises(panel_clicks, args.k),
        "promoted_by_round": [r["promoted"] for r in rounds[:-1]],
        "tau_naive": [r.get("tau_naive") for r in rounds[:-1]],
        "tau_ips": [r.get("tau_ips") for r in rounds[:-1]],
        "ips_tau_above_naive": [r["tau_ips"] > r["tau_naive"] for r in rounds[:-1]],
        "pred_actual_by_round": [r["monitor"]["pred_actual"] for r in rounds],
        "pred_actual_alert_on_shift": not 0.8 <= rounds[-1]["monitor"]["pred_actual"] <= 1.2,
        "pred_actual_quiet_before_shift": 0.8 <= rounds[-2]["monitor"]["pred_actual"] <= 1.2,
        "psi_by_round": [r["monitor"]["psi"] for r in rounds],
        "ope_covers_realised": {  # the shifted round is left out: the shift moves the truth estimated
            name: [e["covers_realised"] for r in rounds if not r["shifted"]
                   for e in r.get("ope_of_this_model", {}).get("estimates", []) if e["estimator"] == name]
            for name in ("ips", "snips", "dr")},
        "ope_agrees_within_joint_error": {
            name: [e["agrees_within_joint_error"] for r in rounds if not r["shifted"]
                   for e in r.get("ope_of_this_model", {}).get("estimates", []) if e["estimator"] == name]
            for name in ("ips", "snips", "dr")},
    }
    summary["panel_ctr_rises_round_over_round"] = (all(x["change"] > 0 for x in summary["panel_ctr_rise"])
                                                    if panel is not None else None)
    summary["line"] = summary_line(args.seed, rounds, summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": vars(args) | {"out": str(args.out)}, "rounds": rounds,
                                      "summary": summary}, indent=1, default=float))
    print(json.dumps({k: v for k, v in summary.items() if k != "line"}, indent=1, default=float))
    print(summary["line"])
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
