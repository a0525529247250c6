"""Frappe_x1: every model of the zoo with its shipped defaults, over several seeds, in one table.

Train = shared/datasets/frappe_x1_train_reconstructed, valid/test = shared/datasets/frappe_x1_nfm_partial. Each
(model, seed) runs as the CLI a user would type (`ctrkit train --model M --seed S`, a subprocess, one after the
other) and its row is appended to a JSONL file as soon as it finishes: a rerun skips the pairs already there, so
an interrupted invocation resumes. `--peers` runs FuxiCTR's DCNv2 and FinalMLP with their BARS Frappe_x1 settings
(bench/peers.py, FRAPPE_ZOO) on the same split right after ctrkit's runs of each seed, and adds a table of AUC
difference and training-time ratio, model for model (set up the peers first: bench/setup_peers.sh).

    python bench/bench_zoo.py                                  # every model, seeds 0 1 2
    python bench/bench_zoo.py --models deepfm,fibinet --seeds 0
    python bench/bench_zoo.py --models finalmlp*2              # an ensemble of two (`--ensemble 2`)
    python bench/bench_zoo.py --models 'finalmlp*2,finalmlp<finalmlp*2'   # and a FinalMLP distilled from it

A model written NAME*N is a deep ensemble of N models NAME (`ctrkit train --model NAME --ensemble N`, seeds S to
S+N-1): a row of its own, whose step time is N times its members' (they train one after the other). NAME<TEACHER
is NAME trained on the probabilities of the TEACHER entry's bundle of the same seed S (`ctrkit train --model NAME
--distill BUNDLE`), which an earlier entry of the list trains; its weights start from seed S+N, which none of the
teacher's N members had; its times leave the teacher's training out.

Prints the table (test AUC / logloss mean and spread, parameters, seconds per epoch, training step time relative
to DeepFM's, BARS target) and writes bench/results/zoo.json. The step times come from one interleaved timing at the
end: every model with its defaults takes one training step on the same Frappe-shaped batch in turn (so they share
whatever load the machine has), and the median over 12 steps is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_frappe  # noqa: E402
import peers  # noqa: E402

ROOT = HERE.parent
DATASETS = ROOT.parent / "shared" / "datasets"
BARS_NAMES = {"lr": "LR", "fm": "FM", "ffm": "FFM", "dnn": "YoutubeDNN", "wide_deep": "Wide&Deep", "deepfm": "DeepFM",
              "dcn": "DCN", "dcnv2": "DCN-V2", "xdeepfm": "xDeepFM", "autoint": "AutoInt", "autoint_plus": "AutoInt+",
              "fibinet": "FiBiNET", "dlrm": "DLRM", "finalmlp": "FinalMLP", "finalnet": "FinalNet"}
PEER_MODELS = {"dcnv2": "DCNv2", "finalmlp": "FinalMLP"}  # ctrkit name -> FuxiCTR model-zoo name (`--peers`)


def bars_targets(datasets: Path) -> dict[str, float]:
    """Frappe_x1 AUC per ctrkit model name, read from the reference table at run time."""
    out: dict[str, float] = {}
    bars = datasets / "REFERENCE_RESULTS.md"
    if not bars.exists():
        return out
    by_name = {v: k for k, v in BARS_NAMES.items()}
    for line in bars.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 1 and cells[0] in by_name and "/" in cells[1]:
            out[by_name[cells[0]]] = float(cells[1].split("/")[0])
    return out


def members(entry: str) -> tuple[str, int]:
    """A --models entry as (model, ensemble members): "finalmlp" -> ("finalmlp", 1), "finalmlp*2" -> (.., 2);
    "finalmlp<finalmlp*2" (distilled from a teacher) -> ("finalmlp", 1)."""
    name, _, n = entry.partition("<")[0].partition("*")
    return name, int(n) if n else 1


def folder(entry: str) -> str:
    """The run folder of an entry under its seed's: "finalmlp", "finalmlp-x2", "finalmlp-from-finalmlp-x2"."""
    student, _, teacher = entry.partition("<")
    model, n = members(student)
    name = model if n == 1 else f"{model}-x{n}"
    return f"{name}-from-{folder(teacher)}" if teacher else name


def step_seconds(row: dict) -> float:
    """Median over epochs of the seconds one training step took (batch size / samples per second); an ensemble's
    is its members' summed (they train one after the other)."""
    histories = row.get("member_histories") or [row["history"]]
    return sum(row["batch_size"] / statistics.median(h["samples_per_s"] for h in hist) for hist in histories)


def run_one(entry: str, seed: int, work: Path) -> dict:
    """One `ctrkit train` run with the extra fields the zoo table needs."""
    model, n = members(entry)
    teacher = entry.partition("<")[2]
    bundle = work / f"seed{seed}" / folder(teacher) / "bundle" if teacher else None
    if bundle is not None and not bundle.is_dir():
        raise RuntimeError(f"{entry}: no teacher bundle {bundle}; list {teacher!r} before {entry!r} in --models")
    out = work / f"seed{seed}" / folder(entry)
    own_seed = seed + (members(teacher)[1] if teacher else 0)  # a distilled model: a seed no teacher member had
    row = bench_frappe.run_ctrkit(model, out, own_seed, ensemble=n, distill=bundle)
    m = json.loads((out / "metrics.json").read_text())
    tr = m["train"]
    histories = [r["history"] for r in tr["members"]] if n > 1 else [tr["history"]]
    row.update(model=entry, seed=seed, parameters=m["model"]["parameters"], history=histories[0],
               batch_size=tr["config"]["batch_size"],
               epoch_seconds=sum(statistics.median(h["train_seconds"] for h in hist) for hist in histories))
    if n > 1:
        row["member_histories"] = histories
    return row


def run_peer(model: str, seed: int, work: Path) -> dict:
    """FuxiCTR's `model` with its BARS Frappe_x1 settings on the same split (FuxiCTR seed = 2021 + ``seed``),
    with the 1-minute load average before and after."""
    csv_dir = work / "frappe_csv"
    if not (csv_dir / "test.csv").exists():
        conv = peers.frappe_to_csv(csv_dir, bench_frappe.TRAIN, bench_frappe.VALID, bench_frappe.TEST)
        if conv["returncode"] != 0:
            raise RuntimeError(f"frappe_to_csv failed:\n{conv['stdout_tail']}")
    load0 = os.getloadavg()[0]
    run = peers.fuxictr_zoo_frappe(PEER_MODELS[model], csv_dir, work / "fuxictr", seed=2021 + seed,
                                   log_path=work / "fuxictr" / f"{model}_seed{seed}.log")
    if run["returncode"] != 0:
        raise RuntimeError(f"FuxiCTR {PEER_MODELS[model]} failed:\n{run['stdout_tail']}")
    get = lambda k: peers.result_value(run, k)  # noqa: E731
    return {"lib": "fuxictr 2.3.10", "model": f"fuxictr:{model}", "seed": seed, "test_auc": get("test_AUC"),
            "test_logloss": get("test_logloss"), "train_seconds": get("fit_wall_seconds"),
            "epochs": round(get("epochs")), "parameters": get("parameters"), "wall_s": run["wall_s"],
            "peak_rss_mb": run["peak_rss_mb"], "load": [load0, os.getloadavg()[0]]}


def peer_table(rows: list[dict]) -> list[dict]:
    """ctrkit against FuxiCTR, model for model and seed for seed: AUC difference and training-time ratio."""
    out = []
    for r in rows:
        if not r["model"].startswith("fuxictr:"):
            continue
        ours = next((o for o in rows if o["model"] == r["model"][8:] and o["seed"] == r["seed"]), None)
        if ours is None:
            continue
        out.append({"model": ours["model"], "seed": r["seed"], "ctrkit_auc": ours["test_auc"],
                    "fuxictr_auc": r["test_auc"], "auc_diff": ours["test_auc"] - r["test_auc"],
                    "ctrkit_seconds": ours["train_seconds"], "fuxictr_seconds": r["train_seconds"],
                    "time_ratio": ours["train_seconds"] / r["train_seconds"], "ctrkit_epochs": ours["epochs"],
                    "fuxictr_epochs": r["epochs"], "load": (ours.get("load") or []) + r["load"],
                    "met": ours["test_auc"] >= r["test_auc"] and ours["train_seconds"] <= 0.5 * r["train_seconds"]})
    return out


def step_times(models: list[str], spec_json: Path, steps: int = 12, batch_size: int = 4096) -> dict[str, float]:
    """Median seconds of one training step (forward, loss, backward, optimizer) of each model with its defaults on
    Frappe-shaped random batches, the models taking turns step by step so that they share the machine's load; in
    the precision the runs trained in (``precision auto`` for their training rows)."""
    import numpy as np
    import torch

    from ctrkit.data.dataset import Batch, EncodedData
    from ctrkit.models import build_model
    from ctrkit.nn.embedding import FeatureSpec
    from ctrkit.training.step import TrainStep
    from ctrkit.training.trainer import resolve_precision

    spec = FeatureSpec.from_dict(json.loads(spec_json.read_text())["spec"])
    gen = np.random.default_rng(0)
    offsets = np.cumsum((0,) + spec.field_sizes[:-1])
    ids = (gen.integers(0, np.array(spec.field_sizes), (20 * batch_size, spec.n_sparse)) + offsets).astype(np.int32)
    label = gen.integers(0, 2, len(ids)).astype(np.float32)
    data = EncodedData(ids, np.zeros((len(ids), 0), np.float32), label)
    train_rows = json.loads((spec_json.parent.parent / "metrics.json").read_text())["train"]["rows"]
    bf16 = resolve_precision("auto", torch.device("cpu"), train_rows) == "bf16"
    nets = {}
    for m in sorted({members(e)[0] for e in models}):
        torch.manual_seed(0)
        net = build_model(m, spec)
        net.fit_features(data)
        net.train()
        nets[m] = TrainStep(net, torch.device("cpu"), bf16=bf16)  # the trainer's step: loss, backward, update
    times: dict[str, list[float]] = {m: [] for m in nets}
    for step in range(steps + 2):
        rows = gen.integers(0, len(ids), batch_size)
        batch = Batch(torch.from_numpy(ids[rows]), torch.zeros(batch_size, 0), torch.from_numpy(label[rows]))
        for m, train_step in nets.items():
            t0 = time.perf_counter()
            train_step(batch)
            train_step.loss_mean()  # waits for the step
            if step >= 2:  # two warm-up steps
                times[m].append(time.perf_counter() - t0)
    return {e: members(e)[1] * statistics.median(times[members(e)[0]]) for e in models}


def summarise(rows: list[dict], models: list[str], datasets: Path, steps: dict[str, float] | None = None) -> list[dict]:
    """One line per model: means and spreads over its seeds, step time relative to DeepFM's (from ``steps``, the
    interleaved step timing, when given; else from the runs' own throughput)."""
    targets = bars_targets(datasets)
    step = {m: statistics.median(step_seconds(r) for r in rows if r["model"] == m) for m in models
            if any(r["model"] == m for r in rows)}
    step.update(steps or {})
    base = step.get("deepfm")
    table = []
    for m in models:
        rs = [r for r in rows if r["model"] == m]
        if not rs:
            continue
        auc, ll = [r["test_auc"] for r in rs], [r["test_logloss"] for r in rs]
        target = targets.get(m)  # a BARS figure is one model's: none for an ensemble
        table.append({"model": m, "seeds": len(rs), "auc_mean": statistics.mean(auc),
                      "auc_spread": max(auc) - min(auc), "logloss_mean": statistics.mean(ll),
                      "logloss_spread": max(ll) - min(ll), "parameters": rs[0]["parameters"],
                      "epoch_seconds": statistics.median(r["epoch_seconds"] for r in rs),
                      "epochs": statistics.median(r["epochs"] for r in rs),
                      "step_ms": 1000 * step[m], "step_vs_deepfm": step[m] / base if base else None,
                     "timed_step": bool(steps and m in steps),
                      "bars_auc": target, "meets_bars": None if target is None else
                      statistics.mean(auc) >= target - 0.001})
    return table


def markdown(table: list[dict]) -> str:
    """The table as the Markdown BENCHMARKS.md holds."""
    lines = ["| model | seeds | test AUC mean (spread) | test logloss mean (spread) | parameters | s / epoch | "
             "step ms | step / DeepFM's | BARS AUC | mean >= BARS - 0.001 |", "|" + "---|" * 10]
    for t in table:
        rel = f"{t['step_vs_deepfm']:.2f}" if t["step_vs_deepfm"] is not None else ""
        ok = "" if t["meets_bars"] is None else ("yes" if t["meets_bars"] else "**no**")
        lines.append(f"| {t['model']} | {t['seeds']} | {t['auc_mean']:.5f} ({t['auc_spread']:.5f}) | "
                     f"{t['logloss_mean']:.5f} ({t['logloss_spread']:.5f}) | {t['parameters']:,} | "
                     f"{t['epoch_seconds']:.1f} | {t['step_ms']:.0f} | {rel} | {t['bars_auc'] or ''} | {ok} |")
    return "\n".join(lines)


def main() -> None:
    """Run the missing (model, seed) pairs, then print and write the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="comma-separated (default: every registered model)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--no-step-timing", dest="step_timing", action="store_false",
                    help="skip the interleaved step timing (step times then come from each run's throughput)")
    ap.add_argument("--summary-only", action="store_true", help="train nothing: summarise the rows already run")
    ap.add_argument("--steps-from", type=Path, default=None,
                    help="take the interleaved step times from an earlier zoo.json instead of timing again")
    ap.add_argument("--peers", action="store_true",
                    help="after ctrkit's dcnv2 and finalmlp, FuxiCTR's DCNv2 and FinalMLP (bench/setup_peers.sh)")
    ap.add_argument("--datasets", type=Path, default=DATASETS, help="the shared datasets folder")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "zoo", help="scratch folder and resume log")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "zoo.json")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from ctrkit.models import model_names
    models = args.models.split(",") if args.models else model_names()
    seeds = [int(s) for s in args.seeds.split(",")]
    bench_frappe.TRAIN = args.datasets / "frappe_x1_train_reconstructed" / "frappe.train.libfm.gz"
    bench_frappe.VALID = args.datasets / "frappe_x1_nfm_partial" / "frappe.validation.libfm.gz"
    bench_frappe.TEST = args.datasets / "frappe_x1_nfm_partial" / "frappe.test.libfm.gz"
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "rows.jsonl"
    rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []
    done = {(r["model"], r["seed"]) for r in rows}
    for seed in seeds:
        for model in models:
            if (model, seed) in done or args.summary_only:
                continue
            load0 = os.getloadavg()[0]
            row = run_one(model, seed, args.work)
            row["load"] = [load0, os.getloadavg()[0]]
            rows.append(row)
            with log.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"{model} seed {seed}: test AUC {row['test_auc']:.5f} logloss {row['test_logloss']:.5f} "
                  f"({row['epochs']} epochs, {row['train_seconds']:.1f}s)", flush=True)
        for model in (m for m in models if args.peers and m in PEER_MODELS and not args.summary_only):
            if (f"fuxictr:{model}", seed) not in done:  # right after ctrkit's runs of the same seed
                row = run_peer(model, seed, args.work)
                rows.append(row)
                with log.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(f"FuxiCTR {PEER_MODELS[model]} seed {seed}: test AUC {row['test_auc']:.5f} logloss "
                      f"{row['test_logloss']:.5f} ({row['epochs']} epochs, {row['train_seconds']:.1f}s)", flush=True)
    pairs = peer_table([r for r in rows if r["seed"] in seeds])
    rows = [r for r in rows if r["model"] in models and r["seed"] in seeds]
    steps = None
    spec_json = next(iter(sorted(args.work.glob("seed*/*/bundle/model.json"))), None)  # every run has Frappe's spec
    if args.steps_from:
        steps = {m: ms / 1000 for m, ms in json.loads(args.steps_from.read_text())["step_ms"].items()}
        print(f"step times of {args.steps_from} ({sorted(steps)})")
    elif args.step_timing and spec_json is not None:
        steps = step_times(sorted(set(models) | {"deepfm"}), spec_json)
        print("training step, median ms: " + ", ".join(f"{m} {1000 * t:.1f}" for m, t in steps.items()))
    table = summarise(rows, models, args.datasets, steps)
    print(f"\n{'model':13} {'seeds':>5} {'AUC mean':>9} {'spread':>7} {'logloss':>8} {'spread':>7} {'params':>10} "
          f"{'s/epoch':>8} {'step ms':>8} {'x DeepFM':>8} {'BARS':>7}  ok")
    for t in table:
        rel = f"{t['step_vs_deepfm']:.2f}" if t["step_vs_deepfm"] is not None else ""
        bars = f"{t['bars_auc']:.4f}" if t["bars_auc"] else ""
        ok = "" if t["meets_bars"] is None else ("yes" if t["meets_bars"] else "NO")
        print(f"{t['model']:13} {t['seeds']:5d} {t['auc_mean']:9.5f} {t['auc_spread']:7.5f} {t['logloss_mean']:8.5f} "
              f"{t['logloss_spread']:7.5f} {t['parameters']:10,d} {t['epoch_seconds']:8.2f} {t['step_ms']:8.1f} "
              f"{rel:>8} {bars:>7}  {ok}")
    print("\n" + markdown(table))
    if pairs:
        print("\n| model | seed | ctrkit AUC | FuxiCTR AUC | AUC diff | ctrkit train s | FuxiCTR train s | ratio | "
              "epochs (ctrkit / FuxiCTR) | 1-min load | met |\n" + "|---" * 11 + "|")
        for p in pairs:
            print(f"| {p['model']} | {p['seed']} | {p['ctrkit_auc']:.5f} | {p['fuxictr_auc']:.5f} | "
                  f"{p['auc_diff']:+.5f} | {p['ctrkit_seconds']:.1f} | {p['fuxictr_seconds']:.1f} | "
                  f"{p['time_ratio']:.3f} | {p['ctrkit_epochs']} / {p['fuxictr_epochs']} | "
                  f"{min(p['load']):.1f}-{max(p['load']):.1f} | {'yes' if p['met'] else 'no'} |")
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
              "command": "python bench/bench_zoo.py " + " ".join(sys.argv[1:]), "table": table, "peers": pairs, "rows": rows,
              "step_ms": {m: 1000 * t for m, t in (steps or {}).items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
