"""Retrain from the server's own event log and promote the new bundle only if it beats the base.

The training rows are the logged impressions with their clicks joined by ``ctrkit.measure``'s attribution
(:func:`ctrkit.serve.events.attributed_impressions`). The most recent ``holdout`` share by time is kept aside;
the candidate is trained on the rest with the base bundle's schema and model, and both are scored on the
held-out window. The candidate is promoted (written to ``out``) only if its logloss there is lower.

With ``ips=True`` the rows are weighted by 1 / logged propensity (clipped at ``max_weight``), so that items the
logging policy rarely showed count as much as they would under uniform exposure, and clicks also by
1 / examination of their position, estimated on the explored slots (:func:`examination`), so that a click
deep in the list counts for the relevance it reveals. The trainer takes no sample weights, so the weighting is
done by importance resampling: as many rows as the log holds, drawn with replacement with probability
proportional to their weight (seeded).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ctrkit.data.readers import DataError
from ctrkit.serve.bundle import Bundle
from ctrkit.serve.events import attributed_impressions


@dataclass
class RetrainResult:
    """Held-out metrics of base and candidate, the decision, and where the candidate went."""

    promoted: bool
    reason: str
    base: dict[str, Any]
    candidate: dict[str, Any]
    rows: dict[str, int] = field(default_factory=dict)
    ips: bool = False
    out: str | None = None
    candidate_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def examination(rows: pl.DataFrame, label: str) -> dict[int, float]:
    """Examination propensity per position relative to position 1, from the explored slots only (there the
    shown item was drawn at random, so CTR by position reflects examination; ``ctrkit.measure``'s randomised
    estimator). Empty when the log has no explored traffic with clicks at the top position."""
    from ctrkit.measure.engine import MeasureError
    from ctrkit.measure.position import propensity_randomized

    if not {"explored", "position"} <= set(rows.columns):
        return {}
    ex = rows.filter(pl.col("explored").fill_null(False) & pl.col("position").is_not_null())
    cube = ex.group_by("position").agg(pl.len().alias("impressions"), pl.col(label).sum().alias("clicks"))
    try:
        props = propensity_randomized(cube.to_pandas())
    except MeasureError:
        return {}
    return {k: max(v, 1e-3) for k, v in props.lookup().items()}


def ips_weights(rows: pl.DataFrame, label: str, max_weight: float = 20.0) -> np.ndarray:
    """min(1 / logged propensity, max_weight), times 1 / examination(position) on clicks where the log's
    explored slots give an examination curve (clicks at deep positions stand for more relevance)."""
    if "propensity" not in rows.columns:
        raise DataError("IPS weighting needs the logged 'propensity' column (impressions served by /rank)")
    q = rows["propensity"].fill_null(1.0).to_numpy()
    if np.any((q <= 0) | (q > 1)):
        raise DataError("logged propensities must lie in (0, 1]")
    w = np.minimum(1.0 / q, max_weight)
    exam = examination(rows, label)
    if exam:
        theta = rows["position"].replace_strict(exam, default=1.0, return_dtype=pl.Float64).to_numpy()
        clicked = rows[label].to_numpy() > 0
        w = np.where(clicked, np.minimum(w / theta, max_weight), w)
    return w


def ips_resample(rows: pl.DataFrame, weights: np.ndarray, seed: int = 0) -> pl.DataFrame:
    """As many rows as given, drawn with replacement with probability proportional to ``weights``."""
    pick = np.random.default_rng(seed).choice(rows.height, rows.height, replace=True, p=weights / weights.sum())
    return rows[np.sort(pick)]


def retrain(events: str | Path, base: str | Path, out: str | Path, *, holdout: float = 0.2, ips: bool = False,
            max_weight: float = 20.0, epochs: int | None = None, seed: int = 0, work: str | Path | None = None,
            keep_candidate: bool = False, progress: bool = False) -> RetrainResult:
    """Train a candidate on the log (all but the recent ``holdout``), compare on the holdout, promote if better.

    With ``keep_candidate`` the candidate's run folder (``work``, default ``OUT.work``) is kept either way.
    """
    from ctrkit.pipeline import train

    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    base_bundle = Bundle.load(base)
    label = base_bundle.schema.label
    rows = attributed_impressions(events, label=label).sort("timestamp")
    cut = int(rows.height * (1.0 - holdout))
    fit, held = rows[:cut], rows[cut:]
    if fit.height == 0 or held.height == 0 or held[label].n_unique() < 2:
        raise DataError(f"{events}: {rows.height} impressions are too few to train and compare "
                        f"(the held-out {holdout:.0%} needs clicks and non-clicks)")
    train_rows = ips_resample(fit, ips_weights(fit, label, max_weight), seed) if ips else fit
    work_dir = Path(work) if work else Path(out).with_name(Path(out).name + ".work")
    run = train(train_rows, schema=base_bundle.schema, model=base_bundle.model_name, out=work_dir, epochs=epochs,
                seed=seed, progress=progress)
    base_m, _ = base_bundle.evaluate(held)
    cand_m, _ = run.bundle.evaluate(held)
    better = cand_m["logloss"] < base_m["logloss"]
    reason = (f"held-out logloss {cand_m['logloss']:.5f} (candidate) vs {base_m['logloss']:.5f} (base); "
              f"AUC {cand_m['auc']:.4f} vs {base_m['auc']:.4f}")
    res = RetrainResult(promoted=better, reason=("promoted: " if better else "kept the base: ") + reason,
                        base=base_m, candidate=cand_m, ips=ips,
                        rows={"log": rows.height, "train": train_rows.height, "holdout": held.height})
    if better:
        dest = Path(out)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(work_dir / "bundle", dest)
        res.out = str(dest)
    if keep_candidate:
        res.candidate_path = str(work_dir / "bundle")
    else:
        shutil.rmtree(work_dir, ignore_errors=True)
    report = Path(out).with_name(Path(out).name + ".retrain.json")
    report.write_text(json.dumps(res.to_dict(), indent=1, default=float))
    return res
