"""Probabilities a user can bid with: negative downsampling corrected exactly, and calibration on real logs.

Part 1, downsampling: a synthetic log (ctrkit.data.synth, 2% clicks, 600k impressions cut by time into 40% train,
10% valid and 50% test, so the test rate is known to about 1%). The default-sized LR is trained on every row and
on all positives plus 5% of the negatives (`--neg-sample-rate 0.05`), both without a calibrator, so the exact
correction q = p / (p + (1 - p) / W) is all that stands between the sampled model and the true rate; the
uncorrected network's figures (`*_raw`) show the gap.

Part 2, calibration: Frappe_x1 DeepFM (the bench_frappe files) and the six OBD logs of bench_small_logs.py, with
defaults. Platt, isotonic and centred isotonic (cir) maps are fitted on the validation rows' logits, and the test
ECE and AUC of each are compared with the raw model's; the OBD row also gives the pred/actual ratio that
`ctrkit train` serves with its defaults (`--calibrate auto`).

    python bench/bench_calibration.py [--parts downsampling,frappe,obd] [--data ../shared/datasets]

Prints tables and writes bench/results/calibration.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_small_logs  # noqa: E402
from provenance import write_record  # noqa: E402

ROOT = HERE.parent


def downsampling(work: Path, rows: int, seed: int) -> dict:
    """LR on all rows and on 5% of the negatives; served and raw test figures of each."""
    import ctrkit
    from ctrkit.data.synth import make_click_log, split_by_time, synth_schema

    log, _ = make_click_log(n_rows=rows, ctr=0.02, seed=seed)
    for name, part in zip(("train", "valid", "test"), split_by_time(log.drop("p_click"), (0.4, 0.1, 0.5))):
        part.write_csv(work / f"{name}.csv")
    out = {}
    for label, w in (("all rows", 1.0), ("negatives at W=0.05", 0.05)):
        run = ctrkit.train(work / "train.csv", schema=synth_schema(), valid=work / "valid.csv",
                           test=work / "test.csv", model="lr", seed=seed, calibrate="none", neg_sample_rate=w,
                           progress=False)
        t = run.metrics["test"]
        out[label] = {"train_rows": run.metrics["train"]["rows"], **{k: t[k] for k in (
            "auc", "logloss", "ece", "pred_actual_ratio", "mean_pred", "positive_rate", "n", "positives",
            "logloss_raw", "ece_raw", "pred_actual_ratio_raw")}}
    a, b = out["all rows"], out["negatives at W=0.05"]
    out["served_rate_error"] = b["mean_pred"] / b["positive_rate"] - 1
    out["logloss_vs_all_rows"] = b["logloss"] / a["logloss"] - 1
    return out


def calibration(files: dict, model: str, work: Path, seed: int) -> dict:
    """Defaults; then Platt, isotonic and cir fitted on the validation logits, scored on the test logits."""
    import ctrkit
    from ctrkit.evaluate.calibrate import fit_calibrator
    from ctrkit.evaluate.metrics import evaluate

    out_dir = work / f"{model}-cal"
    kwargs = {k: files[k] for k in ("fmt", "fields") if k in files}
    run = ctrkit.train(files["train"], schema=files.get("schema"), valid=files["valid"], test=files["test"],
                       model=model, seed=seed, out=out_dir, progress=False, **kwargs)
    data = np.load(out_dir / "report_data.npz")
    zv, yv, zt, yt = data["valid/logits"], data["valid/label"], data["test/logits"], data["test/label"]
    res = {"served_by_default": {k: run.metrics["test"][k] for k in ("auc", "logloss", "ece", "pred_actual_ratio",
                                                                     "positives", "n")},
           "default_calibration": run.metrics["calibration"]["method"]}
    res["raw"] = evaluate(yt, 1 / (1 + np.exp(-zt)))
    for method in ("platt", "isotonic", "cir"):
        res[method] = evaluate(yt, fit_calibrator(method, zv, yv)(zt))
    raw, platt = 1 / (1 + np.exp(-zt)), fit_calibrator("platt", zv, yv)(zt)
    res["ece_floor"] = ece_floor(raw, seed)
    res["platt_minus_raw_ece"] = paired_bootstrap(yt, platt, raw, seed)
    return res


def paired_bootstrap(y: np.ndarray, p: np.ndarray, q: np.ndarray, seed: int, draws: int = 2000) -> dict:
    """ECE(p) - ECE(q) over test rows resampled with replacement (both maps fixed): median and 95% interval."""
    from ctrkit.evaluate.metrics import ece

    rng = np.random.default_rng(seed)
    d = []
    for _ in range(draws):
        i = rng.integers(0, len(y), len(y))
        d.append(ece(y[i], p[i]) - ece(y[i], q[i]))
    return {"median": float(np.median(d)), "low": float(np.percentile(d, 2.5)), "high": float(np.percentile(d, 97.5))}


def ece_floor(p: np.ndarray, seed: int, draws: int = 500) -> dict:
    """The test ECE a perfectly calibrated model would show: labels drawn from ``p`` itself, scored against ``p``
    (median and 95% range over ``draws``). With few clicks per bin this floor is far above zero, and a raw ECE
    inside its range says the test rows cannot tell the model from a calibrated one."""
    from ctrkit.evaluate.metrics import ece

    rng = np.random.default_rng(seed)
    e = [ece((rng.random(len(p)) < p).astype(np.float64), p) for _ in range(draws)]
    return {"median": float(np.median(e)), "low": float(np.percentile(e, 2.5)), "high": float(np.percentile(e, 97.5))}


def main() -> None:
    """Run the parts asked for and write the JSON record."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="downsampling,frappe,obd")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets")
    ap.add_argument("--rows", type=int, default=600_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "calibration.json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    bench_small_logs.DATASETS = args.data
    record: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": "python bench/bench_calibration.py "
                    + " ".join(sys.argv[1:])}
    parts = args.parts.split(",")
    if "downsampling" in parts:
        r = downsampling(Path(tempfile.mkdtemp(prefix="ctrkit-ds-")), args.rows, args.seed)
        record["downsampling"] = r
        print(f"{'training rows':22} {'rows':>8} {'AUC':>7} {'logloss':>8} {'pred/act':>8} {'raw pred/act':>12} "
              f"{'raw logloss':>11}")
        for k in ("all rows", "negatives at W=0.05"):
            m = r[k]
            print(f"{k:22} {m['train_rows']:8,} {m['auc']:7.4f} {m['logloss']:8.5f} {m['pred_actual_ratio']:8.4f} "
                  f"{m['pred_actual_ratio_raw']:12.3f} {m['logloss_raw']:11.5f}")
        print(f"served mean pCTR vs actual: {r['served_rate_error']:+.2%} (target within 3%); logloss vs all rows: "
              f"{r['logloss_vs_all_rows']:+.2%} (target within 1%)", flush=True)
    sets = {}
    if "frappe" in parts:
        d = args.data
        sets["frappe deepfm"] = ({"train": d / "frappe_x1_train_reconstructed" / "frappe.train.libfm.gz",
                                  "valid": d / "frappe_x1_nfm_partial" / "frappe.validation.libfm.gz",
                                  "test": d / "frappe_x1_nfm_partial" / "frappe.test.libfm.gz", "fmt": "libfm",
                                  "fields": "user,item,daytime,weekday,isweekend,homework,cost,weather,country,"
                                            "city".split(",")}, "deepfm")
    if "obd" in parts:
        work = Path(tempfile.mkdtemp(prefix="ctrkit-obd-"))
        sets["obd deepfm"] = (bench_small_logs.prepare_obd(work), "deepfm")
    for name, (files, model) in sets.items():
        r = calibration(files, model, Path(tempfile.mkdtemp(prefix="ctrkit-cal-")), args.seed)
        record[name] = r
        fl = r["ece_floor"]
        print(f"\n{name}: test ECE raw {r['raw']['ece']:.5f} (a calibrated model's: {fl['median']:.5f}, 95% "
              f"{fl['low']:.5f}-{fl['high']:.5f}), Platt {r['platt']['ece']:.5f} (Platt - raw, bootstrap 95%: "
              f"{r['platt_minus_raw_ece']['low']:+.5f} to {r['platt_minus_raw_ece']['high']:+.5f}), isotonic "
              f"{r['isotonic']['ece']:.5f}, cir {r['cir']['ece']:.5f}; logloss raw {r['raw']['logloss']:.5f}, Platt "
              f"{r['platt']['logloss']:.5f}, isotonic {r['isotonic']['logloss']:.5f}, cir {r['cir']['logloss']:.5f}; "
              f"AUC raw {r['raw']['auc']:.5f}, isotonic {r['isotonic']['auc']:.5f}, cir {r['cir']['auc']:.5f}; "
              f"served by default ({r['default_calibration']}): pred/actual "
              f"{r['served_by_default']['pred_actual_ratio']:.3f}, ECE {r['served_by_default']['ece']:.5f}, "
              f"AUC {r['served_by_default']['auc']:.4f} ({r['served_by_default']['positives']} test clicks)",
              flush=True)
    write_record(args.out, record)


if __name__ == "__main__":
    main()
