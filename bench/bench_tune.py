"""`ctrkit tune` against the adaptive defaults on the small real logs of bench_small_logs.py.

For each log (Criteo sample, the six OBD logs, MovieLens-100K; the same files and cuts as bench_small_logs.py) and
seed: `ctrkit.train` with defaults only, and `ctrkit.tune` with its default space and `--trials` trials (the first
of which is the defaults), both scored once on the test rows. The validation AUC chose; the test AUC judges.

    python bench/bench_tune.py [--datasets criteo,obd,movielens] [--model deepfm] [--trials 20] [--seeds 0]

Prints a table and writes bench/results/tune.json.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_small_logs as small  # noqa: E402
from provenance import write_record  # noqa: E402


def main() -> None:
    """Run every log and seed, print the table and write the JSON record."""
    ap = small.parser(__doc__, "criteo,obd,movielens", "0", "tune.json")
    ap.add_argument("--model", default="deepfm")
    ap.add_argument("--trials", type=int, default=20)
    args = ap.parse_args()
    small.DATASETS = args.data
    import torch

    import ctrkit
    from ctrkit.tune import tune

    torch.set_num_threads(2)
    record: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                    "command": "python bench/bench_tune.py " + " ".join(sys.argv[1:]), "model": args.model,
                    "trials": args.trials, "datasets": {}}
    print(f"{'dataset':10} {'seed':>4} {'default valid':>13} {'test':>7} {'s':>6}   {'tuned valid':>11} {'test':>7} "
          f"{'s':>6}  best")
    for name in args.datasets.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"ctrkit-tune-{name}-"))
        files = small.prepare(name, work, args.examples)
        rows = []
        for seed in (int(s) for s in args.seeds.split(",")):
            data = {k: files[k] for k in ("valid", "test")}
            t0 = time.perf_counter()
            base = ctrkit.train(files["train"], schema=files["schema"], model=args.model, seed=seed, progress=False,
                                **data)
            t1 = time.perf_counter()
            tuned = tune(files["train"], schema=files["schema"], model=args.model, trials=args.trials, seed=seed,
                         **data)
            t2 = time.perf_counter()
            final = tuned.run.metrics  # type: ignore[union-attr]
            row = {"seed": seed, "default": {"valid_auc": base.metrics["valid"]["auc"],
                                             "test_auc": base.metrics["test"]["auc"], "seconds": round(t1 - t0, 1)},
                   "tuned": {"valid_auc": final["valid"]["auc"], "test_auc": final["test"]["auc"],
                             "seconds": round(t2 - t1, 1), "best": tuned.best, "trials": tuned.trials}}
            rows.append(row)
            d, t = row["default"], row["tuned"]
            print(f"{name:10} {seed:4d} {d['valid_auc']:13.4f} {d['test_auc']:7.4f} {d['seconds']:6.1f}   "
                  f"{t['valid_auc']:11.4f} {t['test_auc']:7.4f} {t['seconds']:6.1f}  trial {tuned.best['number'] + 1}"
                  f"{' (the defaults)' if not tuned.best['params'] else ''}", flush=True)
        record["datasets"][name] = rows
    write_record(args.out, record)


if __name__ == "__main__":
    main()
