"""``make demo``: a synthetic click log -> LR, FM and DeepFM -> comparison -> a saved, reloaded, scoring bundle.

Everything runs on the built-in synthetic data (``ctrkit.data.synth``), end to end through the same code paths
as ``ctrkit train`` / ``ctrkit predict``: CSV files on disk, a schema YAML, the encoder, the trainer, the bundle.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()


def main(argv: list[str] | None = None) -> None:
    """Run the demo; ``--rows`` and ``--out`` make it smaller or put it elsewhere."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=400_000, help="rows of synthetic log")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    parser.add_argument("--epochs", type=int, default=None, help="cap on epochs per model")
    args = parser.parse_args(argv)

    from ctrkit.data.synth import SynthConfig, make_click_log, synth_schema, write_splits
    from ctrkit.pipeline import train
    from ctrkit.serve.bundle import Bundle

    out: Path = args.out
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    with console.status(f"generating a synthetic click log of {args.rows:,} impressions"):
        log, truth = make_click_log(SynthConfig(n_rows=args.rows, seed=7))
        write_splits(log, data_dir)
        schema = synth_schema()
    console.print(f"[bold]data[/]: {log.height:,} impressions, CTR {log['click'].mean():.4f}, "
                  f"{log['user_id'].n_unique():,} users, {log['item_id'].n_unique():,} items; "
                  f"CSV files and schema.yaml in {data_dir}")

    table = Table(title="test split (last 10% by time)")
    for col in ("model", "AUC", "logloss", "mean pCTR", "actual CTR", "pred/actual", "epochs", "train s"):
        table.add_column(col, justify="right")
    runs = {}
    for name in ("lr", "fm", "deepfm"):
        console.rule(f"[bold]{name}")
        t0 = time.perf_counter()
        run = train(data_dir / "train.csv", schema=data_dir / "schema.yaml", valid=data_dir / "valid.csv",
                    test=data_dir / "test.csv", model=name, out=out / name, epochs=args.epochs,
                    log=console.print)
        runs[name] = run
        m = run.metrics["test"]
        table.add_row(name, f"{m['auc']:.4f}", f"{m['logloss']:.4f}", f"{m['mean_pred']:.4f}",
                      f"{m['positive_rate']:.4f}", f"{m['pred_actual_ratio']:.3f}",
                      str(run.metrics["train"]["epochs"]), f"{time.perf_counter() - t0:.1f}")
    console.print(table)

    path = out / "deepfm" / "bundle"
    bundle = Bundle.load(path)
    records = [
        {"user_id": "u12", "item_id": "i3", "age_group": "18-24", "gender": "f", "genre": "action",
         "device": "mobile", "hour": 20, "weekday": 5, "position": 1, "price": 9.99, "user_activity": 40},
        {"user_id": "u12", "item_id": "i3", "age_group": "18-24", "gender": "f", "genre": "action",
         "device": "mobile", "hour": 20, "weekday": 5, "position": 8, "price": 9.99, "user_activity": 40},
        {"user_id": "brand-new-user", "item_id": "i3", "age_group": "55+", "gender": None, "genre": "comedy",
         "device": None, "hour": 9, "weekday": 1, "position": 1, "price": None, "user_activity": None},
    ]
    scores = bundle.predict(records)
    shown = Table(title=f"raw records scored by the reloaded bundle ({path})")
    for col in ("user", "age", "genre", "position", "note", "pCTR"):
        shown.add_column(col)
    notes = ["top slot", "same, slot 8", "unseen user; gender, device, price, activity missing"]
    for r, s, note in zip(records, scores, notes):
        shown.add_row(str(r["user_id"]), str(r["age_group"]), str(r["genre"]), str(r["position"]), note, f"{s:.4f}")
    console.print(shown)
    console.print(f"planted examination curve, positions 1-3: {', '.join(f'{x:.2f}' for x in truth.examination[:3])}")
    console.print(f"done: bundles in {out}/<model>/bundle, metrics in {out}/<model>/metrics.json")


if __name__ == "__main__":
    main()
