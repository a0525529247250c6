"""Criteo-shaped benchmarks of ctrkit against its peers, one function per stage.

``--stage encode``: raw TSV (train/valid/test with a header line, 13 numeric + 26 categorical columns, as
written by ``shared/peers/gen_synth_criteo.py``) -> encoded datasets with ``ctrkit.data.encode.encode_files``,
fitted on the train split with min_count 2 (FuxiCTR's setting). Each ctrkit run is a fresh subprocess, so
its peak memory is its own; the figure is all rows of the three files over the wall time of the call.
Each timed run follows an untimed one of the same command (``--warmup``, see ``WARMUP``), whose rate is
reported too: on this VM the first run after a quiet spell pays extra for page faults.
The same runs on the files doubled (every file concatenated with itself) check that memory stays flat.
FuxiCTR's own preprocessing of the same files runs once in the same invocation, through ``bench/peers.py``.
Results: a table on stdout and ``bench/results/criteo_encode.json``.

``--stage train``: DeepFM (embedding 16, MLP 400-400-400, batch 4096, Adam lr 1e-3, embedding L2 1e-5, no
dropout or batch norm: the FuxiCTR harness's Criteo settings) for one epoch on the first 1,000,000 train rows,
then test AUC / logloss on the 200k test rows. Vocabularies are fitted on the whole train split (min_count 2)
for both libraries. Each ctrkit precision (fp32, bf16 autocast) trains in a fresh subprocess; samples/s is
measured exactly as for FuxiCTR, with the harness's own ``StepTimer`` (steady-state steps after 10 warm-up
steps). FuxiCTR trains once in the same invocation, after ctrkit, through ``bench/peers.py``.
Results: a table on stdout and ``bench/results/criteo_train.json``.

Usage::

    .venv/bin/python bench/bench_criteo.py --stage encode [--data /tmp/peerbench/data] [--out DIR]
        [--repeats 3] [--no-double] [--no-peer]
    .venv/bin/python bench/bench_criteo.py --stage train [--data /tmp/peerbench/data] [--out DIR]
        [--precisions fp32,bf16] [--no-peer]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SPLITS = ("train", "valid", "test")
NUMERIC = [f"I{i}" for i in range(1, 14)]
CATEGORICAL = [f"C{i}" for i in range(1, 27)]
QUIET = [0.5, 0.0]  # (load threshold, max wait in seconds) before each timed run; set from the command line
# Untimed runs right before each timed one. This VM hands memory that stays free for a while back to its
# host (virtio balloon, DAMON reclaim), and the first process to touch it again pays for every page: a run
# that follows a quiet minute spends 2-3x the system time on page faults (3.5 s against 1.7 s measured).
WARMUP = [1]


def criteo_schema() -> Any:
    """I1..I13 numeric (log1p + standardize), C1..C26 categorical with min_count 2, label ``label``."""
    from ctrkit.schema import Field, Schema

    return Schema(fields=[Field(c, kind="numeric") for c in NUMERIC] + [Field(c, min_count=2) for c in CATEGORICAL],
                  label="label")


def _loadavg() -> float:
    return os.getloadavg()[0]


def _wait_for_quiet(threshold: float, max_wait: float) -> float:
    """Wait (at most ``max_wait`` s) until the 1-minute load average is below ``threshold``; return the wait."""
    t0 = time.monotonic()
    while _loadavg() >= threshold and time.monotonic() - t0 < max_wait:
        time.sleep(5)
    return time.monotonic() - t0


def _files(data: Path) -> dict[str, Path]:
    files = {k: data / f"{k}.tsv" for k in SPLITS}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise SystemExit(f"missing {missing}; make them with: .venv/bin/python ../shared/peers/gen_synth_criteo.py "
                         f"--out {data}")
    return files


def _double(files: dict[str, Path], out: Path) -> dict[str, Path]:
    """Each file concatenated with itself (one header line): twice the rows, the same vocabulary shape."""
    out.mkdir(parents=True, exist_ok=True)
    doubled = {}
    for k, src in files.items():
        dst = out / f"{k}.tsv"
        if not dst.exists() or dst.stat().st_size != 2 * src.stat().st_size - len(_header(src)):
            with open(src, "rb") as fh:
                header = fh.readline()
                body = fh.read()
            with open(dst, "wb") as fh:
                fh.write(header)
                fh.write(body)
                fh.write(body)
        doubled[k] = dst
    return doubled


def _header(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.readline()


def _child_encode(args: argparse.Namespace) -> None:
    """Runs inside the measured subprocess: one encode_files call, then a RESULT line with its figures."""
    from ctrkit.data.encode import encode_files

    out = Path(args.child_out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    res = encode_files(criteo_schema(), args.child_train, out, valid=args.child_valid, test=args.child_test)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
    bad = sum(r.bad_rows for r in res.reports.values())
    row = {"rows": res.rows, "bad_rows": bad, "wall_s": wall, "cpu_s": cpu, "sys_s": ru1.ru_stime - ru0.ru_stime,
           "minor_faults": ru1.ru_minflt - ru0.ru_minflt, "rows_per_s": res.rows / wall,
           "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "n_ids": res.encoder.n_ids,
           "field_sizes": res.encoder.field_sizes()}
    shutil.rmtree(out, ignore_errors=True)
    print("RESULT " + json.dumps(row), flush=True)


def _ctrkit_run(files: dict[str, Path], out: Path) -> dict[str, Any]:
    """One encode in a fresh subprocess; peak RSS both from the child itself and sampled from outside."""
    from bench import peers

    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-encode", "--child-out", str(out),
           "--child-train", str(files["train"]), "--child-valid", str(files["valid"]),
           "--child-test", str(files["test"])]
    waited = _wait_for_quiet(QUIET[0], QUIET[1])
    load = _loadavg()
    first = None
    for _ in range(1 + WARMUP[0]):
        r = peers.run_peer(cmd, {"PYTHONPATH": str(ROOT / "src")}, cwd=ROOT)
        if r["returncode"] != 0 or not r["results"]:
            raise SystemExit(f"ctrkit encode failed (rc {r['returncode']}):\n{r['stdout_tail']}")
        first = first or r["results"][-1]
    row = dict(r["results"][-1])
    if WARMUP[0]:
        row["after_idle_rows_per_s"] = first["rows_per_s"]  # the untimed run that followed the quiet wait
        row["after_idle_sys_s"] = first["sys_s"]
    row["sampled_peak_rss_mb"] = r["peak_rss_mb"]
    row["process_wall_s"] = r["wall_s"]
    row["loadavg_1m_before"] = load
    row["waited_for_quiet_s"] = round(waited, 1)
    return row


def _repeated(files: dict[str, Path], out: Path, label: str, repeats: int) -> dict[str, Any]:
    """``repeats`` timed encodes of ``files``, each printed as it finishes, and their summary."""
    runs = []
    for i in range(repeats):
        runs.append(_ctrkit_run(files, out))
        r = runs[-1]
        idle = (f" (untimed run after the quiet wait: {r['after_idle_rows_per_s']:,.0f} rows/s)"
                if "after_idle_rows_per_s" in r else "")
        print(f"{label} {i + 1}: {r['rows_per_s']:,.0f} rows/s, {r['wall_s']:.2f} s, sys {r['sys_s']:.2f} s, "
              f"peak RSS {r['maxrss_mb']:,.0f} MB{idle}", flush=True)
    return _summary(runs)


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"rows": runs[0]["rows"], "runs": len(runs),
            "rows_per_s_median": median(r["rows_per_s"] for r in runs),
            "wall_s_median": median(r["wall_s"] for r in runs),
            "cpu_s_median": median(r["cpu_s"] for r in runs),
            "sys_s_median": median(r["sys_s"] for r in runs),
            "after_idle_rows_per_s_median": (median(r["after_idle_rows_per_s"] for r in runs)
                                             if "after_idle_rows_per_s" in runs[0] else None),
            "peak_rss_mb_max": max(r["maxrss_mb"] for r in runs),
            "sampled_peak_rss_mb_max": max(r["sampled_peak_rss_mb"] or 0 for r in runs),
            "all": runs}


def _fuxictr(data: Path, out: Path) -> dict[str, Any]:
    """FuxiCTR's preprocessing of the same files (FeatureProcessor + build_dataset), through bench/peers.py."""
    from bench import peers

    _wait_for_quiet(QUIET[0], QUIET[1])
    load = _loadavg()
    r = peers.fuxictr_preprocess(data, out / "fuxictr", log_path=out / "fuxictr_preprocess.log")
    if r["returncode"] != 0:
        return {"error": f"rc {r['returncode']}", "tail": r["stdout_tail"][-2000:]}
    try:
        lib_rate = float(peers.result_value(r, "preprocess_rows_per_s"))
    except KeyError:
        lib_rate = None
    rows = _count_rows(data)
    return {"rows": rows, "wall_s": r["wall_s"], "rows_per_s_process": rows / r["wall_s"],
            "rows_per_s_library": lib_rate, "peak_rss_mb": r["peak_rss_mb"],
            "peak_rss_anon_mb": r.get("peak_rss_anon_mb"), "peak_procs": r.get("peak_procs"),
            "loadavg_1m_before": load, "results": r["results"]}


def _count_rows(data: Path) -> int:
    meta = data / "meta.json"
    if meta.exists():
        return int(json.loads(meta.read_text())["rows"])
    total = 0
    for k in SPLITS:
        with open(data / f"{k}.tsv", "rb") as fh:
            total += sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 24), b"")) - 1
    return total


def stage_encode(args: argparse.Namespace) -> dict[str, Any]:
    """Time ctrkit's encode on the 2M rows (and doubled), and FuxiCTR's preprocessing of the same files."""
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = _files(data)
    report: dict[str, Any] = {"stage": "encode", "data": str(data), "machine": _machine(),
                              "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    report["ctrkit"] = _repeated(files, out / "ctrkit_2x", "ctrkit run", args.repeats)
    if args.double:
        doubled = _double(files, out / "doubled")
        report["ctrkit_doubled"] = _repeated(doubled, out / "ctrkit_4x", "ctrkit doubled run", args.repeats)
        if not args.keep_doubled:
            shutil.rmtree(out / "doubled", ignore_errors=True)
    if args.twice:
        # Doubling by concatenation makes every value occur at least twice, so min_count 2 keeps them all and
        # the vocabulary triples; a fresh draw of twice the rows grows the vocabulary only as the data does.
        report["ctrkit_twice"] = _repeated(_files(Path(args.twice)), out / "ctrkit_twice",
                                           "ctrkit twice-the-rows run", args.repeats)
    path = RESULTS / "criteo_encode.json"
    if args.peer:
        print("FuxiCTR preprocessing (about 80-110 s) ...", flush=True)
        report["fuxictr"] = _fuxictr(data, out)
        report["fuxictr"]["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    _print_table(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    from provenance import write_record

    write_record(path, report)
    return report


def _gemm_gflops(reps: int = 20) -> dict[str, float]:
    """GFLOP/s of one 4096 x 400 x 400 product of the MLP (the step's commonest), median of ``reps``, in float32
    (through ctrkit's CPU path: oneDNN or BLAS) and under bf16 autocast. The same code ran at half the rate on
    this VM on different days; the probe puts each run's samples/s beside the host's rate at the time."""
    import torch

    from ctrkit.nn.mlp import linear

    layer, x = torch.nn.Linear(400, 400), torch.randn(4096, 400)
    rates = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        times = []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for i in range(reps + 3):
                t0 = time.perf_counter()
                linear(x, layer)
                if i >= 3:
                    times.append(time.perf_counter() - t0)
        rates[name] = 2 * 4096 * 400 * 400 / median(times) / 1e9
    return rates


def _machine(gemm: bool = False) -> dict[str, Any]:
    """The machine and the libraries a run's figures depend on (float32 products: oneDNN or BLAS); ``gemm``:
    with the host's product rate now (:func:`_gemm_gflops`)."""
    import polars as pl

    from ctrkit.devices import onednn_fp32

    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "polars": pl.__version__, "cpu_gemm_fp32": "onednn" if onednn_fp32() else "blas",
            "loadavg_1m_start": _loadavg()}
    if gemm:
        info["gemm_gflops"] = _gemm_gflops()
    return info


def _print_table(report: dict[str, Any]) -> None:
    lines = [f"{'run':30s} {'rows':>10s} {'rows/s':>12s} {'wall s':>8s} {'peak RSS MB':>12s} {'ids':>10s}"]
    for key, label in (("ctrkit", "ctrkit encode_files (median)"), ("ctrkit_doubled", "ctrkit, files doubled"),
                       ("ctrkit_twice", "ctrkit, fresh 2x rows")):
        if key in report:
            s = report[key]
            lines.append(f"{label:30s} {s['rows']:>10,d} {s['rows_per_s_median']:>12,.0f} {s['wall_s_median']:>8.2f} "
                         f"{s['peak_rss_mb_max']:>12,.0f} {s['all'][0]['n_ids']:>10,d}")
    fx = report.get("fuxictr")
    if fx and "error" not in fx:
        lib = fx["rows_per_s_library"]
        lines.append(f"{'FuxiCTR preprocess':30s} {fx['rows']:>10,d} {fx['rows_per_s_process']:>12,.0f} "
                     f"{fx['wall_s']:>8.2f} {fx['peak_rss_mb']:>12,.0f}")
        if lib:
            lines.append(f"{'  (as FuxiCTR times itself)':30s} {'':>10s} {lib:>12,.0f}")
        ratio = report["ctrkit"]["rows_per_s_median"] / (lib or fx["rows_per_s_process"])
        report["speedup_vs_fuxictr"] = ratio
        lines.append(f"ctrkit / FuxiCTR rows/s: {ratio:.1f}x")
    elif fx:
        lines.append(f"FuxiCTR failed: {fx['error']}")
    for key, label in (("ctrkit_doubled", "doubled"), ("ctrkit_twice", "fresh 2x rows")):
        if key in report:
            a, b = report["ctrkit"]["peak_rss_mb_max"], report[key]["peak_rss_mb_max"]
            report[f"peak_rss_ratio_{key}"] = b / a
            lines.append(f"peak RSS, {label} / single: {b / a:.2f}")
    print("\n".join(lines))


TRAIN_ROWS = 1_000_000


def _child_train(args: argparse.Namespace) -> None:
    """Runs inside the measured subprocess: one epoch of DeepFM at one precision, then a RESULT line."""
    import numpy as np
    import torch

    sys.path.insert(0, os.environ.get("PEERS_HARNESS", str(ROOT.parent / "shared" / "peers")))
    from benchutil import StepTimer

    from ctrkit.data.dataset import EncodedData
    from ctrkit.evaluate.metrics import evaluate
    from ctrkit.models import ModelConfig, build_model
    from ctrkit.nn.embedding import FeatureSpec
    from ctrkit.training.trainer import TrainConfig, predict_proba, train

    enc = Path(args.child_out)
    meta = json.loads((enc / "spec.json").read_text())
    spec = FeatureSpec.from_dict(meta)
    full = EncodedData.open(enc / "train")
    train_set = full.take(np.arange(min(TRAIN_ROWS, len(full))))
    test_set = EncodedData.open(enc / "test")
    torch.manual_seed(0)
    model = build_model("deepfm", spec, ModelConfig(embed_dim=16, hidden=(400, 400, 400), dropout=0.0,
                                                    batch_norm=False, emb_l2=1e-5))
    # the harness counts a step's rows from the hooked module's tensor input: the embedding table gets the batch's
    # ids once per step (the MLP's layers run as fused products, not as module calls)
    timer = StepTimer(model.embedding.table)
    cfg = TrainConfig(epochs=1, batch_size=4096, lr=1e-3, progress=False, precision=args.child_precision,
                      compile=args.child_compile or "auto")
    t0 = time.perf_counter()
    res = train(model, train_set, None, cfg)
    fit_s = time.perf_counter() - t0
    timer.remove()
    tp = timer.throughput(4096, warmup=10)
    p = predict_proba(model, test_set)
    m = evaluate(np.asarray(test_set.label), p)
    row = {"precision": args.child_precision, "compile": cfg.compile, "train_samples_per_s": tp["samples_per_s"],
           "median_step_ms": tp["median_step_ms"], "epoch_samples_per_s": res.samples_per_s,
           "fit_wall_s": fit_s, "test_auc": m["auc"], "test_logloss": m["logloss"], "train_rows": len(train_set),
           "test_rows": len(test_set), "threads": torch.get_num_threads(),
           "parameters": int(sum(q.numel() for q in model.parameters())),
           "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print("RESULT " + json.dumps(row), flush=True)


def _encode_for_training(files: dict[str, Path], out: Path) -> dict[str, Any]:
    """Encode the three files once (vocabularies from the train split) and record the feature spec."""
    from ctrkit.data.encode import encode_files
    from ctrkit.nn.embedding import FeatureSpec

    shutil.rmtree(out, ignore_errors=True)
    res = encode_files(criteo_schema(), files["train"], out, valid=files["valid"], test=files["test"])
    (out / "spec.json").write_text(json.dumps(FeatureSpec.from_encoder(res.encoder).to_dict()))
    return {"n_ids": res.encoder.n_ids, "seconds": res.seconds, "rows": res.rows}


def stage_train(args: argparse.Namespace) -> dict[str, Any]:
    """One epoch of DeepFM: ctrkit at each precision, then FuxiCTR on the same files, same run."""
    from bench import peers

    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = _files(data)
    report: dict[str, Any] = {"stage": "train", "data": str(data), "machine": _machine(gemm=True),
                              "setup": "DeepFM emb 16, MLP 400-400-400, batch 4096, Adam 1e-3, emb L2 1e-5, "
                                       f"1 epoch on the first {TRAIN_ROWS:,} train rows, test on 200k rows"}
    enc_dir = out / "train_encoded"
    report["encode"] = _encode_for_training(files, enc_dir)
    report["ctrkit"] = []
    for prec in args.precisions.split(","):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-fit", "--child-out", str(enc_dir),
               "--child-precision", prec, "--child-compile", args.compile]
        load = _loadavg()
        r = peers.run_peer(cmd, {"PYTHONPATH": str(ROOT / "src")}, cwd=ROOT)
        if r["returncode"] != 0 or not r["results"]:
            raise SystemExit(f"ctrkit train ({prec}) failed:\n{r['stdout_tail']}")
        row = {**r["results"][-1], "peak_rss_mb": r["peak_rss_mb"], "loadavg_1m_before": load}
        report["ctrkit"].append(row)
        print(f"ctrkit {prec}: {row['train_samples_per_s']:,.0f} samples/s, test AUC {row['test_auc']:.4f}, "
              f"logloss {row['test_logloss']:.4f}", flush=True)
    if args.peer:
        fx_work = Path(args.fuxictr_work)
        if not (fx_work / "data").exists():
            print("FuxiCTR preprocessing first (about 80-110 s) ...", flush=True)
            pre = peers.fuxictr_preprocess(data, fx_work)
            if pre["returncode"] != 0:
                raise SystemExit(f"FuxiCTR preprocessing failed:\n{pre['stdout_tail']}")
        print("FuxiCTR DeepFM, one epoch (about 60 s) ...", flush=True)
        load = _loadavg()
        r = peers.fuxictr_train(data, fx_work, results_path=out / "fuxictr_train.jsonl",
                                log_path=out / "fuxictr_train.log")
        if r["returncode"] != 0:
            raise SystemExit(f"FuxiCTR training failed:\n{r['stdout_tail']}")
        get = lambda k: peers.result_value(r, k)  # noqa: E731
        report["fuxictr"] = {"train_samples_per_s": get("train_samples_per_s"), "fit_wall_s": get("fit_wall_seconds"),
                             "test_auc": get("test_AUC"), "test_logloss": get("test_logloss"),
                             "peak_rss_mb": r["peak_rss_mb"], "loadavg_1m_before": load}
    lines = [f"{'run':22s} {'samples/s':>10s} {'vs FuxiCTR':>10s} {'test AUC':>9s} {'logloss':>8s} {'peak MB':>8s}"]
    fx = report.get("fuxictr")
    for row in report["ctrkit"]:
        ratio = row["train_samples_per_s"] / fx["train_samples_per_s"] if fx else float("nan")
        row["speedup_vs_fuxictr"] = ratio
        lines.append(f"{'ctrkit ' + row['precision']:22s} {row['train_samples_per_s']:>10,.0f} {ratio:>9.2f}x "
                     f"{row['test_auc']:>9.4f} {row['test_logloss']:>8.4f} {row['peak_rss_mb']:>8,.0f}")
    if fx:
        lines.append(f"{'FuxiCTR 2.3.10':22s} {fx['train_samples_per_s']:>10,.0f} {1.0:>9.2f}x {fx['test_auc']:>9.4f} "
                     f"{fx['test_logloss']:>8.4f} {fx['peak_rss_mb']:>8,.0f}")
    rate = report["machine"]["gemm_gflops"]
    lines.append(f"host's 4096x400x400 product at the start: {rate['fp32']:.0f} GFLOP/s fp32, "
                 f"{rate['bf16']:.0f} bf16")
    print("\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    from provenance import write_record

    path = RESULTS / "criteo_train.json"
    write_record(path, report)
    shutil.rmtree(enc_dir, ignore_errors=True)
    return report


STAGES = {"encode": stage_encode, "train": stage_train}


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the chosen stage."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=sorted(STAGES), default="encode")
    p.add_argument("--data", default="/tmp/peerbench/data", help="folder with train.tsv, valid.tsv, test.tsv")
    p.add_argument("--out", default="/tmp/ctrkit_bench", help="scratch folder for outputs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-double", dest="double", action="store_false", help="skip the doubled-files run")
    p.add_argument("--keep-doubled", action="store_true", help="keep the doubled files for a later run")
    p.add_argument("--no-peer", dest="peer", action="store_false", help="skip FuxiCTR")
    p.add_argument("--twice", default=None,
                   help="folder with a fresh draw of twice the rows (gen_synth_criteo.py --rows 4000000 "
                        "--split 3200000,400000,400000), for a memory check with a vocabulary that grows naturally")
    p.add_argument("--precisions", default="fp32,bf16", help="ctrkit precisions for --stage train")
    p.add_argument("--quiet-load", type=float, default=0.5,
                   help="before each timed run, wait until the 1-minute load average is below this")
    p.add_argument("--max-wait", type=float, default=0.0, help="longest wait for a quiet machine, seconds")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed encode runs right before each timed one (see WARMUP); 0 times the run after the wait")
    p.add_argument("--fuxictr-work", default="/tmp/peerbench/fx", help="FuxiCTR work folder (preprocessed data)")
    p.add_argument("--child-encode", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-fit", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="ctrkit's training step compiled (torch.compile) for --stage train: on, off, auto (GPU only)")
    for k in ("out", "train", "valid", "test", "precision", "compile"):
        p.add_argument(f"--child-{k}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_encode:
        _child_encode(args)
        return 0
    if args.child_fit:
        _child_train(args)
        return 0
    sys.path.insert(0, str(ROOT))
    QUIET[:] = [args.quiet_load, args.max_wait]
    WARMUP[:] = [args.warmup]
    STAGES[args.stage](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
