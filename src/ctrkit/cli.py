"""The ``ctrkit`` command: thin wrappers that parse arguments, call the library and print."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ctrkit.measure.cli import app as measure_app

# what a user can get wrong (files, values, settings): all of ctrkit's own errors are ValueErrors
USER_ERRORS = (ValueError, OSError, RuntimeError)

app = typer.Typer(help="Click-through-rate prediction and measurement.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
schema_app = typer.Typer(help="Describe the columns of a click log.", no_args_is_help=True)
app.add_typer(schema_app, name="schema")
err = Console(stderr=True, soft_wrap=True)


app.add_typer(measure_app, name="measure")


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code=2)


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN becomes null, numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def _metrics_table(rows: dict[str, dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    table.add_column("split")
    for k in ("auc", "logloss", "ece", "pred_actual_ratio", "n", "positives"):
        table.add_column(k, justify="right")
    # a model with several heads: a row per head
    rows = {f"{name} {head}" if "heads" in m else name: h for name, m in rows.items()
            for head, h in m.get("heads", {"": m}).items()}
    for name, m in rows.items():
        table.add_row(name, *(f"{m[k]:.5f}" if isinstance(m[k], float) else f"{m[k]:,}"
                              for k in ("auc", "logloss", "ece", "pred_actual_ratio", "n", "positives")))
    return table


@schema_app.command("infer")
def schema_infer(file: Path = typer.Argument(..., help="CSV/TSV/Parquet file with a header line, or a folder of "
                                                       "such parts."),
                 label: Optional[str] = typer.Option(None, help="The label column (guessed if omitted)."),
                 rows: int = typer.Option(100_000, help="Rows to sample.")) -> None:
    """Guess a schema from a sample of FILE and print it as YAML (edit it, then pass it to train)."""
    from ctrkit.schema import infer

    if rows < 1:
        _fail(f"--rows must be >= 1, got {rows}")
    try:
        found = infer(file, label=label, sample_rows=rows)
    except USER_ERRORS as exc:
        _fail(str(exc))
    for line in found.summary():
        err.print(line, markup=False, highlight=False)
    sys.stdout.write(found.to_yaml())


def _event_log_rows(path: Path, schema: Path | None) -> Any:
    """A `ctrkit serve` event log as training rows (impressions with their attributed clicks), else the path."""
    from ctrkit.schema import Schema
    from ctrkit.serve.events import attributed_impressions, is_event_log

    if not is_event_log(path):
        return path
    sch = Schema.load(schema) if schema else None
    return attributed_impressions(path, label=sch.label if sch else "click", time=sch.time if sch else None)


@app.command()
def train(
    train_file: Path = typer.Argument(..., metavar="TRAIN",
                                      help="Training data (CSV/TSV/Parquet/libFM, .gz ok, a folder of such parts or a "
                                           "quoted glob pattern, or a `ctrkit serve` event log)."),
    valid: Optional[Path] = typer.Option(None, help="Validation file; if omitted, cut from TRAIN (by time if the schema has one)."),
    test: Optional[Path] = typer.Option(None, help="Test file, evaluated once at the end."),
    schema: Optional[Path] = typer.Option(None, help="Schema YAML (see `ctrkit schema infer`)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="csv, tsv, parquet or libfm (default: from the file name)."),
    fields: Optional[str] = typer.Option(None, help="libFM: the field of each token, comma-separated."),
    model: str = typer.Option("deepfm", help="Model name (see the README's model table): lr, fm, ffm, deepfm, dcnv2, ..."),
    out: Path = typer.Option(..., help="Output folder: bundle/ and metrics.json are written there."),
    epochs: Optional[int] = typer.Option(None, help="Maximum epochs (early stopping decides)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size (default: 4096, or less on small data so "
                                                       "an epoch has about 32 steps)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default per model)."),
    embed_dim: Optional[int] = typer.Option(None, help="Embedding size (default per model)."),
    settings: Optional[list[str]] = typer.Option(None, "--set", help="A model setting KEY=VALUE (a YAML value), "
                                                 "repeatable: --set fm=false --set hidden=[256,128]."),
    seed: int = typer.Option(0, help="Random seed; CPU runs repeat exactly."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    precision: str = typer.Option("auto", help="auto (bf16 autocast on GPUs, and on CPUs with bf16 units from "
                                                "1M training rows; else fp32), fp32 or bf16."),
    large_batch: str = typer.Option("auto", help="Large-batch rule: rows (each embedding row's LR times its uses "
                                                 "in the batch, dense LR times sqrt(batch/4096)), cowclip (the "
                                                 "CowClip paper's rule), off, or auto (rows above batch 4096 on a "
                                                 "GPU)."),
    compile_step: str = typer.Option("auto", "--compile", help="Compile the training step: on, off, auto (on "
                                                               "a GPU), or max (on, with autotuned matrix products: "
                                                               "a faster step for a minute more of compilation)."),
    optimizer: Optional[str] = typer.Option(None, help="adam, adagrad or rowwise_adagrad (one accumulator per "
                                                      "embedding row: the state of a huge table stays small); "
                                                      "default per model: adam."),
    embedding_backend: str = typer.Option("plain", help="plain (ctrkit's tables) or torchrec (tables sharded "
                                                        "row-wise over the ranks by TorchRec, FBGEMM's fused "
                                                        "optimizer; needs the torchrec extra)."),
    bad_rows: Optional[Path] = typer.Option(None, help="Keep rejected training rows (original line, line number, "
                                                      "reason) in this file."),
    loss: str = typer.Option("bce", help="bce, weighted (positives count --pos-weight times) or focal."),
    pos_weight: str = typer.Option("auto", help="--loss weighted: weight of a positive; auto = negatives/positives."),
    focal_alpha: float = typer.Option(0.25, help="--loss focal: weight of the positive class."),
    focal_gamma: float = typer.Option(2.0, help="--loss focal: focusing exponent."),
    neg_sample_rate: float = typer.Option(1.0, help="Keep this fraction of negatives (all positives); the bundle "
                                                     "corrects the odds exactly."),
    calibrate: str = typer.Option("auto", help="none, platt, isotonic, cir (centred isotonic: keeps "
                                               "the model's order) or auto (lowest cross-validated logloss on the "
                                               "validation rows)."),
    split: str = typer.Option("auto", help="How validation is cut from TRAIN without --valid: time, random or "
                                           "group (auto: time when the schema has one)."),
    report_by: Optional[str] = typer.Option(None, help="Categorical fields for per-segment AUC and pred/actual "
                                                       "in report.html, comma-separated."),
    checkpoint_every: int = typer.Option(0, help="Also checkpoint every N steps (each epoch always)."),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoints where a run stopped."),
    ensemble: int = typer.Option(1, help="Train N models of MODEL with seeds SEED..SEED+N-1 and serve the mean "
                                         "of their logits (N times the training and scoring time)."),
    distill: Optional[Path] = typer.Option(None, help="A teacher bundle (an --ensemble run on the same TRAIN and "
                                                      "schema): MODEL learns its probabilities of the training "
                                                      "rows, and serves at one model's cost."),
    distill_weight: float = typer.Option(1.0, help="--distill: the teacher's share of each training target "
                                                   "(1: the teacher's probability alone; 0.5: half the label)."),
    distill_transfer: float = typer.Option(1.0, help="--distill: transfer rows per training row, labelled by the "
                                                     "teacher alone: training rows with 30% of their fields "
                                                     "swapped between rows (0: none; each adds an epoch's worth "
                                                     "of rows, held in memory)."),
    quiet: bool = typer.Option(False, help="No progress bars; only the one-line report of rejected rows."),
) -> None:
    """Train MODEL on TRAIN and write a bundle, metrics.json and report.html to OUT."""
    from ctrkit.data.readers import ReadReport
    from ctrkit.pipeline import train as run_train

    field_list = [f.strip() for f in fields.split(",") if f.strip()] if fields else None
    options = {}
    for item in settings or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            _fail(f"--set {item!r}: expected KEY=VALUE, e.g. --set fm=false")
        parsed = yaml.safe_load(value)
        try:  # YAML 1.1 reads a number without a dot, such as 1e-5, as a string
            options[key.strip()] = float(parsed) if isinstance(parsed, str) else parsed
        except ValueError:
            options[key.strip()] = parsed
    try:
        pw: float | str = pos_weight if pos_weight == "auto" else float(pos_weight)
    except ValueError:
        _fail(f"--pos-weight must be 'auto' or a number, got {pos_weight!r}")
    try:
        data = _event_log_rows(train_file, schema)
        run = run_train(data, schema=schema, valid=valid, test=test, model=model, out=out, fmt=fmt,
                        fields=field_list, epochs=epochs, batch_size=batch_size, lr=lr, embed_dim=embed_dim,
                        seed=seed, device=device, bad_rows=bad_rows, progress=not quiet, model_options=options,
                        train_options={"precision": precision, "large_batch": large_batch,
                                       "compile": compile_step, "focal_alpha": focal_alpha,
                                       "focal_gamma": focal_gamma,
                                       **({"optimizer": optimizer} if optimizer else {})},
                        embedding_backend=embedding_backend,
                        loss=loss, pos_weight=pw, neg_sample_rate=neg_sample_rate, calibrate=calibrate,
                        split=split, report_by=[f.strip() for f in report_by.split(",")] if report_by else None,
                        checkpoint_every=checkpoint_every, resume=resume, ensemble=ensemble,
                        distill=distill, distill_weight=distill_weight, distill_transfer=distill_transfer,
                        log=None if quiet else lambda line: err.print(line, markup=False, highlight=False))
    except USER_ERRORS as exc:
        _fail(str(exc))
    from ctrkit.training.distributed import world
    if not world().main:
        return  # under torchrun, rank 0 reports the run
    if quiet:
        reports = run.reports.values()
        rejected = [r for r in reports if r["bad_rows"]]
        line = "; ".join(ReadReport.from_dict(r).summary() for r in rejected) if rejected else \
            f"{sum(r['rows'] for r in reports):,} rows read, none rejected"
        err.print(line, markup=False, highlight=False)
    m = run.metrics
    rows = {k: m[k] for k in ("valid", "test") if k in m}
    tr = m["train"]
    name = f"{model} x{ensemble}" if ensemble > 1 else model
    best = ", ".join(map(str, tr["best_epoch"])) if ensemble > 1 else tr["best_epoch"]
    Console().print(_metrics_table(rows, f"{name}: {tr['epochs']} epochs, best {best}, "
                                         f"{tr['samples_per_s']:,.0f} samples/s"))
    err.print(f"bundle: {out / 'bundle'}   metrics: {out / 'metrics.json'}   report: {out / 'report.html'}")


@app.command()
def tune(train_file: Path = typer.Argument(..., metavar="TRAIN", help="Training data, as for `ctrkit train`."),
         valid: Optional[Path] = typer.Option(None, help="Validation file the trials are compared on; if omitted, "
                                                         "cut from TRAIN as `ctrkit train` does."),
         test: Optional[Path] = typer.Option(None, help="Test file, evaluated once, on the best settings only."),
         schema: Optional[Path] = typer.Option(None, help="Schema YAML (see `ctrkit schema infer`)."),
         model: str = typer.Option("deepfm", help="The model whose settings are searched."),
         out: Path = typer.Option(..., help="Output folder: the best settings' bundle, metrics.json, report.html and "
                                            "tune.json (every trial)."),
         trials: int = typer.Option(20, help="Number of trials."),
         timeout: Optional[float] = typer.Option(None, help="Stop starting trials after this many seconds."),
         metric: str = typer.Option("auc", help="auc or logloss, on the validation rows."),
         space: Optional[Path] = typer.Option(None, help="Search space YAML (name: [choices] or name: {low, high, "
                                                         "log}); default: lr, embed_dim, emb_l2, dropout."),
         epochs: Optional[int] = typer.Option(None, help="Maximum epochs of each trial (early stopping decides)."),
         seed: int = typer.Option(0, help="Seed of the sampler and of every trial's model."),
         device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
         fmt: Optional[str] = typer.Option(None, "--format", help="csv, tsv, parquet or libfm."),
         storage: Optional[str] = typer.Option(None, help="Keep every finished trial in this SQLite file (or Optuna "
                                                          "storage URL): run again, a stopped search goes on."),
         study: Optional[str] = typer.Option(None, help="The study's name in --storage (default "
                                                        "ctrkit-MODEL-METRIC)."),
         quiet: bool = typer.Option(False, "--quiet", help="Only the final table.")) -> None:
    """Search MODEL's settings on one encode of TRAIN (Optuna's TPE sampler), compare the trials on the validation
    rows, and train the best into OUT; the test rows judge only the best."""
    from ctrkit.tune import load_space, tune as run_tune

    try:
        result = run_tune(train_file, schema=schema, valid=valid, test=test, model=model, out=out, trials=trials,
                          timeout=timeout, metric=metric, space=load_space(space) if space else None, seed=seed,
                          device=device, epochs=epochs, fmt=fmt, storage=storage, study_name=study,
                          log=None if quiet else lambda line: err.print(line, markup=False, highlight=False))
    except (*USER_ERRORS, ImportError) as exc:
        _fail(str(exc))
    pruned = sum(1 for t in result.trials if t.get("pruned"))
    table = Table(title=f"{model}: {len(result.trials)} trials{f' ({pruned} pruned)' if pruned else ''}, "
                        f"validation {metric} (best first)")
    table.add_column("trial", justify="right")
    table.add_column(metric, justify="right")
    table.add_column("settings")
    ranked = sorted((t for t in result.trials if not t.get("pruned")), key=lambda t: t[metric],
                    reverse=metric == "auc")
    for t in ranked[:10]:
        table.add_row(str(t["number"] + 1), f"{t[metric]:.5f}",
                      ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items())
                      or "the defaults")
    Console().print(table)
    assert result.run is not None
    m = result.run.metrics
    Console().print(_metrics_table({k: m[k] for k in ("valid", "test") if k in m}, f"{model}, best settings"))
    err.print(f"bundle: {out / 'bundle'}   trials: {out / 'tune.json'}   report: {out / 'report.html'}")


@app.command()
def calibrate(bundle: Path = typer.Argument(..., help="A bundle folder."),
              data: Path = typer.Argument(..., help="Newer labelled data in the bundle's schema."),
              out: Path = typer.Option(..., help="Folder of the new bundle version."),
              method: str = typer.Option("auto", help="platt, isotonic, cir, none or auto (lowest "
                                                      "cross-validated logloss)."),
              fmt: Optional[str] = typer.Option(None, "--format", help="csv, tsv, parquet or libfm.")) -> None:
    """Refit BUNDLE's calibrator on DATA and save it as a new bundle version at OUT (weights unchanged)."""
    from ctrkit.pipeline import recalibrate

    try:
        new = recalibrate(bundle, data, out, method, **({"fmt": fmt} if fmt else {}))
    except USER_ERRORS as exc:
        _fail(str(exc))
    r = new.metrics["recalibration"]
    Console().print(_metrics_table({"before": r["before"], "after (in-sample)": r["after_in_sample"]},
                                   f"{new.calibrator.method} calibration on {data.name}, version "
                                   f"{new.info['version']}"))
    err.print(f"bundle: {out}")
    if (bundle / "model.onnx").exists():  # the exported graphs end in the calibrator they were exported with
        err.print(f"{bundle}'s ONNX graphs hold its old calibrator and were not copied: `ctrkit export {out}` "
                  "makes the new version's")


@app.command()
def refresh(bundle: Path = typer.Argument(..., help="A bundle folder whose schema has stats."),
            data: Path = typer.Argument(..., help="The labelled log since training (or since the last refresh), in "
                                                  "the bundle's schema, or a `ctrkit serve` event log."),
            out: Path = typer.Option(..., help="Folder of the new bundle version."),
            fmt: Optional[str] = typer.Option(None, "--format", help="csv, tsv, parquet or libfm.")) -> None:
    """Roll BUNDLE's rolling click statistics forward over DATA and save a new bundle version at OUT (weights,
    vocabularies and calibrator unchanged): served rows then see their history up to DATA's newest row."""
    from ctrkit.pipeline import refresh_stats

    try:
        new = refresh_stats(bundle, data, out, **({"fmt": fmt} if fmt else {}))
    except USER_ERRORS as exc:
        _fail(str(exc))
    r = new.metrics["stats_refresh"]
    table = Table(title=f"stats of {bundle.name} rolled forward over {data.name} ({r['rows']:,} rows, "
                        f"{r['bad_rows']:,} bad), version {new.info['version']}")
    for col in ("stat", "window", "rows counted", "ids with history", "note"):
        table.add_column(col)
    for change, now in zip(r["stats"], r["snapshot"]["stats"]):
        counted = change.get("rows_added", change.get("rows_in_window"))
        table.add_row(change["columns"][0], now["window"] or "all history",
                      f"{counted:,}" + (" added" if "rows_added" in change else " in window"),
                      f"{now['ids_with_history']:,}", str(change.get("warning", "")))
    Console().print(table)
    err.print(f"bundle: {out}")


@app.command()
def report(run: Path = typer.Argument(..., help="A training run folder (the --out of ctrkit train).")) -> None:
    """Re-render RUN/report.html from the run's metrics.json and report_data.npz."""
    from ctrkit.evaluate.report import render_report

    try:
        path = render_report(run)
    except (*USER_ERRORS, KeyError) as exc:
        _fail(str(exc))
    err.print(f"report: {path}")


@app.command()
def evaluate(bundle: Path = typer.Argument(..., help="A bundle folder."),
             file: Path = typer.Argument(..., help="Labelled data in the bundle's schema."),
             as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
             fmt: Optional[str] = typer.Option(None, "--format", help="csv, tsv, parquet or libfm.")) -> None:
    """Score FILE with BUNDLE and print AUC, logloss, calibration (bad rows are counted and reported)."""
    from ctrkit.serve.bundle import Bundle

    try:
        b = Bundle.load(bundle)
        metrics, report = b.evaluate(file, **({"fmt": fmt} if fmt else {}))
    except USER_ERRORS as exc:
        _fail(str(exc))
    err.print(report.summary(), markup=False, highlight=False)
    if as_json:
        sys.stdout.write(json.dumps(_clean({**metrics, "bad_rows": report.bad_rows}), indent=1) + "\n")
        return
    Console().print(_metrics_table({file.name: metrics}, f"{b.model_name} on {file.name}"))


@app.command()
def predict(bundle: Path = typer.Argument(..., help="A bundle folder."),
            file: Path = typer.Argument(..., help="Records to score (the label column is not needed)."),
            out: Path = typer.Option(..., help="Output .csv or .parquet: one row per input row, in order."),
            keep: Optional[str] = typer.Option(None, help="Input columns (any, e.g. an id) to copy next to the score, "
                                                          "comma-separated."),
            fmt: Optional[str] = typer.Option(None, "--format", help="csv, tsv, parquet or libfm.")) -> None:
    """Write the click probability (column `pctr`) of every row of FILE to OUT, streaming: chunk by chunk on
    every core, on the bundle's fastest model path (torch or its exported ONNX graphs)."""
    import os

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from ctrkit.serve.bundle import Bundle
    from ctrkit.serve.scorer import Scorer

    if out.suffix not in (".csv", ".parquet"):
        _fail(f"--out must end in .csv or .parquet, got {out.name}")
    if out.is_dir():
        _fail(f"--out {out} is a folder; give a .csv or .parquet file name")
    cols = list(dict.fromkeys(c.strip() for c in keep.split(",") if c.strip())) if keep else []
    if "pctr" in cols:
        _fail("--keep: 'pctr' is the name of the score column")
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = [SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.completed:,} rows"),
               TimeElapsedColumn()]
    with Progress(*columns, console=err, transient=True) as bar:
        try:
            scorer = Scorer(Bundle.load(bundle), bundle, threads=os.cpu_count() or 1, rows=8192, reps=3)
            task = bar.add_task(f"scoring ({scorer.backend})", total=None)
            report = scorer.score_file(file, out, cols, lambda n: bar.advance(task, n), **({"fmt": fmt} if fmt else {}))
        except USER_ERRORS as exc:
            _fail(str(exc) if not keep or "missing columns" not in str(exc) else f"--keep: {exc}")
    err.print(f"{report.rows:,} rows scored ({scorer.backend}) -> {out}")


@app.command()
def explain(bundle: Path = typer.Argument(..., help="A bundle folder."),
            file: Path = typer.Argument(..., help="Records in the bundle's schema (the label is needed for "
                                                  "permutation importance)."),
            method: str = typer.Option("auto", help="weights (what AutoInt, FAT, FiBiNET, DCN show), permutation "
                                                    "(any model: AUC lost when a column is shuffled) or auto "
                                                    "(weights where the model has them)."),
            rows: int = typer.Option(100_000, help="Explain the first ROWS rows."),
            top: int = typer.Option(10, help="How many field pairs to list."),
            repeats: int = typer.Option(3, help="Shuffles per column (permutation)."),
            seed: int = typer.Option(0, help="Seed of the shuffles (permutation)."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
            fmt: Optional[str] = typer.Option(None, "--format", help="csv, tsv, parquet or libfm.")) -> None:
    """Rank the fields (and field pairs) by what the model shows: AutoInt / FAT attention, FiBiNET's SENet
    gates, DCN's cross weights; for any model, by the AUC it loses when a field is shuffled."""
    from ctrkit.evaluate.explain import explain_bundle, permutation_importance, shows_weights
    from ctrkit.serve.bundle import Bundle

    if method not in ("auto", "weights", "permutation"):
        _fail(f"--method must be auto, weights or permutation, got {method!r}")
    read = {"fmt": fmt} if fmt else {}
    try:
        loaded = Bundle.load(bundle)
        if method == "permutation" or (method == "auto" and not shows_weights(loaded.model)):
            shuffled = permutation_importance(loaded, file, max_rows=rows, repeats=repeats, seed=seed, **read)
        else:
            result = explain_bundle(loaded, file, max_rows=rows, top=top, **read)
            shuffled = None
    except USER_ERRORS as exc:
        _fail(str(exc))
    if shuffled is not None:
        _print_importance(shuffled, as_json)
        return
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=1) + "\n")
        return
    table = Table(title=f"{result.model}: {result.kind}, {result.rows:,} rows")
    table.add_column("rank", justify="right")
    table.add_column("field")
    table.add_column("score", justify="right")
    for rank, (name, score) in enumerate(result.fields, 1):
        table.add_row(str(rank), name, f"{score:.6g}")
    Console().print(table)
    if result.pairs:
        pairs = Table(title="top field pairs")
        pairs.add_column("rank", justify="right")
        pairs.add_column("pair")
        pairs.add_column("score", justify="right")
        for rank, (a, b, score) in enumerate(result.pairs, 1):
            pairs.add_row(str(rank), f"{a} x {b}", f"{score:.6g}")
        Console().print(pairs)


def _print_importance(result: Any, as_json: bool) -> None:
    """A permutation importance as a table (or JSON): AUC drop and logloss rise per field, mean ± std."""
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=1) + "\n")
        return
    table = Table(title=f"{result.model}: permutation importance, {result.rows:,} rows, {result.repeats} shuffles "
                        f"(AUC {result.auc:.5f}, logloss {result.logloss:.5f})")
    table.add_column("rank", justify="right")
    table.add_column("field")
    table.add_column("AUC drop", justify="right")
    table.add_column("logloss rise", justify="right")
    for rank, r in enumerate(result.fields, 1):
        table.add_row(str(rank), r["field"], f"{r['auc_drop']:.5f} ± {r['auc_drop_std']:.5f}",
                      f"{r['logloss_rise']:.5f} ± {r['logloss_rise_std']:.5f}")
    Console().print(table)


@app.command()
def serve(bundle: Path = typer.Argument(..., help="A bundle folder."),
          host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
          port: int = typer.Option(8000, min=0, max=65535, help="TCP port (0: any free one)."),
          events: Optional[Path] = typer.Option(None, help="Event log folder: shown items, clicks, conversions."),
          token: Optional[str] = typer.Option(None, envvar="CTRKIT_TOKEN",
                                              help="Require 'Authorization: Bearer TOKEN' on every route but /health."),
          segments: Optional[str] = typer.Option(None, help="Fields to monitor pred/actual by, comma-separated."),
          max_batch: int = typer.Option(10_000, help="Most records or candidates per request."),
          seed: Optional[int] = typer.Option(None, help="Seed of the exploration draws."),
          threads: Optional[int] = typer.Option(None, help="Torch / ONNX Runtime threads per request (default: "
                                                          "the machine's cores shared among the workers)."),
          workers: int = typer.Option(1, help="Server processes sharing the port (and the event log: one writer "
                                              "slot each, read as one log)."),
          watch: float = typer.Option(0.0, help="Reload BUNDLE when its files change, checking every WATCH "
                                                "seconds (0: only on POST /admin/reload)."),
          device: str = typer.Option("cpu", help="cpu, or cuda to score on the GPU from CUDA graphs (the fastest "
                                                 "path serves; /health says which)."),
          log_level: str = typer.Option("warning", help="uvicorn log level.")) -> None:
    """Serve BUNDLE over HTTP: /score, /rank, /events, /health, /metrics, /admin/reload (docs at /docs)."""
    import os
    import shutil
    import tempfile

    # torch's OpenMP threads, idle between requests, sleep instead of spinning (read when torch loads): a spinning
    # thread took its core from the event log's writer and the next request, and one request in a hundred waited
    # for it (p99 of /rank on 2 cores 17.0 ms spinning, 7.6 ms sleeping, p50 6.5 and 6.3; ONNX Runtime's are set so)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads is None:  # one request at a time per process: its model may use every core the process has
        threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    try:
        import uvicorn
        import torch

        from ctrkit.serve.app import ServerConfig, check_segments, create_app, exposure_warning
        from ctrkit.serve.bundle import Bundle
    except ImportError as exc:
        _fail(str(exc))
    seg = tuple(s.strip() for s in segments.split(",") if s.strip()) if segments else ()
    try:
        config = ServerConfig(bundle=bundle, events=events, token=token, max_batch=max_batch, segments=seg,
                              seed=seed, threads=threads, watch=watch, workers=workers, device=device)
    except ValueError as exc:
        _fail(str(exc))
    torch.set_num_threads(threads)
    try:  # with several processes, the bundle is checked here once so that a bad one fails before they start
        api = create_app(config) if workers == 1 else check_segments(Bundle.load(bundle), seg)
    except USER_ERRORS as exc:
        _fail(str(exc))
    err.print(f"serving {bundle} on http://{host}:{port} with {workers} process(es) (docs: /docs)")
    if (warning := exposure_warning(host, token)) is not None:
        err.print(warning, markup=False, highlight=False)
    if api is not None:
        uvicorn.run(api, host=host, port=port, log_level=log_level, access_log=False)
        return
    from ctrkit.serve.app import ENV_CONFIG, METRICS_DIR_ENV

    os.environ[ENV_CONFIG] = config.to_env()
    # the workers' metrics meet in one folder, so that a scrape answered by any of them counts them all
    own_dir = None if os.environ.get(METRICS_DIR_ENV) else tempfile.mkdtemp(prefix="ctrkit-metrics-")
    if own_dir is not None:
        os.environ[METRICS_DIR_ENV] = own_dir
    try:
        uvicorn.run("ctrkit.serve.app:app_from_env", factory=True, workers=workers, host=host, port=port,
                    log_level=log_level, access_log=False)
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)


@app.command()
def monitor(log: Path = typer.Argument(..., help="An event log folder written by `ctrkit serve --events`."),
            bundle: Path = typer.Option(..., help="The bundle served: its validation pCTR is the PSI reference."),
            segments: Optional[str] = typer.Option(None, help="Columns to break pred/actual down by, comma-separated."),
            windows: int = typer.Option(10, help="Equal time windows over the log."),
            min_clicks: int = typer.Option(30, help="Clicks a ratio needs before it can raise an alert."),
            out: Path = typer.Option(Path("monitor.html"), help="HTML report to write."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON for machines.")) -> None:
    """Rolling pred/actual (alerts outside [0.8, 1.2]) and PSI of pCTR against training, from an event log."""
    from ctrkit.serve.bundle import Bundle
    from ctrkit.serve.monitor import html_report, monitor_log

    seg = [s.strip() for s in segments.split(",") if s.strip()] if segments else []
    if out.suffix.lower() not in (".html", ".htm"):  # never over a log or a bundle's file
        _fail(f"--out {out} must end in .html")
    try:
        res = monitor_log(log, Bundle.load(bundle), seg, windows, min_clicks)
    except USER_ERRORS as exc:
        _fail(str(exc))
    html_report(res, out)
    if as_json:
        sys.stdout.write(json.dumps(_clean(res), indent=1) + "\n")
    else:
        t = res["total"]
        table = Table(title=f"{log}: {res['impressions']:,} impressions, {res['clicks']:,} clicks")
        for col in ("window", "impressions", "clicks", "pred/actual", "PSI", "alert"):
            table.add_column(col, justify="right")
        for r in res["windows"]:
            table.add_row(str(r["window"]), f"{r['impressions']:,}", f"{r['clicks']:,}", f"{r['ratio']:.3f}",
                          "-" if r["psi"] is None else f"{r['psi']:.3f}", "ALERT" if r["alert"] else "")
        Console().print(table)
        psi_text = "-" if t["psi"] is None else f"{t['psi']:.3f}"
        Console().print(f"overall pred/actual {t['overall']['ratio']:.3f}, PSI {psi_text}")
        for name, h in list(res["heads"].items())[1:]:
            Console().print(f"head {name}: pred/actual {h['total']['ratio']:.3f} ({h['total']['clicks']:,} events)")
        for line in res["alerts"]:
            err.print(f"[bold red]alert:[/] {line}")
    err.print(f"report: {out}")


@app.command()
def retrain(events: Path = typer.Option(..., help="Event log folder written by `ctrkit serve --events`."),
            base: Path = typer.Option(..., help="The bundle being served."),
            out: Path = typer.Option(..., help="Where the new bundle goes if it is promoted."),
            holdout: float = typer.Option(0.2, help="Most recent share of the log kept aside to compare on."),
            ips: bool = typer.Option(False, "--ips/--no-ips",
                                     help="Learn relevance: correct the examination bias of the logged positions."),
            em_steps: int = typer.Option(1, help="With --ips: regression-EM steps (one training each)."),
            candidates: Optional[Path] = typer.Option(None, help="Every candidate of the logged requests (CSV/Parquet, "
                                                                 "request_id + features): also require a better "
                                                                 "off-policy top-slot CTR to promote."),
            epochs: Optional[int] = typer.Option(None, help="Maximum epochs (early stopping decides)."),
            seed: int = typer.Option(0, help="Random seed."),
            rule: str = typer.Option("better", help="Promote when the candidate is 'better' on the point "
                                                    "estimates, or 'not_worse': unless worse beyond the noise."),
            alpha: float = typer.Option(0.05, help="With --rule not_worse: the one-sided test's level."),
            refit: bool = typer.Option(False, "--refit/--no-refit",
                                       help="Retrain a candidate that passes on the whole log, the held-out "
                                            "window included, and promote that.")) -> None:
    """Train on the served traffic, compare with BASE on the recent window, promote only if better."""
    from ctrkit.serve.retrain import retrain as run_retrain

    try:
        res = run_retrain(events, base, out, holdout=holdout, ips=ips, em_steps=em_steps, candidates=candidates,
                          epochs=epochs, seed=seed, rule=rule, alpha=alpha, refit=refit)
    except USER_ERRORS as exc:
        _fail(str(exc))
    Console().print(_metrics_table({"base": res.base, "candidate": res.candidate}, "held-out recent window"))
    err.print(res.reason)
    if res.promoted:
        err.print(f"new bundle: {out}  (hot swap: POST /admin/reload {{\"path\": \"{out}\"}})")


@app.command("export")
def export_cmd(bundle: Path = typer.Argument(..., help="A bundle folder."),
               onnx: bool = typer.Option(True, "--onnx/--no-onnx", help="Write the model as ONNX."),
               out: Optional[Path] = typer.Option(None, help="Folder for model.onnx (default: the bundle folder)."),
               valid: Optional[Path] = typer.Option(None, help="Labelled rows: INT8 and bf16 serve only if AUC holds."),
               max_auc_drop: float = typer.Option(0.0005, help="Largest AUC loss INT8 or bf16 may cost."),
               fmt: Optional[str] = typer.Option(None, "--format", help="Format of --valid.")) -> None:
    """Export BUNDLE's model to ONNX (pre-encoded ids/dense in, pCTR out), plus INT8 and bf16 forms where they
    keep AUC."""
    if not onnx:
        _fail("nothing to export: --onnx is the only export format")
    try:
        from ctrkit.serve.export import export_bundle

        res = export_bundle(bundle, out, valid, max_auc_drop, **({"fmt": fmt} if fmt else {}))
    except (ImportError, *USER_ERRORS) as exc:
        _fail(str(exc))
    err.print(res.decision)
    sys.stdout.write(json.dumps(res.to_dict(), indent=1) + "\n")


@app.command()
def models(name: Optional[str] = typer.Argument(None, help="A model: list every setting a run of it uses unless "
                                                            "told otherwise."),
           as_json: bool = typer.Option(False, "--json", help="The default settings as JSON: NAME's, or every "
                                                               "model's by name.")) -> None:
    """List the model zoo, a line each; NAME lists that model's default settings (--json: for machines)."""
    import ctrkit.models  # noqa: F401
    from ctrkit.models.base import model_class, model_names, model_summary

    if name is not None:
        try:
            name = model_class(name).name
        except ValueError as exc:
            _fail(str(exc))
    if as_json:
        doc = resolved_defaults(name) if name else {n: resolved_defaults(n) for n in model_names()}
        sys.stdout.write(json.dumps(doc, indent=1) + "\n")
        return
    if name is None:
        table = Table(title="models (`ctrkit models NAME`: its default settings)")
        table.add_column("name", no_wrap=True)
        table.add_column("model")
        for n in model_names():
            table.add_row(n, model_summary(n))
    else:
        table = Table(title=model_summary(name))
        table.add_column("setting", no_wrap=True)
        table.add_column("default (a run uses it unless told otherwise)")
        for key, value in resolved_defaults(name).items():
            table.add_row(key, value if isinstance(value, str) else json.dumps(value))
    Console().print(table)


def resolved_defaults(name: str) -> dict[str, Any]:
    """A model's default settings as a run resolves them; the ones that depend on the data say how."""
    from dataclasses import asdict

    from ctrkit.models.base import BATCH_L2, SMALL_TABLE, TABLE_L2, default_config, model_class
    from ctrkit.training.trainer import TrainConfig

    cls = model_class(name)
    cfg = default_config(name).to_dict()
    table_l2 = TABLE_L2 if cfg["table_l2"] is None else cfg["table_l2"]
    if cfg["emb_l2"] is None:
        cfg["emb_l2"] = (f"{table_l2:g} on the whole table up to {SMALL_TABLE:,} embedding parameters, "
                         f"else {BATCH_L2:g} on the rows of each batch")
    if cfg["table_l2"] is None:
        cfg["table_l2"] = TABLE_L2
    if cfg["emb_l2_scope"] == "auto":
        cfg["emb_l2_scope"] = f"table up to {SMALL_TABLE:,} embedding parameters, else batch"
    if cfg["sparse_grad"] is None:
        cfg["sparse_grad"] = f"true above {SMALL_TABLE:,} embedding parameters"
    if cfg["linear_l2"] is None:
        cfg["linear_l2"] = "chosen with the first-order weights under 100,000 training rows, else emb_l2"
    train = {k: v for k, v in asdict(TrainConfig()).items()
             if k in ("epochs", "batch_size", "lr", "optimizer", "patience")}
    train = {**train, **cls.train_defaults}
    train["batch_size"] = f"{train['batch_size']}, or less on small data (about 32 steps an epoch, >= 64)"
    return {**cfg, **train}


def main() -> None:
    """Entry point for ``python -m ctrkit``."""
    app()


if __name__ == "__main__":
    main()
