"""Frappe_x1 quality and training time: `ctrkit train` with its defaults beside FuxiCTR's DeepFM, same run.

Train = shared/datasets/frappe_x1_train_reconstructed (libFM), valid/test = shared/datasets/frappe_x1_nfm_partial.
Each ctrkit model runs as the CLI a user would type (a subprocess, defaults only), then FuxiCTR's DeepFM with the
BARS Frappe_x1 settings through the shared peer harness. Runs are sequential, never concurrent.

    python bench/bench_frappe.py                 # lr, fm, deepfm and the FuxiCTR DeepFM
    python bench/bench_frappe.py --skip-peer     # ctrkit only

Prints a table and writes bench/results/frappe.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import peers  # noqa: E402

ROOT = HERE.parent
DATASETS = ROOT.parent / "shared" / "datasets"
TRAIN = DATASETS / "frappe_x1_train_reconstructed" / "frappe.train.libfm.gz"
VALID = DATASETS / "frappe_x1_nfm_partial" / "frappe.validation.libfm.gz"
TEST = DATASETS / "frappe_x1_nfm_partial" / "frappe.test.libfm.gz"
FIELDS = "user,item,daytime,weekday,isweekend,homework,cost,weather,country,city"
TARGETS = {"deepfm": (0.9845, 0.155), "fm": (0.965, None), "lr": (0.93, None)}


def run_ctrkit(model: str, out: Path, seed: int, ensemble: int = 1, distill: Path | None = None) -> dict:
    """`ctrkit train` on Frappe into ``out`` with the model's defaults (``ensemble`` members: ``--ensemble N``;
    ``distill``: a teacher bundle); returns its metrics and outside measurements."""
    cmd = [sys.executable, "-m", "ctrkit", "train", str(TRAIN), "--valid", str(VALID), "--test", str(TEST),
           "--format", "libfm", "--fields", FIELDS, "--model", model, "--out", str(out), "--seed", str(seed),
           "--quiet", *(["--ensemble", str(ensemble)] if ensemble > 1 else []),
           *(["--distill", str(distill)] if distill is not None else [])]
    run = peers.run_peer(cmd, {"PYTHONPATH": str(ROOT / "src")}, cwd=ROOT)
    if run["returncode"] != 0:
        raise RuntimeError(f"ctrkit train {model} failed:\n{run['stdout_tail']}")
    m = json.loads((out / "metrics.json").read_text())
    # valid_auc is served, so in-sample for the calibrator fitted on those rows; compare settings by valid_auc_raw
    return {"lib": "ctrkit", "model": model, "test_auc": m["test"]["auc"], "test_logloss": m["test"]["logloss"],
            "valid_auc": m["valid"]["auc"], "valid_auc_raw": m["valid"].get("auc_raw"),
            "epochs": m["train"]["epochs"], "best_epoch": m["train"]["best_epoch"],
            "train_seconds": m["train"]["seconds"], "samples_per_s": m["train"]["samples_per_s"],
            "wall_s": run["wall_s"], "peak_rss_mb": run["peak_rss_mb"], "command": " ".join(cmd[1:])}


def run_fuxictr(work: Path) -> dict:
    """FuxiCTR 2.3.10 DeepFM with BARS's DeepFM_frappe_x1 settings (emb 10, MLP 400x3, BN, dropout, reg 0.05)."""
    csv_dir = work / "frappe_csv"
    if not (csv_dir / "test.csv").exists():
        conv = peers.frappe_to_csv(csv_dir)
        if conv["returncode"] != 0:
            raise RuntimeError(f"frappe_to_csv failed:\n{conv['stdout_tail']}")
    run = peers.fuxictr_frappe(csv_dir, work / "fx_frappe", results_path=work / "fx_results.jsonl")
    if run["returncode"] != 0:
        raise RuntimeError(f"FuxiCTR failed:\n{run['stdout_tail']}")
    get = lambda k: peers.result_value(run, k)  # noqa: E731
    return {"lib": "fuxictr 2.3.10", "model": "deepfm", "test_auc": get("test_AUC"),
            "test_logloss": get("test_logloss"), "train_seconds": get("fit_wall_seconds"),
            "samples_per_s": get("train_samples_per_s"), "wall_s": run["wall_s"], "peak_rss_mb": run["peak_rss_mb"]}


def main() -> None:
    """Run the comparison and write the JSON record."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lr,fm,deepfm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "frappe.json")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ctrkit-frappe-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models.split(","):
        rows.append(run_ctrkit(model, work / model, args.seed))
        print(json.dumps(rows[-1]), flush=True)
    if not args.skip_peer:
        rows.append(run_fuxictr(work))
        print(json.dumps(rows[-1]), flush=True)
    ours = next((r for r in rows if r["lib"] == "ctrkit" and r["model"] == "deepfm"), None)
    peer = next((r for r in rows if r["lib"].startswith("fuxictr")), None)
    ratio = ours["train_seconds"] / peer["train_seconds"] if ours and peer else None
    print(f"\n{'lib':16} {'model':7} {'test AUC':>9} {'logloss':>8} {'epochs':>6} {'train s':>8} {'samples/s':>10}"
          f" {'peak MB':>8}  target")
    for r in rows:
        tgt = TARGETS.get(r["model"]) if r["lib"] == "ctrkit" else None
        target = (f"AUC>={tgt[0]}" + (f", logloss<={tgt[1]}" if tgt[1] else "")) if tgt else ""
        print(f"{r['lib']:16} {r['model']:7} {r['test_auc']:9.5f} {r['test_logloss']:8.5f} "
              f"{str(r.get('epochs', '')):>6} {r['train_seconds']:8.1f} {r['samples_per_s']:10,.0f} "
              f"{r['peak_rss_mb']:8.0f}  {target}")
    if ratio is not None:
        print(f"\nctrkit DeepFM training time / FuxiCTR's: {ratio:.3f} (target <= 0.5)")
    record = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{__import__('os').cpu_count()} cores", "command": "python bench/bench_frappe.py " + " ".join(sys.argv[1:]),
              "rows": rows, "train_time_ratio": ratio}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
