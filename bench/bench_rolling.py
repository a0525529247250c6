"""Rolling click statistics on real logs: what time-safe stats add, and what the leaky version costs.

The logs of bench_small_logs.py with a time (MovieLens-100K, click = rating >= 4; the Open Bandit logs) and a
synthetic log whose items' relevance drifts (``synth``), cut 80/10/10 by time, each trained with defaults only
(``ctrkit.train``, several seeds) three ways, one of them scored twice:
- ids: the log's schema as it is (the reference of this run);
- ids + stats: the schema's ``stats`` of the log's entities (MovieLens: user and item; OBD: item and the first user
  feature; synth: user, and the item over its last 2 days), each training row as of its own time, valid and test
  rows from the snapshot at the end of training, as a bundle serves them;
- ids + stats, refreshed: those bundles after ``ctrkit refresh`` over the validation file (the log between training
  and test), as a daily refresh would serve the test days;
- ids + leaky stats: the same features computed as a hand-made pipeline often does, every row from all the
  training rows (its own click and later rows included): ``Encoder.fit(train)`` then ``transform`` of each file,
  the snapshot for every row, written as plain numeric columns.

    python bench/bench_rolling.py [--seeds 0,1,2] [--datasets movielens,obd,synth] [--models lr,deepfm]

Prints a table of test AUC and logloss (mean over seeds, and each seed) and writes bench/results/rolling.json.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_small_logs  # noqa: E402
from provenance import write_record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STATS = {"movielens": ["user_id", "item_id"], "obd": ["item", "user_feature_0"],
         "synth": ["user_id", {"field": "item_id", "window": "2d"}]}


def prepare(name: str, folder: Path, examples: Path) -> dict:
    """bench_small_logs' files of a real log, or ``synth``: 100,000 rows of ctrkit.data.synth (20,000 Zipf users,
    5,000 items whose relevance drifts by a random walk of 0.3 a day, 14 days) cut 80/10/10 by time."""
    if name != "synth":
        return bench_small_logs.prepare(name, folder, examples)
    from ctrkit.data.synth import make_click_log, write_splits

    write_splits(make_click_log(n_rows=100_000, item_drift=0.3, seed=0)[0], folder)
    return {k: folder / f"{k}.csv" for k in ("train", "valid", "test")} | {"schema": folder / "schema.yaml"}


def variants(files: dict, stats: list, folder: Path) -> dict[str, dict]:
    """The files and schema of each variant to train, written in ``folder``."""
    from ctrkit.data.encode import Encoder
    from ctrkit.data.readers import read_frame
    from ctrkit.schema import Field, Schema

    base = Schema.load(files["schema"])
    with_stats = Schema.from_dict(base.to_dict() | {"stats": stats})
    with_stats.save(folder / "stats.yaml")
    # the leaky columns: what Encoder.fit(train) then transform(train) gives, the snapshot for every row
    enc = Encoder(with_stats).fit(files["train"])
    cols = with_stats.stat_columns
    leaky_schema = Schema.from_dict(base.to_dict() | {"fields": [f.to_dict() for f in base.fields] + [
        Field(c, kind="numeric", transform="none").to_dict() for c in cols]})
    leaky_schema.save(folder / "leaky.yaml")
    leaky = {"schema": folder / "leaky.yaml"}
    for split in ("train", "valid", "test"):
        df = pl.read_csv(files[split], infer_schema_length=None)
        typed, report = read_frame(files[split], with_stats)
        if report.bad_rows:
            raise ValueError(f"{files[split]}: {report.bad_rows} bad rows; the leaky columns need every row")
        dense = enc.transform_frame(typed)[1][:, -len(cols):]
        leaky[split] = folder / f"leaky_{split}.csv"
        df.with_columns(pl.Series(c, dense[:, k]) for k, c in enumerate(cols)).write_csv(leaky[split])
    return {"ids": files, "ids + stats": files | {"schema": folder / "stats.yaml"}, "ids + leaky stats": leaky}


def refreshed(run_dir: Path, files: dict) -> dict:
    """The bundle of an "ids + stats" run rolled forward over the validation file (the log between training and
    test), scored on the test file."""
    from ctrkit.pipeline import refresh_stats

    bundle = refresh_stats(run_dir / "bundle", files["valid"], run_dir / "refreshed")
    m, _ = bundle.evaluate(files["test"])
    return {"test_auc": m["auc"], "test_logloss": m["logloss"], "test_pred_actual": m["pred_actual_ratio"]}


def main() -> None:
    """Run every dataset, model, variant and seed; print the table and write the JSON record."""
    ap = bench_small_logs.parser(__doc__, "movielens,obd,synth", "0,1,2", "rolling.json")
    ap.add_argument("--models", default="lr,deepfm")
    args = ap.parse_args()
    bench_small_logs.DATASETS = args.data
    import torch

    torch.set_num_threads(2)
    seeds = [int(s) for s in args.seeds.split(",")]
    record: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                    "command": "python bench/bench_rolling.py " + " ".join(sys.argv[1:]), "datasets": {}}
    print(f"{'dataset':10} {'model':7} {'variant':24} {'test AUC (mean; per seed)':38} {'logloss':>8} {'vs ids':>7}")
    for name in args.datasets.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"ctrkit-rolling-{name}-"))
        files = prepare(name, work, args.examples)
        ways = variants(files, STATS[name], work)
        res: dict = {}
        for model in args.models.split(","):
            res[model] = {}
            for variant, f in ways.items():
                folder = work / variant.replace(" ", "_")
                runs = [bench_small_logs.ctrkit_run(f, model, s, folder) for s in seeds]
                rows = [(variant, runs)]
                if variant == "ids + stats":
                    rows.append(("ids + stats, refreshed", [refreshed(folder / f"{model}-{s}", f) for s in seeds]))
                for variant, runs in rows:
                    aucs = [r["test_auc"] for r in runs]
                    mean = float(np.mean(aucs))
                    base = res[model].get("ids", {}).get("test_auc_mean", mean)
                    res[model][variant] = {"runs": runs, "test_auc_mean": mean,
                                           "test_logloss_mean": float(np.mean([r["test_logloss"] for r in runs])),
                                           "vs_ids": mean - base}
                    per = " ".join(f"{a:.4f}" for a in aucs)
                    print(f"{name:10} {model:7} {variant:24} {mean:.4f} ({per}){'':{max(0, 30 - len(per))}} "
                          f"{res[model][variant]['test_logloss_mean']:8.4f} {mean - base:+7.4f}", flush=True)
        record["datasets"][name] = res
    write_record(args.out, record)


if __name__ == "__main__":
    main()
