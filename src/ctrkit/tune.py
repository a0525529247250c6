"""Hyperparameter search: many models of one kind trained on one encode of the data, chosen by validation AUC.

:func:`tune` encodes the files once, trains the adaptive defaults as its first trial, then runs Optuna's TPE
sampler over the learning rate, the embedding size and the model's regularisation (or a space of your own), each
trial a full :func:`ctrkit.pipeline.train` with early stopping on the validation rows and no calibration, a trial
far behind the median of the earlier ones at the same epoch stopped (Optuna's median pruner). The best settings
(the defaults, if none beat them) are trained again into a bundle, and only then are the test rows scored: they
take no part in the choice. With ``storage`` (a SQLite file or an Optuna storage URL) every finished trial is
kept there as it ends, so a search that was stopped goes on where it was when run again with the same data and
settings; only the trials missing from ``trials`` are run. Optuna is an optional dependency
(``pip install 'ctrkit[tune]'``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ctrkit.data.encode import encode_files
from ctrkit.data.readers import Source
from ctrkit.models.base import default_config, model_class
from ctrkit.pipeline import Run, _resolve_schema, train

TRAIN_KEYS = ("lr", "embed_dim", "batch_size")  # arguments of train(); every other name is a model setting
METRICS = {"auc": "maximize", "logloss": "minimize"}


@dataclass
class Param:
    """One dimension of the search: ``choices``, or a range [``low``, ``high``] (``log``: sampled on a log scale;
    ints when both ends are ints)."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    def __post_init__(self) -> None:
        if self.choices is not None:
            if not self.choices or self.low is not None or self.high is not None:
                raise ValueError(f"search space {self.name!r}: give a non-empty list of choices, or low and high")
            return
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"search space {self.name!r}: needs low < high, got {self.low} and {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"search space {self.name!r}: a log scale needs low > 0, got {self.low}")

    def suggest(self, trial: Any) -> Any:
        """The trial's value of this parameter."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, self.choices)
        if isinstance(self.low, int) and isinstance(self.high, int) and not isinstance(self.low, bool):
            return trial.suggest_int(self.name, self.low, self.high, log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """The YAML form :func:`load_space` reads."""
        if self.choices is not None:
            return {"choices": self.choices}
        return {"low": self.low, "high": self.high, "log": self.log}


def default_space(model: str, first_order_fit: bool = False) -> list[Param]:
    """The learning rate and the L2 on the embeddings; the embedding size and the MLP's dropout where the model's
    shipped defaults set them (LR has no embedding size, FM no MLP). ``first_order_fit``: the log is small enough
    for the pipeline to fit the first-order weights and their L2 itself (docs/training.md), which an L2 of the
    search would switch off, so none is searched."""
    shipped = model_class(model).defaults
    space = [Param("lr", 1e-4, 1e-2, log=True)]
    if "embed_dim" in shipped:
        space.append(Param("embed_dim", choices=[8, 16, 32]))
    if not first_order_fit:
        space.append(Param("emb_l2", 1e-8, 1e-3, log=True))
    if "dropout" in shipped:
        space.append(Param("dropout", 0.0, 0.5))
    return space


def load_space(path: str | Path) -> list[Param]:
    """A search space from YAML: ``name: [a, b, c]`` (choices) or ``name: {low: x, high: y, log: true}``."""
    doc = yaml.safe_load(Path(path).read_text())
    if not isinstance(doc, dict) or not doc:
        raise ValueError(f"{path}: a search space is a mapping of names to choices or ranges")
    space = []
    for name, spec in doc.items():
        try:
            if isinstance(spec, list):
                space.append(Param(str(name), choices=spec))
            elif isinstance(spec, dict) and set(spec) <= {"low", "high", "log", "choices"}:
                space.append(Param(str(name), **spec))
            else:
                raise ValueError(f"search space {name!r}: expected a list of choices or {{low, high, log}}")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None
    return space


def _first_order_fit(model: str, enc: Any, train_kwargs: dict[str, Any]) -> bool:
    """Whether the pipeline fits this log's first-order weights itself (:func:`ctrkit.pipeline.adaptive_settings`)."""
    import numpy as np

    from ctrkit.pipeline import adaptive_settings, can_fit_first_order

    data = enc.data["train"]
    fit = can_fit_first_order(train_kwargs.get("loss", "bce"), train_kwargs.get("neg_sample_rate", 1.0),
                              train_kwargs.get("embedding_backend", "plain"), data)
    labels = np.asarray(data.label)
    labels = labels if labels.ndim == 1 else labels[:, 0]
    return bool(adaptive_settings(model, len(labels), int(labels.sum()), enc.encoder.n_ids, fit=fit)["first_order_fit"])


def _split(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(train() arguments, model settings) of a trial's values."""
    return ({k: v for k, v in params.items() if k in TRAIN_KEYS},
            {k: v for k, v in params.items() if k not in TRAIN_KEYS})


@dataclass
class TuneResult:
    """The trials (number, values, validation metric, seconds, state), the best trial and its run."""

    model: str
    metric: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    run: Run | None = None
    space: list[Param] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (written as ``OUT/tune.json``)."""
        test = self.run.metrics.get("test") if self.run is not None else None
        return {"model": self.model, "metric": self.metric, "space": {p.name: p.to_dict() for p in self.space},
                "best": self.best, "trials": self.trials,
                "final": None if self.run is None else {
                    "valid": {k: self.run.metrics["valid"].get(k) for k in ("auc", "logloss")},
                    "test": None if test is None else {k: test.get(k) for k in ("auc", "logloss")}}}


def storage_url(storage: str | Path) -> str:
    """An Optuna storage URL: a URL as it is, a file path as a SQLite database (its folder made)."""
    text = str(storage)
    if "://" in text:
        return text
    Path(text).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(text).expanduser().resolve()}"


def _identity(model: str, metric: str, space: list[Param], seed: int, enc: Any, train_kwargs: dict[str, Any]
              ) -> dict[str, Any]:
    """What a stored study must match to be continued: the search and the data it ran on."""
    rows = {k: len(d) for k, d in enc.data.items() if k != "test"}
    fixed = {k: v for k, v in train_kwargs.items() if k not in ("bad_rows", "log")}
    return json.loads(json.dumps({"model": model, "metric": metric, "seed": seed,
                                  "space": {p.name: p.to_dict() for p in space}, "encoder": enc.encoder.fingerprint(),
                                  "rows": rows, "settings": fixed}, default=str))


def _stored_records(study: Any, metric: str) -> list[dict[str, Any]]:
    """The trial records of a stored study's finished trials (complete or pruned), in the order they ended."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    done.sort(key=lambda t: t.datetime_complete)
    return [{"number": i, "params": dict(t.params), metric: t.value if t.state == TrialState.COMPLETE else float("nan"),
             **({"pruned": True} if t.state == TrialState.PRUNED else
                {"seconds": t.user_attrs.get("seconds"), "epochs": t.user_attrs.get("epochs")})}
            for i, t in enumerate(done)]


def tune(train_data: Source, *, schema: Any, valid: Source | None = None, test: Source | None = None,
         model: str = "deepfm", out: str | Path | None = None, trials: int = 20, timeout: float | None = None,
         metric: str = "auc", space: list[Param] | None = None, seed: int = 0, device: str = "cpu",
         epochs: int | None = None, log: Any = None, storage: str | Path | None = None,
         study_name: str | None = None, **train_kwargs: Any) -> TuneResult:
    """Search ``space`` (:func:`default_space` of ``model`` when None) for the settings with the best validation
    ``metric`` ("auc" or "logloss") over ``trials`` trials (the first: the defaults, ``params`` {}) or ``timeout``
    seconds, whichever ends first; then train the best into ``out`` (bundle, metrics.json with the test figures,
    report.html, tune.json). With ``storage``, the trials of the study ``study_name`` (default
    ``ctrkit-<model>-<metric>``) found there count towards ``trials``; a stored study of another search or other
    data is refused, naming what differs."""
    try:
        import optuna
    except ImportError:
        raise ImportError("ctrkit tune needs Optuna: pip install 'ctrkit[tune]'") from None
    if metric not in METRICS:
        raise ValueError(f"--metric must be one of {tuple(METRICS)}, got {metric!r}")
    if trials < 1:
        raise ValueError(f"--trials must be >= 1, got {trials}")
    if timeout is not None and timeout <= 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {timeout}")
    searched = space if space is not None else default_space(model)
    names = [p.name for p in searched]
    if len(set(names)) != len(names):
        raise ValueError(f"the search space names a setting twice: {names}")
    settings = {k for k in names if k not in TRAIN_KEYS}
    given = set(train_kwargs.get("model_options") or {}) | {k for k in TRAIN_KEYS if train_kwargs.get(k) is not None}
    if given & set(names):
        raise ValueError(f"{sorted(given & set(names))} are both fixed and searched; leave them to the search")
    # an unknown model setting is named before any encoding
    default_config(model, **{p.name: p.choices[0] if p.choices else p.low for p in searched if p.name in settings})
    sch = _resolve_schema(schema, train_kwargs.get("fmt"), train_kwargs.get("fields"))
    work = Path(tempfile.mkdtemp(prefix="ctrkit-tune-"))
    try:
        read = {"fmt": train_kwargs["fmt"]} if train_kwargs.get("fmt") else {}
        enc = encode_files(sch, train_data, work, valid=valid, test=test, seed=seed,
                           bad_rows=train_kwargs.get("bad_rows"), split=train_kwargs.get("split", "auto"), **read)
        if log:
            log(f"encoded {enc.rows:,} rows in {enc.seconds:.1f}s once for every trial")
        if space is None:
            searched = default_space(model, _first_order_fit(model, enc, train_kwargs))
        space = searched
        blind = dataclasses.replace(enc, data={k: v for k, v in enc.data.items() if k != "test"})
        common = {k: v for k, v in train_kwargs.items() if k not in ("bad_rows", "calibrate", "model_options")}
        fixed_options = dict(train_kwargs.get("model_options") or {})
        records: list[dict[str, Any]] = []
        fits: list[Any] = []  # the exact first-order fit of a small log: the same for every trial, made once

        def run_trial(params: dict[str, Any], on_epoch: Any = None) -> float:
            """Train ``params`` (none: the adaptive defaults) on the encode, record and return its figure."""
            args, options = _split(params)
            t0 = time.perf_counter()
            run = train(train_data, schema=sch, valid=valid, model=model, seed=seed, device=device, epochs=epochs,
                        progress=False, calibrate="none", encoded=blind, on_epoch=on_epoch,
                        first_order_fits=fits,
                        model_options={**fixed_options, **options}, **{**common, **args})
            value = float(run.metrics["valid"][metric])
            records.append({"number": len(records), "params": params, metric: value,
                            "seconds": round(time.perf_counter() - t0, 2), "epochs": run.metrics["train"]["epochs"]})
            if log:
                shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
                log(f"trial {len(records)}/{trials}: valid {metric} {value:.5f} ({shown or 'the defaults'})")
            return value

        def objective(trial: Any) -> float:
            def report(record: dict[str, Any]) -> None:  # a trial far behind the others' same epoch stops
                trial.report(float(record.get("valid", {}).get(metric, float("nan"))), record["epoch"])
                if trial.should_prune():
                    raise optuna.TrialPruned(f"epoch {record['epoch']}")

            params = {p.name: p.suggest(trial) for p in space}
            try:
                value = run_trial(params, report)
                trial.set_user_attr("seconds", records[-1]["seconds"])
                trial.set_user_attr("epochs", records[-1]["epochs"])
            except optuna.TrialPruned:
                records.append({"number": len(records), "params": params, metric: float("nan"), "pruned": True})
                if log:
                    log(f"trial {len(records)}/{trials}: pruned, behind the median of earlier trials")
                raise
            if not math.isfinite(value):
                raise optuna.TrialPruned(f"valid {metric} is {value}")
            return value

        started = time.perf_counter()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction=METRICS[metric],
                                    pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
                                    storage=None if storage is None else storage_url(storage),
                                    study_name=study_name or f"ctrkit-{model}-{metric}", load_if_exists=True)
        identity = _identity(model, metric, space, seed, enc, train_kwargs)
        stored = study.user_attrs.get("ctrkit")
        if stored is None:
            study.set_user_attr("ctrkit", identity)
        elif stored != identity:
            differ = sorted(k for k in identity if stored.get(k) != identity[k])
            raise ValueError(f"the study {study.study_name!r} in {storage} belongs to another search "
                             f"({', '.join(differ)} differ); give another --study name or storage to start a new one")
        records.extend(_stored_records(study, metric))
        # a sampler seeded as at the start would draw the stored trials' settings again
        study.sampler = optuna.samplers.TPESampler(seed=seed + len(records))
        if records and log:
            log(f"{len(records)} trials of study {study.study_name!r} found in {storage}; going on")
        if not records:  # the first trial is the defaults: a search never ends below what it started from
            value = run_trial({})
            if math.isfinite(value):  # kept with the others, so a search that goes on does not run it again
                study.add_trial(optuna.trial.create_trial(value=value, params={}, distributions={}, user_attrs={
                    k: records[-1][k] for k in ("seconds", "epochs")}))
        left = None if timeout is None else max(timeout - (time.perf_counter() - started), 0.0)
        if trials > len(records) and left != 0.0:
            study.optimize(objective, n_trials=trials - len(records), timeout=left)
        finite = [r for r in records if math.isfinite(r[metric])]
        if not finite:
            raise RuntimeError(f"no trial finished with a finite validation {metric}")
        pick = max if METRICS[metric] == "maximize" else min
        best = pick(finite, key=lambda r: r[metric])
        args, options = _split(best["params"])
        if log:
            log(f"best: trial {best['number'] + 1}, valid {metric} {best[metric]:.5f}; training it again into {out}")
        final = train(train_data, schema=sch, valid=valid, test=test, model=model, out=out, seed=seed, device=device,
                      epochs=epochs, progress=False, encoded=enc, calibrate=train_kwargs.get("calibrate", "auto"),
                      first_order_fits=fits,
                      model_options={**fixed_options, **options}, **{**common, **args})
        result = TuneResult(model=model, metric=metric, trials=records, run=final, space=space,
                            best={k: best[k] for k in ("number", "params", metric)})
        if out:
            (Path(out) / "tune.json").write_text(json.dumps(result.to_dict(), indent=1, default=float))
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
