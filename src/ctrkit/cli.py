"""The ``ctrkit`` command: thin wrappers that parse arguments, call the library and print."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from ctrkit.data.readers import DataError
from ctrkit.measure.cli import app as measure_app
from ctrkit.schema import SchemaError

app = typer.Typer(help="Click-through-rate prediction and measurement.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
schema_app = typer.Typer(help="Describe the columns of a click log.", no_args_is_help=True)
app.add_typer(schema_app, name="schema")
err = Console(stderr=True, soft_wrap=True)


app.add_typer(measure_app, name="measure")


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}")
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
def schema_infer(file: Path = typer.Argument(..., help="CSV/TSV/Parquet file with a header line."),
                 label: Optional[str] = typer.Option(None, help="The label column (guessed if omitted)."),
                 rows: int = typer.Option(100_000, help="Rows to sample.")) -> None:
    """Guess a schema from a sample of FILE and print it as YAML (edit it, then pass it to train)."""
    from ctrkit.schema import infer_schema

    try:
        sch = infer_schema(file, label=label, sample_rows=rows)
    except (SchemaError, DataError, FileNotFoundError) as exc:
        _fail(str(exc))
    sys.stdout.write(sch.to_yaml())


@app.command()
def train(
    train_file: Path = typer.Argument(..., metavar="TRAIN", help="Training data (CSV/TSV/Parquet/libFM, .gz ok)."),
    valid: Optional[Path] = typer.Option(None, help="Validation file; if omitted, cut from TRAIN (by time if the schema has one)."),
    test: Optional[Path] = typer.Option(None, help="Test file, evaluated once at the end."),
    schema: Optional[Path] = typer.Option(None, help="Schema YAML (see `ctrkit schema infer`)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="csv, tsv, parquet or libfm (default: from the file name)."),
    fields: Optional[str] = typer.Option(None, help="libFM: the field of each token, comma-separated."),
    model: str = typer.Option("deepfm", help="Model name: lr, fm, deepfm."),
    out: Path = typer.Option(..., help="Output folder: bundle/ and metrics.json are written there."),
    epochs: Optional[int] = typer.Option(None, help="Maximum epochs (early stopping decides)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size (default 4096)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default per model)."),
    embed_dim: Optional[int] = typer.Option(None, help="Embedding size (default per model)."),
    seed: int = typer.Option(0, help="Random seed; CPU runs repeat exactly."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    precision: str = typer.Option("auto", help="auto (bf16 autocast on CPUs with bf16 units, else fp32), fp32 or bf16."),
    bad_rows: Optional[Path] = typer.Option(None, help="Write unparseable training rows to this file."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Train MODEL on TRAIN and write a bundle plus metrics.json to OUT."""
    from ctrkit.pipeline import train as run_train

    field_list = [f.strip() for f in fields.split(",") if f.strip()] if fields else None
    try:
        run = run_train(train_file, schema=schema, valid=valid, test=test, model=model, out=out, fmt=fmt,
                        fields=field_list, epochs=epochs, batch_size=batch_size, lr=lr, embed_dim=embed_dim,
                        seed=seed, device=device, bad_rows=bad_rows, progress=not quiet,
                        train_options={"precision": precision},
                        log=None if quiet else err.print)
    except (SchemaError, DataError, FileNotFoundError, ValueError, RuntimeError) as exc:
        _fail(str(exc))
    m = run.metrics
    rows = {k: m[k] for k in ("valid", "test") if k in m}
    Console().print(_metrics_table(rows, f"{model}: {m['train']['epochs']} epochs, best {m['train']['best_epoch']}, "
                                         f"{m['train']['samples_per_s']:,.0f} samples/s"))
    err.print(f"bundle: {out / 'bundle'}   metrics: {out / 'metrics.json'}")


@app.command()
def evaluate(bundle: Path = typer.Argument(..., help="A bundle folder."),
             file: Path = typer.Argument(..., help="Labelled data in the bundle's schema."),
             as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
             fmt: Optional[str] = typer.Option(None, "--format", help="csv, tsv, parquet or libfm.")) -> None:
    """Score FILE with BUNDLE and print AUC, logloss, calibration (bad rows are counted and reported)."""
    from ctrkit.serve.bundle import Bundle, BundleError

    try:
        b = Bundle.load(bundle)
        metrics, report = b.evaluate(file, **({"fmt": fmt} if fmt else {}))
    except (BundleError, SchemaError, DataError, FileNotFoundError) as exc:
        _fail(str(exc))
    if as_json:
        sys.stdout.write(json.dumps(_clean({**metrics, "bad_rows": report.bad_rows}), indent=1) + "\n")
        return
    Console().print(_metrics_table({file.name: metrics}, f"{b.model_name} on {file.name}"))
    if report.bad_rows:
        err.print(f"[yellow]{report.summary()}[/]")


@app.command()
def predict(bundle: Path = typer.Argument(..., help="A bundle folder."),
            file: Path = typer.Argument(..., help="Records to score (the label column is not needed)."),
            out: Path = typer.Option(..., help="Output .csv or .parquet: one row per input row, in order."),
            keep: Optional[str] = typer.Option(None, help="Input columns to copy next to the score, comma-separated."),
            fmt: Optional[str] = typer.Option(None, "--format", help="csv, tsv, parquet or libfm.")) -> None:
    """Write the click probability (column `pctr`) of every row of FILE to OUT."""
    import polars as pl

    from ctrkit.data.readers import read_frame
    from ctrkit.schema import Schema
    from ctrkit.serve.bundle import Bundle, BundleError

    if out.suffix not in (".csv", ".parquet"):
        _fail(f"--out must end in .csv or .parquet, got {out.name}")
    try:
        b = Bundle.load(bundle)
        kwargs = {"fmt": fmt} if fmt else {}
        p = b.predict_file(file, **kwargs)
        heads = b.schema.label_columns
        frame = pl.DataFrame({"pctr": p} if p.ndim == 1 else {f"p_{h}": p[:, t] for t, h in enumerate(heads)})
        if keep:
            cols = [c.strip() for c in keep.split(",") if c.strip()]
            sch = Schema(fields=b.schema.fields, label=b.schema.label, columns=b.schema.columns)
            kept, _ = read_frame(file, sch, with_label=False, **kwargs)
            missing = [c for c in cols if c not in kept.columns]
            if missing:
                _fail(f"--keep: columns {missing} are not among the bundle's fields {kept.columns}")
            frame = pl.concat([kept.select(cols), frame], how="horizontal")
    except (BundleError, SchemaError, DataError, FileNotFoundError) as exc:
        _fail(str(exc))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        frame.write_csv(out)
    else:
        frame.write_parquet(out)
    err.print(f"{len(p):,} rows scored -> {out}")


@app.command()
def models() -> None:
    """List the available models with their default settings."""
    import ctrkit.models  # noqa: F401
    from ctrkit.models.base import default_config, model_class, model_names

    table = Table(title="models")
    table.add_column("name")
    table.add_column("defaults")
    for name in model_names():
        cls = model_class(name)
        table.add_row(name, json.dumps({**default_config(name).to_dict(), **cls.train_defaults}))
    Console().print(table)


def main() -> None:
    """Entry point for ``python -m ctrkit``."""
    app()


if __name__ == "__main__":
    main()
