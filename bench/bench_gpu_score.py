"""GPU scoring of a ranking request: 1,000 raw candidates of 39 fields through a DeepFM bundle on one GPU.

A DeepFM bundle is trained on synthetic Criteo-shaped raw data (``bench_serve.make_bundle``: 13 numeric + 26
categorical fields from ``gen_synth_criteo.py``), then loaded into the server's scorer with ``device="cuda"``
(:mod:`ctrkit.serve.gpu`: CUDA graphs per request size). The stages are timed taking turns, so that the
table shows what each part of a request costs:

  encode, compiled            raw records -> ids/dense in one compiled pass (Encoder.encode_records; CPU)
  encode: dicts -> frame      the reference path it stands in for: validation and typing of the records (CPU)
  encode: frame -> ids/dense  ... then the bundle's encoder (CPU)
  model part, cuda graph      host ids/dense in, logits on the host out (copies, replay, sync)
  model part, eager torch     the same model on the GPU without graphs, for contrast
  scorer, dicts -> pctr       the whole in-process request on the chosen path

Prints the table and writes JSON. Usage::

    python bench/bench_gpu_score.py --gen ../shared/peers/gen_synth_criteo.py [--rows 200000] [--reps 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve  # noqa: E402
from provenance import source_commit  # noqa: E402

from ctrkit.data.dataset import Batch  # noqa: E402
from ctrkit.serve.bundle import Bundle  # noqa: E402
from ctrkit.serve.scorer import GRAPHED, Scorer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gen", type=Path, default=bench_serve.GEN, help="gen_synth_criteo.py")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ctrkit-bench-gpu-score")
    ap.add_argument("--rows", type=int, default=200_000, help="training rows of the bundle")
    ap.add_argument("--candidates", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("bench/results/bench_gpu_score.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu_score needs a CUDA device")
    bench_serve.GEN = args.gen
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    path = bench_serve.make_bundle(args.work, args.rows, epochs=1, seed=0, device="cuda")
    bundle = Bundle.load(path)
    recs = bench_serve.candidates(args.work / "data" / "test.tsv", args.candidates)
    scorer = Scorer(bundle, path, threads=1, device="cuda", keep_paths=True)
    result: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                              "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "setup_seconds": round(time.perf_counter() - t0, 1), "scorer": scorer.describe(),
                              "valid_auc": bundle.metrics.get("valid", {}).get("auc")}
    result["commit"] = source_commit()
    good = scorer.frame(recs)
    ids, dense = bundle.encoder.transform_frame(good)
    graphed = scorer.graphed
    assert graphed is not None
    eager = graphed.model

    @torch.no_grad()
    def eager_model() -> None:
        b = Batch(torch.from_numpy(ids).to("cuda", non_blocking=True),
                  torch.from_numpy(dense).to("cuda", non_blocking=True))
        eager(b).float().cpu()

    stages = {
        "encode: dicts -> ids/dense, compiled (CPU)": lambda: bundle.encoder.encode_records(recs),
        "encode: dicts -> validated frame (CPU)": lambda: scorer.frame(recs),
        "encode: frame -> ids/dense (CPU)": lambda: bundle.encoder.transform_frame(good),
        "model part: cuda graph, host in and out": lambda: graphed(ids, dense),
        "model part: eager torch on the GPU": eager_model,
        f"scorer: dicts -> pctr ({scorer.backend})": lambda: scorer.predict(recs),
    }
    result["latency"] = bench_serve.interleaved(stages, args.reps, warmup=50)
    np.testing.assert_allclose(scorer._probabilities(GRAPHED, ids, dense), bundle.predict(recs), rtol=1e-4,
                               atol=1e-6)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{result['gpu']}; scorer {result['scorer']}")
    print(f"\n{'stage':55s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for name, s in result["latency"].items():
        print(f"{name:55s} {s['p50_ms']:8.3f} {s['p99_ms']:8.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
