"""MovieLens-100K with sequence and multi-valued fields: every model of the zoo, 3 seeds, plus multi-task.

The click log comes from ``examples/movielens_clicklog.py`` (click = rating >= 4, user demographics, genres);
this script adds conversion = rating 5, the hour and weekday of the rating, and ``history``: the user's items
rated strictly before this row's time (never a later or simultaneous row), the 20 most recent. Rows are split
by time 80/10/10. Genres are a ``multi`` field and history a ``sequence`` sharing item_id's vocabulary.

Table 1: every registered single-task model on click with every field (DIN attends over the history, the
others pool it by its mean), and DeepFM without the history field. Table 2: conversions (rating 5 over all
impressions): ESMM's and MMoE's pCTCVR head, trained with the click head, beside DeepFM trained on conversions
alone. Mean and spread (population std) over the seeds, parameters, seconds per epoch on this machine.

    python bench/bench_movielens.py [--data ../shared/datasets/movielens_100k] [--seeds 0,1,2] [--models din,deepfm]

Prints both tables and writes bench/results/movielens.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from pathlib import Path

import numpy as np
import polars as pl

import ctrkit
from ctrkit.models import model_class, model_names
from ctrkit.schema import Field, Schema

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "movielens_100k"
HISTORY = 20


def _clicklog() -> object:
    """The example module that builds the flat click log."""
    path = ROOT / "examples" / "movielens_clicklog.py"
    if not path.exists():
        raise SystemExit(f"{path} is missing: this bench builds on its flat MovieLens click log")
    spec = importlib.util.spec_from_file_location("movielens_clicklog", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepare(folder: Path) -> pl.DataFrame:
    """The click log with conversion, hour, weekday and the leak-free history, sorted by time."""
    example = _clicklog()
    log = example.build(folder)  # type: ignore[attr-defined]
    data = folder / "u.data" if (folder / "u.data").exists() else folder / "u.data.gz"
    ratings = example._table(data, ["user_id", "item_id", "rating", "timestamp"], "\t").select(  # type: ignore[attr-defined]
        pl.col("user_id").cast(pl.Int64), pl.col("item_id").cast(pl.Int64), pl.col("rating").cast(pl.Int64))
    log = log.join(ratings, on=["user_id", "item_id"], how="left", maintain_order="left")
    when = pl.from_epoch("timestamp", time_unit="s")
    log = log.with_columns((pl.col("rating") == 5).cast(pl.Int8).alias("conversion"),
                           when.dt.hour().alias("hour"), when.dt.weekday().alias("weekday")).drop("rating")
    return earlier_items(log, "history")


def earlier_items(log: pl.DataFrame, name: str, n: int = HISTORY) -> pl.DataFrame:
    """``log`` with ``name``: per row, the items (as text, oldest first) of the same user's rows whose time is
    strictly earlier, the ``n`` most recent. Rows of one second never see each other, so no row's history holds
    its own outcome or a later one; the row order of ``log`` is kept."""
    log = log.with_row_index("_row").sort(["user_id", "timestamp", "_row"])
    # how many of the user's rows come before this row's first row of its timestamp
    log = log.with_columns(pl.int_range(pl.len()).over("user_id").alias("_before"))
    log = log.with_columns(pl.col("_before").min().over(["user_id", "timestamp"]))
    items = pl.col("item_id").cast(pl.String).implode().over("user_id")
    start = (pl.col("_before") - n).clip(lower_bound=0)
    log = log.with_columns(items.list.slice(start, pl.col("_before") - start).alias(name))
    return log.sort("_row").drop("_row", "_before")


def schema(labels: list[str], history: bool = True) -> Schema:
    """The MovieLens schema: demographics, genres (multi), hour, weekday, and the history (sequence)."""
    fields = [Field("user_id"), Field("item_id"), Field("age", kind="numeric", transform="bucketize", n_buckets=10),
              Field("gender"), Field("occupation"), Field("zip_code", min_count=2),
              Field("release_year", kind="numeric", transform="standardize"),
              Field("genres", kind="multi", sep="|", max_len=6), Field("hour"), Field("weekday")]
    if history:
        fields.append(Field("history", kind="sequence", share_vocab="item_id", max_len=HISTORY))
    return Schema(fields=fields, label=labels[0], labels=labels, time="timestamp", group="user_id")


def split(log: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """80/10/10 by time (the log is sorted by time)."""
    n = log.height
    a, b = int(n * 0.8), int(n * 0.9)
    return log.slice(0, a), log.slice(a, b - a), log.slice(b)


def run(name: str, label: str, parts: tuple[pl.DataFrame, ...], sch: Schema, model: str, seed: int,
        head: str, epochs: int | None) -> dict:
    """Train one model with its defaults (at most ``epochs`` when given) and one seed; the test metrics of
    ``head``."""
    tr, va, te = parts
    t0 = time.perf_counter()
    r = ctrkit.train(tr, schema=sch, valid=va, test=te, model=model, seed=seed, epochs=epochs, progress=False)
    m = r.metrics["test"]
    m = m["heads"][head] if "heads" in m else m
    train = r.metrics["train"]
    return {"row": name, "task": label, "model": model, "seed": seed, "test_auc": m["auc"],
            "test_logloss": m["logloss"], "parameters": r.metrics["model"]["parameters"],
            "epochs": train["epochs"], "seconds_per_epoch": train["train_seconds"] / max(train["epochs"], 1),
            "wall_s": time.perf_counter() - t0}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and population std over seeds, per (task, row)."""
    out = []
    for key in dict.fromkeys((r["task"], r["row"]) for r in rows):
        rs = [r for r in rows if (r["task"], r["row"]) == key]
        auc, ll = np.array([r["test_auc"] for r in rs]), np.array([r["test_logloss"] for r in rs])
        out.append({"task": key[0], "row": key[1], "seeds": len(rs), "auc_mean": float(auc.mean()),
                    "auc_std": float(auc.std()), "logloss_mean": float(ll.mean()), "logloss_std": float(ll.std()),
                    "parameters": rs[0]["parameters"],
                    "seconds_per_epoch": float(np.median([r["seconds_per_epoch"] for r in rs])),
                    "epochs": float(np.mean([r["epochs"] for r in rs]))})
    return out


def main() -> None:
    """Command line: build the data, run every model over the seeds, print and save the tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--models", default="", help="comma-separated row names (a model's name, or e.g. 'deepfm (no "
                    "history)'); only these rows run (default: every row)")
    ap.add_argument("--epochs", type=int, default=None, help="at most this many epochs (default: the model's)")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="train nothing: table the runs of earlier outputs (e.g. one invocation per seed)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "movielens.json")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    log = prepare(args.data)
    parts = split(log)
    no_history = tuple(p.drop("history") for p in parts)
    single = [n for n in model_names() if not model_class(n).multi_head]
    # the rows the acceptance checks compare come first, so an interrupted run still holds them for every seed
    plan = [("din", "click", parts, schema(["click"]), "din", "click"),
            ("deepfm (no history)", "click", no_history, schema(["click"], history=False), "deepfm", "click"),
            ("esmm (pCTCVR head)", "conversion", parts, schema(["click", "conversion"]), "esmm", "conversion"),
            ("deepfm (conversions alone)", "conversion", parts, schema(["conversion"]), "deepfm", "conversion")]
    plan += [(n, "click", parts, schema(["click"]), n, "click") for n in single if n != "din"]
    plan += [(f"{n} (pCTCVR head)", "conversion", parts, schema(["click", "conversion"]), n, "conversion")
             for n in model_names() if model_class(n).multi_head and n != "esmm"]
    if args.models:
        plan = [p for p in plan if p[0] in args.models.split(",")]
    rows = [r for f in args.merge for r in json.loads(f.read_text())["runs"]] if args.merge else []
    seeds = sorted({r["seed"] for r in rows}) if args.merge else seeds
    for name, task, data, sch, model, head in plan if not args.merge else []:
        for seed in seeds:
            rows.append(run(name, task, data, sch, model, seed, head, args.epochs))
            r = rows[-1]
            print(f"seed {seed} {task:10s} {name:28s} auc {r['test_auc']:.4f} logloss {r['test_logloss']:.4f} "
                  f"{r['seconds_per_epoch']:.2f}s/epoch x{r['epochs']}", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"runs": rows, "epochs": args.epochs}, indent=1))
    table = summarise(rows)
    for task in ("click", "conversion"):
        print(f"\n{task}: test AUC / logloss, mean ± std over seeds {seeds}")
        print(f"{'model':28s} {'AUC':>16s} {'logloss':>16s} {'params':>9s} {'s/epoch':>8s}")
        for t in sorted((t for t in table if t["task"] == task), key=lambda t: -t["auc_mean"]):
            print(f"{t['row']:28s} {t['auc_mean']:.4f} ± {t['auc_std']:.4f} {t['logloss_mean']:.4f} ± "
                  f"{t['logloss_std']:.4f} {t['parameters']:9,d} {t['seconds_per_epoch']:8.2f}")
    din = {r["seed"]: r["test_auc"] for r in rows if r["row"] == "din"}
    base = {r["seed"]: r["test_auc"] for r in rows if r["row"] == "deepfm (no history)"}
    both = sorted(set(din) & set(base))
    if both:
        print("\nDIN - DeepFM without history, test AUC per seed: " +
              ", ".join(f"{s}: {din[s] - base[s]:+.4f}" for s in both) +
              f" (mean {np.mean([din[s] - base[s] for s in both]):+.4f})")
    meta = {"rows": {k: p.height for k, p in zip(("train", "valid", "test"), parts)},
            "click_rate": float(log["click"].mean()), "conversion_rate": float(log["conversion"].mean()),
            "ctrkit": ctrkit.__version__, "python": platform.python_version(), "machine": platform.processor()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": {**meta, "epochs": args.epochs}, "table": table, "runs": rows}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
