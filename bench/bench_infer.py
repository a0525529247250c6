"""Is `ctrkit schema infer` good enough to train on unedited? DeepFM test AUC with the inferred schema beside a
hand-written one, same data, same seeds, one run after the other.

    python bench/bench_infer.py --movielens ../shared/datasets/movielens_100k \
        --criteo ../shared/datasets/criteo_samples [--seeds 0,1,2]

MovieLens-100K: the click log of examples/movielens_clicklog.py (click = rating >= 4), the first 90% by time to
train on (its last 10% by time is the validation part) and the last 10% to test; hand-written schema
examples/movielens_clicks.yaml. Criteo: the raw Wide-ResDNN rows (train / dev / test TSV, no header line);
hand-written schema examples/criteo_raw.yaml. Every step is the command a user types (`ctrkit schema infer FILE`,
`ctrkit train ... --quiet`). Prints a table and writes bench/results/infer.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import source_commit

ROOT = Path(__file__).resolve().parent.parent


def ctrkit(*args: str) -> subprocess.CompletedProcess[str]:
    """One `ctrkit` command as a user runs it; a failure stops the bench with its output."""
    res = subprocess.run([sys.executable, "-m", "ctrkit", *args], capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"ctrkit {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
    return res


def train_auc(train: Path, valid: Path | None, test: Path, schema: Path, out: Path, seed: int) -> dict:
    """DeepFM with its defaults on one schema; test AUC and what the run took."""
    args = [str(train), "--test", str(test), "--schema", str(schema), "--model", "deepfm", "--out", str(out),
            "--seed", str(seed), "--quiet"] + (["--valid", str(valid)] if valid else [])
    t0 = time.perf_counter()
    ctrkit("train", *args)
    m = json.loads((out / "metrics.json").read_text())
    return {"seed": seed, "test_auc": m["test"]["auc"], "test_logloss": m["test"]["logloss"],
            "epochs": m["train"]["epochs"], "wall_s": round(time.perf_counter() - t0, 1)}


def compare(name: str, train: Path, valid: Path | None, test: Path, hand: Path, work: Path,
            seeds: list[int]) -> dict:
    """Infer a schema from TRAIN, then train DeepFM on it and on the hand-written one with every seed."""
    inferred = work / f"{name}_inferred.yaml"
    inferred.write_text(ctrkit("schema", "infer", str(train)).stdout)
    runs: dict[str, list[dict]] = {"inferred": [], "hand": []}
    for seed in seeds:
        for kind, schema in (("inferred", inferred), ("hand", hand)):
            runs[kind].append(train_auc(train, valid, test, schema, work / f"{name}_{kind}_{seed}", seed))
    mean = {k: statistics.fmean(r["test_auc"] for r in v) for k, v in runs.items()}
    diffs = [a["test_auc"] - b["test_auc"] for a, b in zip(runs["inferred"], runs["hand"])]
    return {"dataset": name, "hand_schema": str(hand.relative_to(ROOT)), "inferred_schema": inferred.read_text(),
            "runs": runs, "mean_auc": mean, "diff_per_seed": diffs, "mean_diff": statistics.fmean(diffs),
            "within_0.005": abs(statistics.fmean(diffs)) <= 0.005}


def main() -> None:
    """Command line: the two dataset folders and the seeds."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--movielens", type=Path, required=True, help="folder with u.data(.gz), u.user, u.item, u.genre")
    ap.add_argument("--criteo", type=Path, required=True, help="folder with the wide_resdnn_criteo_* files")
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    sys.path.insert(0, str(ROOT / "examples"))
    from movielens_clicklog import build

    results = []
    with tempfile.TemporaryDirectory(prefix="ctrkit-infer-") as tmp:
        work = Path(tmp)
        log = build(args.movielens)
        cut = int(log.height * 0.9)
        log.head(cut).write_csv(work / "ml_train.csv")
        log.tail(log.height - cut).write_csv(work / "ml_test.csv")
        results.append(compare("movielens_100k", work / "ml_train.csv", None, work / "ml_test.csv",
                               ROOT / "examples" / "movielens_clicks.yaml", work, seeds))
        c = args.criteo
        results.append(compare("criteo_raw", c / "wide_resdnn_criteo_train.tsv.gz", c / "wide_resdnn_criteo_dev.tsv",
                               c / "wide_resdnn_criteo_test.tsv", ROOT / "examples" / "criteo_raw.yaml", work,
                               seeds))
    commit = source_commit(ROOT)
    print(f"{'dataset':16} {'schema':9} " + " ".join(f"seed {s:<4}" for s in seeds) + "   mean")
    for r in results:
        for kind in ("inferred", "hand"):
            aucs = " ".join(f"{x['test_auc']:.5f}  " for x in r["runs"][kind])
            print(f"{r['dataset']:16} {kind:9} {aucs} {r['mean_auc'][kind]:.5f}")
        print(f"{'':16} {'diff':9} " + " ".join(f"{d:+.5f}  " for d in r["diff_per_seed"])
              + f" {r['mean_diff']:+.5f}  within 0.005: {r['within_0.005']}")
    out = ROOT / "bench" / "results" / "infer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "seeds": seeds, "commit": commit,
                               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                               "machine": f"{platform.machine()} {platform.processor()} python "
                                          f"{platform.python_version()}"}, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
