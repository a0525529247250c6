"""Small real logs, defaults only: ctrkit `lr` and `deepfm` against scikit-learn's LogisticRegression.

Three logs, each cut by time (or as published) into train / valid / test files that every learner shares:
- Criteo: the raw DAC rows in shared/datasets/criteo_samples (7,200 train, the 409-row dev file as validation,
  the 391-row test file), schema examples/criteo_raw.yaml;
- OBD: the six Open Bandit logs of shared/datasets/obd_small (random and Bernoulli-TS policies, campaigns all /
  men / women; 60,000 impressions, CTR about 0.4%), item features joined from item_context.csv, items keyed by
  campaign; the first 80% by time trains, the next 10% validates, the last 10% tests;
- MovieLens-100K: examples/movielens_clicklog.py's click log (click = rating >= 4), cut 80/10/10 by time.

ctrkit runs `ctrkit.train` with nothing but the files, the schema and the model name (several seeds). The
reference is scikit-learn's LogisticRegression on one-hot features: every id of ctrkit's encoder (fitted on the
training file) as a one-hot column plus the standardised numerics with missing indicators, C chosen from a grid
by AUC on the same validation file, then scored once on the test file.

    python bench/bench_small_logs.py [--seeds 0,1,2] [--datasets criteo,obd,movielens]

Prints a table and writes bench/results/small_logs.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import write_record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
C_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def _cut_by_time(df: pl.DataFrame, time_col: str, folder: Path) -> None:
    df = df.sort(time_col)
    n = df.height
    a, b = int(n * 0.8), int(n * 0.9)
    for name, part in (("train", df[:a]), ("valid", df[a:b]), ("test", df[b:])):
        part.write_csv(folder / f"{name}.csv")


def prepare_criteo(folder: Path) -> dict:
    """The published Criteo sample files as they are."""
    src = DATASETS / "criteo_samples"
    return {"train": src / "wide_resdnn_criteo_train.tsv.gz", "valid": src / "wide_resdnn_criteo_dev.tsv",
            "test": src / "wide_resdnn_criteo_test.tsv", "schema": ROOT / "examples" / "criteo_raw.yaml"}


def prepare_obd(folder: Path) -> dict:
    """The six OBD logs in one time-ordered click log with item features; items keyed by campaign."""
    from ctrkit.schema import Field, Schema

    frames = []
    for policy in ("random", "bts"):
        for campaign in ("all", "men", "women"):
            d = DATASETS / "obd_small" / policy / campaign
            log = pl.read_csv(d / f"{campaign}.csv.gz", columns=["timestamp", "item_id", "position", "click",
                                                                  "user_feature_0", "user_feature_1",
                                                                  "user_feature_2", "user_feature_3"])
            items = pl.read_csv(d / "item_context.csv").drop("", strict=False)
            log = log.join(items, on="item_id", how="left")
            frames.append(log.with_columns(pl.lit(campaign).alias("campaign"),
                                           (pl.lit(campaign + ":") + pl.col("item_id").cast(pl.String))
                                           .alias("item")).drop("item_id"))
    df = pl.concat(frames, how="diagonal_relaxed")
    _cut_by_time(df, "timestamp", folder)
    cats = ["campaign", "item", "position", "user_feature_0", "user_feature_1", "user_feature_2", "user_feature_3",
            "item_feature_1", "item_feature_2", "item_feature_3"]
    schema = Schema(fields=[Field(c) for c in cats] + [Field("item_feature_0", kind="numeric")], label="click",
                    time="timestamp")
    schema.save(folder / "schema.yaml")
    return {k: folder / f"{k}.csv" for k in ("train", "valid", "test")} | {"schema": folder / "schema.yaml"}


def prepare_movielens(folder: Path, examples: Path) -> dict:
    """examples/movielens_clicklog.py's click log, cut by time."""
    from ctrkit.schema import Field, Schema

    spec = importlib.util.spec_from_file_location("movielens_clicklog", examples / "movielens_clicklog.py")
    if spec is None or spec.loader is None or not (examples / "movielens_clicklog.py").exists():
        raise FileNotFoundError(f"{examples / 'movielens_clicklog.py'} is needed for MovieLens")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    log = mod.build(DATASETS / "movielens_100k")
    _cut_by_time(log.with_columns(pl.from_epoch("timestamp", time_unit="s")), "timestamp", folder)
    schema = Schema(fields=[Field("user_id"), Field("item_id"),
                            Field("age", kind="numeric", transform="bucketize", n_buckets=10),
                            Field("gender"), Field("occupation"), Field("zip_code", min_count=2),
                            Field("release_year", kind="numeric", transform="standardize"), Field("genres")],
                    label="click", time="timestamp")
    schema.save(folder / "schema.yaml")
    return {k: folder / f"{k}.csv" for k in ("train", "valid", "test")} | {"schema": folder / "schema.yaml"}


def prepare(name: str, folder: Path, examples: Path) -> dict:
    """The train / valid / test files and schema of the log ``name`` (criteo, obd or movielens), made in ``folder``."""
    makers = {"criteo": lambda: prepare_criteo(folder), "obd": lambda: prepare_obd(folder),
              "movielens": lambda: prepare_movielens(folder, examples)}
    if name not in makers:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(makers)}")
    return makers[name]()


def _one_hot(data: object, n_ids: int, dense_mean: np.ndarray, dense_std: np.ndarray) -> object:
    from scipy import sparse

    ids = np.asarray(data.ids)
    n, f = ids.shape
    onehot = sparse.csr_matrix((np.ones(n * f), ids.ravel(), np.arange(0, n * f + 1, f)), shape=(n, n_ids))
    dense = np.asarray(data.dense, dtype=np.float64)
    miss = np.isnan(dense)
    z = np.where(miss, 0.0, (dense - dense_mean) / dense_std)
    return sparse.hstack([onehot, sparse.csr_matrix(z), sparse.csr_matrix(miss.astype(np.float64))]).tocsr()


def sklearn_reference(files: dict, work: Path) -> dict:
    """LogisticRegression on one-hot ids + numerics, C tuned by validation AUC; test AUC and logloss."""
    from sklearn.linear_model import LogisticRegression

    from ctrkit.data.encode import encode_files
    from ctrkit.evaluate.metrics import evaluate
    from ctrkit.schema import Schema

    enc = encode_files(Schema.load(files["schema"]), files["train"], work / "sk", valid=files["valid"],
                       test=files["test"])
    tr = enc.data["train"]
    dense = np.asarray(tr.dense, dtype=np.float64)
    mean = np.nan_to_num(np.nanmean(dense, axis=0)) if dense.shape[1] else np.zeros(0)
    std = np.nan_to_num(np.nanstd(dense, axis=0), nan=1.0) if dense.shape[1] else np.zeros(0)
    std[std == 0] = 1.0
    x = {k: _one_hot(d, enc.encoder.n_ids, mean, std) for k, d in enc.data.items()}
    y = {k: np.asarray(d.label) for k, d in enc.data.items()}
    best = None
    for c in C_GRID:
        lr = LogisticRegression(C=c, max_iter=2000).fit(x["train"], y["train"])
        v = evaluate(y["valid"], lr.predict_proba(x["valid"])[:, 1])
        if best is None or v["auc"] > best[1]["auc"]:
            best = (c, v, lr)
    c, v, lr = best
    t = evaluate(y["test"], lr.predict_proba(x["test"])[:, 1])
    return {"C": c, "valid_auc": v["auc"], "test_auc": t["auc"], "test_logloss": t["logloss"],
            "test_pred_actual": t["pred_actual_ratio"], "rows": {k: len(d) for k, d in enc.data.items()},
            "positives": {k: int(np.sum(v)) for k, v in y.items()}}


def ctrkit_run(files: dict, model: str, seed: int, work: Path) -> dict:
    """`ctrkit.train` with defaults only."""
    import ctrkit

    t0 = time.perf_counter()
    run = ctrkit.train(files["train"], schema=files["schema"], valid=files["valid"], test=files["test"],
                       model=model, seed=seed, out=work / f"{model}-{seed}", progress=False)
    m = run.metrics
    return {"seed": seed, "test_auc": m["test"]["auc"], "test_logloss": m["test"]["logloss"],
            "test_pred_actual": m["test"]["pred_actual_ratio"], "test_ece": m["test"]["ece"],
            "valid_auc": m["valid"]["auc"], "epochs": m["train"]["epochs"], "best_epoch": m["train"]["best_epoch"],
            "calibration": m["calibration"]["method"], "first_order_l2": m["train"]["auto"]["model"].get("linear_l2"),
            "seconds": round(time.perf_counter() - t0, 1)}


def parser(doc: str | None, datasets: str, seeds: str, out: str) -> argparse.ArgumentParser:
    """The options of every bench on these logs: --datasets, --seeds, --data (the shared datasets folder),
    --examples (the folder of movielens_clicklog.py) and --out (under bench/results)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=datasets)
    ap.add_argument("--seeds", default=seeds)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets", help="the shared datasets folder")
    ap.add_argument("--examples", type=Path, default=ROOT / "examples", help="folder of movielens_clicklog.py")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / out)
    return ap


def main() -> None:
    """Run every dataset and write the JSON record."""
    global DATASETS
    ap = parser(__doc__, "criteo,obd,movielens", "0,1,2", "small_logs.json")
    ap.add_argument("--models", default="lr,deepfm")
    args = ap.parse_args()
    DATASETS = args.data
    import torch

    torch.set_num_threads(2)
    seeds = [int(s) for s in args.seeds.split(",")]
    record: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, "
                    f"{__import__('os').cpu_count()} cores", "command": "python bench/bench_small_logs.py "
                    + " ".join(sys.argv[1:]), "datasets": {}}
    print(f"{'dataset':10} {'learner':14} {'test AUC (mean; per seed)':44} {'logloss':>8} {'pred/act':>8} {'gap':>7}")
    for name in args.datasets.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"ctrkit-small-{name}-"))
        files = prepare(name, work, args.examples)
        ref = sklearn_reference(files, work)
        res = {"sklearn": ref}
        print(f"{name:10} {'sklearn LR':14} {ref['test_auc']:<44.4f} {ref['test_logloss']:8.4f} "
              f"{ref['test_pred_actual']:8.3f}   (C={ref['C']}, rows {ref['rows']}, clicks {ref['positives']})",
              flush=True)
        for model in args.models.split(","):
            runs = [ctrkit_run(files, model, s, work) for s in seeds]
            aucs = [r["test_auc"] for r in runs]
            mean = float(np.mean(aucs))
            res[model] = {"runs": runs, "test_auc_mean": mean, "gap_to_sklearn": mean - ref["test_auc"],
                          "met": mean >= ref["test_auc"] - 0.003}
            per = " ".join(f"{a:.4f}" for a in aucs)
            print(f"{name:10} {'ctrkit ' + model:14} {mean:.4f} ({per}){'':{max(0, 36 - len(per))}} "
                  f"{np.mean([r['test_logloss'] for r in runs]):8.4f} "
                  f"{np.mean([r['test_pred_actual'] for r in runs]):8.3f} {mean - ref['test_auc']:+7.4f}", flush=True)
        record["datasets"][name] = res
    write_record(args.out, record)


if __name__ == "__main__":
    main()
