"""Batch scoring of a large file: `ctrkit predict` streaming (chunks, read-ahead, every core, the bundle's fastest
model path) against the whole-file path it replaced (`Bundle.predict_file`, torch, then one write), same run.

The DeepFM bundle of bench_serve.py (synthetic Criteo, 39 raw fields) scores its test split repeated to
``--rows`` rows. Each path runs in its own process, the two taking turns, ``--reps`` times; the table gives the
median wall time, rows/s and the peak resident memory of each.

    python bench/bench_predict.py          # prints the table, writes bench/results/bench_predict.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import make_bundle  # noqa: E402

RUN = """
import resource, sys, time
import polars as pl
from ctrkit.serve.bundle import Bundle
bundle_dir, src, out, path = sys.argv[1:5]
t0 = time.perf_counter()
if path == "whole file":
    pl.DataFrame({"pctr": Bundle.load(bundle_dir).predict_file(src)}).write_parquet(out)
else:
    from ctrkit.cli import app
    app(["predict", bundle_dir, src, "--out", out], standalone_mode=False)
print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ctrkit-bench-serve")
    ap.add_argument("--train-rows", type=int, default=200_000, help="training rows of the bundle (bench_serve's)")
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the file to score")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/bench_predict.json"))
    args = ap.parse_args()
    bundle = make_bundle(args.work, args.train_rows, 1, seed=0)
    test = pl.read_csv(args.work / "data" / "test.tsv", separator="\t", infer_schema_length=0)
    src = args.work / f"score-{args.rows}.tsv"
    if not src.exists():
        pl.concat([test] * (args.rows // test.height + 1)).head(args.rows).write_csv(src, separator="\t")
    result: dict[str, Any] = {"rows": args.rows, "bundle": str(bundle), "cpus": os.cpu_count(),
                              "load_avg_start": os.getloadavg(), "runs": {}}
    paths = ["whole file", "ctrkit predict (streaming)"]
    runs: dict[str, list[tuple[float, float]]] = {p: [] for p in paths}
    for _ in range(args.reps):
        for p in paths:
            out = args.work / f"scores-{p.split()[0]}.parquet"
            res = subprocess.run([sys.executable, "-c", RUN, str(bundle), str(src), str(out), p], check=True,
                                 capture_output=True, text=True)
            seconds, rss_kb = map(float, res.stdout.split()[-2:])
            runs[p].append((seconds, rss_kb / 1024))
            print(f"{p:28s} {seconds:7.1f} s  {args.rows / seconds:10,.0f} rows/s  peak {rss_kb / 1024:7.0f} MiB",
                  flush=True)
    a, b = (pl.read_parquet(args.work / f"scores-{p.split()[0]}.parquet")["pctr"].to_numpy() for p in paths)
    result["max_abs_diff"] = float(np.max(np.abs(a - b)))
    for p, v in runs.items():
        s = float(np.median([x for x, _ in v]))
        result["runs"][p] = {"seconds": [x for x, _ in v], "median_s": round(s, 2),
                             "rows_per_s": round(args.rows / s), "peak_mib": round(max(m for _, m in v))}
    result["speedup"] = round(result["runs"][paths[0]]["median_s"] / result["runs"][paths[1]]["median_s"], 2)
    result["load_avg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("runs", "speedup", "max_abs_diff")}, indent=1))
    print(f"load average {result['load_avg_start']} -> {result['load_avg_end']}; wrote {args.out}")


if __name__ == "__main__":
    main()
