"""Retrain from the server's own event log and promote the new bundle only if it holds up against the base.

The training rows are the logged impressions with their clicks joined by ``ctrkit.measure``'s attribution
(:func:`ctrkit.serve.events.attributed_impressions`). The most recent ``holdout`` share by time is kept aside;
the candidate is trained on the rest with the base bundle's schema and model, and both are scored on the
held-out window. The candidate is promoted (written to ``out``) only if its logloss there is lower and, given
the requests' candidates, only if its greedy ranking also gets the higher off-policy top-slot CTR there.

That is ``rule="better"``, and it compares point estimates: a candidate as good as the base within the noise
of the held-out window is refused about half the time, and the off-policy estimate of a ranking that often
differs from the logged one is noisy (an explored top slot weighs 1 / propensity). ``rule="not_worse"``
promotes unless the candidate is worse beyond that noise, a one-sided test at ``alpha`` on each figure: the
held-out logloss by the paired per-impression difference (its standard error taken over requests, whose
impressions share a user and a slate), and the off-policy top-slot CTR by the difference of the two estimates
against their joint error (unpaired: the two share the held-out requests, so this error is if anything too
wide, and the rule errs towards the candidate, which has seen more of the log). With ``refit`` a candidate
that passes is trained once more, by the same recipe, on every logged impression, the held-out window too (the
freshest traffic, the served model's own), and that bundle is promoted.

With ``ips=True`` the candidate learns relevance rather than clicks. A click needs the item examined and
relevant, P(click | x, position k) = θ_k · γ(x) (the examination hypothesis); a ranker shows the items it likes
where θ is high, so a model fitted to clicks learns γ(x) times the examination its own ranking gave x, and
ranking by that repeats yesterday's ranking. The logged propensity of the shown slot is not the one to divide
by: the ranker chose the slot from features the model sees, so a pointwise model is not biased by that choice
(weighting by it only shrinks the effective sample). The examination propensity θ_k is; it is corrected by
regression EM (Wang et al., "Position Bias Estimation for Unbiased Learning to Rank in Personal Search", WSDM
2018), with the click model in the M-step: a clicked row is relevant; an unclicked one at position k was
relevant but unexamined with probability γ(1 - θ_k) / (1 - θ_k γ), so it is fitted as a relevant row of that
weight and an irrelevant row of the rest (the schema's sample weights). EM starts from a click model fitted to
the same rows (one more training): γ is its pCTR over the mean θ of the logged positions (its ranking, on the
scale of position 1), and θ_k ∝ Σ clicks / Σ γ(x) at position k over all rows, with γ the click model's pCTR
over the θ of each row's position, θ first taken from the CTR by position on the explored slots (items drawn
at random). θ is re-estimated the same way after each M-step. (Starting from the served bundle anchors EM on
the stale ranking it is to correct; starting from a constant treats every unexamined item as average.) The candidate's bundle keeps θ in its metrics (``examination``); its pCTR
is the click probability at position 1, and it is compared with the base on the held-out window as
θ_position · pCTR, the probability of the clicks it was fitted to.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from scipy.stats import norm

from ctrkit.data.readers import DataError
from ctrkit.evaluate.metrics import evaluate
from ctrkit.models.ensemble import Ensemble
from ctrkit.serve.bundle import MANIFEST, Bundle
from ctrkit.serve.events import attributed_impressions

if TYPE_CHECKING:
    from ctrkit.measure.attribution import AttributionConfig

WEIGHT = "relevance_weight"
GAMMA_CLIP = (1e-4, 1.0 - 1e-4)
RULES = ("better", "not_worse")


@dataclass
class RetrainResult:
    """Held-out metrics of base and candidate, the decision, and where the candidate went."""

    promoted: bool
    reason: str
    base: dict[str, Any]
    candidate: dict[str, Any]
    rows: dict[str, int] = field(default_factory=dict)
    ips: bool = False
    examination: dict[int, float] | None = None
    out: str | None = None
    candidate_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def _theta_at(rows: pl.DataFrame, exam: dict[int, float]) -> np.ndarray:
    """θ of every row's position: interpolated between known positions, 1.0 where the position is missing."""
    if "position" not in rows.columns or not exam:
        return np.ones(rows.height)
    pos = rows["position"].cast(pl.Float64).to_numpy()
    known = np.array(sorted(exam), dtype=np.float64)
    theta = np.interp(pos, known, [exam[int(k)] for k in known])
    return np.where(np.isnan(pos), 1.0, theta)


def _normalised(clicks: pl.DataFrame) -> dict[int, float]:
    """``position, num, den`` -> θ_k = (num/den)_k / (num/den)_first, in [1e-3, 1]."""
    t = clicks.filter(pl.col("den") > 0).sort("position")
    ratio = (t["num"] / t["den"]).to_numpy()
    if len(ratio) == 0 or ratio[0] <= 0:
        return {}
    return {int(k): float(np.clip(r / ratio[0], 1e-3, 1.0)) for k, r in zip(t["position"].to_list(), ratio)}


def examination(rows: pl.DataFrame, label: str) -> dict[int, float]:
    """Examination propensity per position relative to the first, from the CTR by position of the explored
    slots (items drawn at random, so their CTR by position reflects examination; ``ctrkit.measure``'s
    randomised estimator), or of all slots where the log has no explored traffic. Empty without positions or
    without clicks at the first position."""
    if "position" not in rows.columns:
        return {}
    has = rows.filter(pl.col("position").is_not_null())
    if "explored" in has.columns and has["explored"].fill_null(False).any():
        has = has.filter(pl.col("explored").fill_null(False))
    cube = has.group_by("position").agg(pl.col(label).sum().cast(pl.Float64).alias("num"),
                                        pl.len().cast(pl.Float64).alias("den"))
    return _normalised(cube)


def examination_given_relevance(rows: pl.DataFrame, label: str, gamma: np.ndarray) -> dict[int, float]:
    """θ_k ∝ Σ clicks / Σ γ(x) over the rows at position k (E[click | x, k] = θ_k γ(x)), relative to the first
    position: every row counts, since γ accounts for which items the ranker put where."""
    if "position" not in rows.columns:
        return {}
    cube = (rows.with_columns(pl.Series("_g", gamma)).filter(pl.col("position").is_not_null())
            .group_by("position").agg(pl.col(label).sum().cast(pl.Float64).alias("num"),
                                      pl.col("_g").sum().alias("den")))
    return _normalised(cube)


def relevance_rows(rows: pl.DataFrame, label: str, exam: dict[int, float], gamma: np.ndarray) -> pl.DataFrame:
    """The E-step as weighted rows: a click is a relevant row of weight 1; a non-click at position k splits into
    a relevant row of weight r = γ(1 - θ_k) / (1 - θ_k γ) and an irrelevant row of weight 1 - r."""
    theta = _theta_at(rows, exam)
    g = np.clip(gamma, *GAMMA_CLIP)
    clicked = rows[label].to_numpy() > 0
    r = np.where(clicked, 1.0, g * (1.0 - theta) / (1.0 - theta * g))
    base = rows.with_columns(pl.Series(WEIGHT, np.where(clicked, 1.0, 1.0 - r)))
    hidden = rows.with_columns(pl.Series(WEIGHT, r), pl.lit(1).cast(rows[label].dtype).alias(label)).filter(
        pl.Series(~clicked & (r > 0)))
    out = pl.concat([base, hidden]).filter(pl.col(WEIGHT) > 0)
    return out.sort("timestamp", maintain_order=True) if "timestamp" in out.columns else out


def held_out_metrics(bundle: Bundle, rows: pl.DataFrame, label: str) -> dict[str, Any]:
    """The bundle's metrics on logged clicks: pCTR as it is, or θ_position · pCTR for a bundle trained on
    relevance (its metrics carry ``examination``)."""
    if "examination" not in bundle.metrics:
        return bundle.evaluate(rows)[0]
    return evaluate(rows[label].to_numpy().astype(np.float64), held_out_pctr(bundle, rows))


def held_out_pctr(bundle: Bundle, rows: pl.DataFrame) -> np.ndarray:
    """The click probability :func:`held_out_metrics` scores, per row: pCTR, or θ_position · pCTR for a bundle
    trained on relevance."""
    p = np.asarray(bundle.predict(rows), dtype=np.float64)
    p = p if p.ndim == 1 else p[:, 0]
    if "examination" in bundle.metrics:
        exam = {int(k): float(v) for k, v in bundle.metrics["examination"].items()}
        p = p * _theta_at(rows, exam)
    return np.clip(p, *GAMMA_CLIP)


def clustered_mean(values: np.ndarray, weights: np.ndarray, groups: np.ndarray | None) -> tuple[float, float]:
    """Weighted mean of ``values`` and its standard error with ``groups`` (e.g. requests) as the sampling unit
    (rows of a group are not independent), by the delta method for a ratio of group sums; rows are the unit
    without groups."""
    wv = weights * values
    if groups is not None:
        _, inv = np.unique(groups, return_inverse=True)
        wv, weights = np.bincount(inv, wv), np.bincount(inv, weights)
    n = len(weights)
    mean = float(wv.sum() / weights.sum())
    if n < 2:
        return mean, float("nan")
    se = float(np.sqrt(np.sum((wv - mean * weights) ** 2) / (n * (n - 1))) / weights.mean())
    return mean, se


def logloss_gap(base: Bundle, cand: Bundle, rows: pl.DataFrame, label: str, weight: str | None = None
                ) -> tuple[float, float]:
    """Candidate minus base held-out logloss, paired per impression, and its standard error over requests."""
    y = rows[label].to_numpy().astype(np.float64)

    def loss(p: np.ndarray) -> np.ndarray:
        return -(y * np.log(p) + (1.0 - y) * np.log1p(-p))

    d = loss(held_out_pctr(cand, rows)) - loss(held_out_pctr(base, rows))
    w = rows[weight].to_numpy().astype(np.float64) if weight and weight in rows.columns else np.ones(len(d))
    groups = rows["request_id"].to_numpy() if "request_id" in rows.columns else None
    return clustered_mean(d, w, groups)


def _fit(rows: pl.DataFrame, base: Bundle, work_dir: Path, *, ips: bool, em_steps: int, epochs: int | None,
         seed: int, progress: bool, events: str | Path) -> tuple[Bundle, dict[int, float] | None, int]:
    """The candidate recipe on ``rows``: a click model, or with ``ips`` the relevance model EM fits from it
    (module docstring); returns the bundle (saved under ``work_dir/bundle``), θ and the training row count."""
    from ctrkit.pipeline import train

    sch = base.schema
    label = sch.label
    plain = replace(sch, weight=None) if sch.weight == WEIGHT else sch
    members = len(base.model.members) if isinstance(base.model, Ensemble) else 1  # the base's recipe
    run = train(rows, schema=plain, model=base.model_name, out=work_dir, epochs=epochs, seed=seed,
                ensemble=members, progress=progress)  # the click model: the candidate, or where EM starts
    if not ips:
        return run.bundle, None, rows.height
    exam = examination(rows, label)
    if not exam:
        raise DataError(f"{events}: relevance retraining needs logged positions with clicks at the first one")
    clicks = run.bundle.predict(rows)
    exam = examination_given_relevance(rows, label, clicks / _theta_at(rows, exam)) or exam
    gamma = clicks / _theta_at(rows, exam).mean()
    weighted = replace(sch, weight=WEIGHT)
    for _ in range(em_steps):
        step = relevance_rows(rows, label, exam, gamma)
        if plain.weight:
            step = step.with_columns(pl.col(WEIGHT) * pl.col(plain.weight))
        run = train(step, schema=weighted, model=base.model_name, out=work_dir, epochs=epochs,
                    seed=seed, ensemble=members, progress=progress)
        gamma = run.bundle.predict(rows)
        exam = examination_given_relevance(rows, label, gamma) or exam
    run.bundle.metrics["examination"] = exam
    run.bundle.save(work_dir / "bundle")
    return run.bundle, exam, step.height


def retrain(events: str | Path, base: str | Path, out: str | Path, *, holdout: float = 0.2, ips: bool = False,
            em_steps: int = 1, candidates: Any = None, epochs: int | None = None, seed: int = 0,
            work: str | Path | None = None, keep_candidate: bool = False, progress: bool = False,
            rule: str = "better", alpha: float = 0.05, refit: bool = False,
            attribution: AttributionConfig | None = None) -> RetrainResult:
    """Train a candidate on the log (all but the recent ``holdout``), compare on the holdout, promote by ``rule``.

    With ``ips`` the candidate is fitted to relevance by ``em_steps`` rounds of regression EM (module docstring).
    With ``candidates`` (every candidate of the logged requests, a file or a frame), both bundles' greedy rankings
    are also evaluated off-policy on the held-out requests' top slots (doubly robust estimate of their CTR,
    :func:`ctrkit.measure.ope.bundle_top_slot_value`), and the candidate is promoted only if it is better on both.
    ``rule`` "better" promotes on the point estimates, "not_worse" unless the candidate is worse beyond the
    noise of the held-out window (one-sided at ``alpha``; module docstring). With ``refit`` a candidate that
    passes is retrained on the whole log, the held-out window included, and that bundle is promoted.
    ``attribution`` (default: ``ctrkit.measure``'s) sets the rules that turn the log into training rows.
    With ``keep_candidate`` the candidate's run folder (``work``, default a new hidden folder beside ``out``; its
    bundle is ``candidate_path``) is kept either way.
    """
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    if em_steps < 1:
        raise ValueError(f"em_steps must be >= 1, got {em_steps}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    dest = Path(out)
    if dest.resolve() == Path(base).resolve():
        raise ValueError(f"--out {dest} is the base bundle itself: promote to a folder of its own (the server "
                         "swaps it in with POST /admin/reload), so that the base stays to go back to")
    if dest.exists() and not (dest / MANIFEST).exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"--out {dest} exists and is not a bundle: a promotion replaces the folder, so it must be "
                         "a new one or an earlier promotion")
    if work is not None and Path(work).is_dir() and any(Path(work).iterdir()):
        raise ValueError(f"work folder {work} is not empty: the candidate's runs go there and are removed after")
    base_bundle = Bundle.load(base)
    sch = base_bundle.schema
    label = sch.label
    rows = attributed_impressions(events, attribution, label=label, time=sch.time).sort("timestamp")
    cut = int(rows.height * (1.0 - holdout))
    fit, held = rows[:cut], rows[cut:]
    if fit.height == 0 or held.height == 0 or held[label].n_unique() < 2:
        raise DataError(f"{events}: {rows.height} impressions are too few to train and compare "
                        f"(the held-out {holdout:.0%} needs clicks and non-clicks)")
    # the candidate's runs go to a folder of their own, removed when done (kept with keep_candidate)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work_dir = Path(work) if work else Path(tempfile.mkdtemp(prefix=f".{dest.name}.work-", dir=dest.parent))
    refit_dir = work_dir / "refit"
    try:
        weight = sch.weight if sch.weight != WEIGHT else None
        fit_kw: dict[str, Any] = {"ips": ips, "em_steps": em_steps, "epochs": epochs, "seed": seed,
                                  "progress": progress, "events": events}
        cand, exam, train_rows = _fit(fit, base_bundle, work_dir, **fit_kw)
        base_m = held_out_metrics(base_bundle, held, label)
        cand_m = held_out_metrics(cand, held, label)
        z = float(norm.isf(alpha))
        gap, gap_se = logloss_gap(base_bundle, cand, held, label, weight)
        cand_m["logloss_gap"] = {"value": gap, "se": gap_se}
        better = cand_m["logloss"] < base_m["logloss"] if rule == "better" else not gap > z * np.nan_to_num(gap_se)
        reason = (f"held-out logloss {cand_m['logloss']:.5f} (candidate) vs {base_m['logloss']:.5f} (base); "
                  f"AUC {cand_m['auc']:.4f} vs {base_m['auc']:.4f}")
        if rule == "not_worse":
            reason += f"; paired logloss difference {gap:+.5f} (SE {gap_se:.5f})"
        if (taught := base_bundle.metrics.get("train", {}).get("distill")) is not None:
            # a teacher reads the ids of its own training rows only: the candidate learns the log's labels
            reason += f"; the base was distilled from {taught['teacher']}, the candidate learns the labels"
        if candidates is not None:
            from ctrkit.measure.ope import bundle_top_slot_value

            for name, bundle, m in (("base", base_bundle, base_m), ("candidate", cand, cand_m)):
                m["ope"] = bundle_top_slot_value(held, candidates, bundle)
                m["ope"]["bundle"] = name
            dr = {name: next(e for e in m["ope"]["estimates"] if e["estimator"] == "dr")
                  for name, m in (("base", base_m), ("candidate", cand_m))}
            if rule == "better":
                better = better and dr["candidate"]["value"] > dr["base"]["value"]
            else:
                se = {k: (e["ci_high"] - e["ci_low"]) / (2.0 * float(norm.isf(0.025))) for k, e in dr.items()}
                joint = float(np.nan_to_num(np.hypot(se["base"], se["candidate"])))
                better = better and not dr["base"]["value"] - dr["candidate"]["value"] > z * joint
            c, b = dr["candidate"], dr["base"]
            reason += (f"; off-policy top-slot CTR (DR, {cand_m['ope']['requests']} held-out requests) "
                       f"{c['value']:.4f} [{c['ci_low']:.4f}, {c['ci_high']:.4f}] "
                       f"vs {b['value']:.4f} [{b['ci_low']:.4f}, {b['ci_high']:.4f}]")
        if rule == "not_worse":
            reason += f" (promoted unless worse beyond one-sided {1 - alpha:.0%} noise)"
        promoted_dir = work_dir / "bundle"
        counts = {"log": rows.height, "train": train_rows, "holdout": held.height}
        if better and refit:
            _, exam_all, refit_rows = _fit(rows, base_bundle, refit_dir, **fit_kw)
            promoted_dir = refit_dir / "bundle"
            counts["refit"] = refit_rows
            reason += f"; refit on all {rows.height} logged impressions"
            if exam_all is not None:
                exam = exam_all
        res = RetrainResult(promoted=better, reason=("promoted: " if better else "kept the base: ") + reason,
                            base=base_m, candidate=cand_m, ips=ips, examination=exam, rows=counts)
        if better:
            if dest.exists():  # an earlier promotion (checked above)
                shutil.rmtree(dest)
            shutil.copytree(promoted_dir, dest)
            res.out = str(dest)
    finally:
        shutil.rmtree(refit_dir, ignore_errors=True)
        if not keep_candidate:
            shutil.rmtree(work_dir, ignore_errors=True)
    if keep_candidate:
        res.candidate_path = str(work_dir / "bundle")
    report = dest.with_name(dest.name + ".retrain.json")
    report.write_text(json.dumps(res.to_dict(), indent=1, default=float))
    return res
