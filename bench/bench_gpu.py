"""GPU training benchmark: ctrkit's training path against a hand-written PyTorch reference, in one process.

Data: ``--rows`` training rows plus 10% validation and 10% test rows drawn by the shared synthetic Criteo
generator (``gen_synth_criteo.generate_arrays``, seed 20251122: 13 numeric and 26 categorical fields), encoded
here the way ctrkit's encoder does it (per field: id 0 missing, 1 out of vocabulary, then the values seen at least
twice in the training rows; numerics log1p, standardised on the training rows, NaN = missing). Encoding is
one-time work and is not timed.

* ``speed``: for each batch size, the hand-written reference (``bench/gpu_reference.py``: one epoch after 20
  compiled warm-up steps, training steps only) and ``ctrkit.training.trainer.train`` with ``device="cuda"``
  (DeepFM, embedding 16, MLP 400-400-400, no dropout or batch norm, Adam 1e-3, early stopping on validation
  AUC with patience 1). ctrkit's samples/s is end to end: training rows over the wall time of a whole epoch,
  shuffling, batch gathering, the last partial batch and the validation pass included; the first epoch, which
  also compiles, is reported apart. Time to quality is the wall time from the call of ``train`` to the end of
  the epoch that reached the final (best) validation AUC, compilation included; the test AUC is of the restored
  best weights. The large batch also runs with ``large_batch="cowclip"`` and ``"off"``, to show what the default
  rule ("rows") changes.
* ``zoo``: the other registered models among DCNv2, xDeepFM, FinalMLP, AutoInt+ and DIN (over an added
  behaviour sequence of 10 ids of C4, :func:`with_history`) at the largest batch
  size, two epochs, the second timed.
* ``rules``: DeepFM at the largest batch size under variants of the large-batch rule (the shipped "rows" rule,
  half its power, with CowClip and the L2 scaled, CowClip alone, the dense rule alone) and at 4,096 in fp32, to
  show what each part of the rule does.
* ``big``: ``--big-rows`` rows resampled from the training rows, one epoch, resident on the GPU, with the
  GPU's utilisation sampled by ``nvidia-smi`` every 100 ms.
* ``profile``: where the time of an epoch goes at the largest batch size, for the models of ``--profile``
  (:func:`profile_step`): the step replayed alone and as fed, the last batch, the finiteness checks, the
  validation pass, and the step's kernels by time.
* ``--harness-ref`` runs ``../shared/peers/gpu_plain_ref.py`` (its own random ids) in a subprocess of the same
  invocation, to show the reference here is at least as fast as the harness's.
* ``--fuxictr BUNDLE`` runs FuxiCTR 2.3.10's DeepFM on the same GPU in the same invocation, through the harness's
  ``gpu_bench.py`` in a subprocess (``bench/peer_bundle.sh`` builds the bundle: FuxiCTR's wheels for the GPU
  machine, its DeepFM model-zoo source, the harness scripts and the feature map FuxiCTR wrote for the harness's
  data; copy it there with the checkout). On the harness's data, not this script's: the first 1M of 2M rows of
  the same generator, in FuxiCTR's own encoding (checked against its feature map), the same model settings,
  each batch size time-boxed (``--fuxictr-seconds``). Reported: steady-state samples/s, and samples/s with its
  epoch boundaries and evaluation. ``--fuxictr-ttq BATCH`` also trains FuxiCTR's DeepFM to early stopping on this
  script's own rows, in its own encoding (``bench/fuxictr_ttq.py``): its time to quality beside ctrkit's.

Prints a table and writes ``<out>/gpu.json``. Usage::

    python bench/bench_gpu.py --peers ../shared/peers [--rows 10000000] [--batch-sizes 4096,16384,65536]
        [--parts speed,rules,zoo,big] [--harness-ref] [--fuxictr .peerbench [--fuxictr-ttq 65536]]
        [--compile max] [--out bench/results]

Scoring on the GPU (1,000 raw candidates through a bundle) is ``bench/bench_gpu_score.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from provenance import source_commit  # noqa: E402

ZOO = ("dcnv2", "xdeepfm", "finalmlp", "autoint_plus", "din")
RULES = {  # large-batch rule variants: LargeBatchRule fields, "warm" = warm-up as a share of the first epoch
    "rows (default)": {"cowclip": False, "row_lr_power": 1.0, "scale_l2": False},
    "rows, power 0.5": {"cowclip": False, "row_lr_power": 0.5, "scale_l2": False},
    "rows + CowClip + L2 x scale": {"row_lr_power": 1.0},
    "rows, warm-up 0.1 epoch": {"cowclip": False, "row_lr_power": 1.0, "scale_l2": False, "warm": 0.1},
    "CowClip (paper)": {},
    "dense rule only, warm-up 0.1 epoch": {"cowclip": False, "scale_l2": False, "warm": 0.1},
}


def encode(d: dict[str, Any], n_train: int, gen: Any) -> tuple[dict[str, np.ndarray], tuple[int, ...]]:
    """ctrkit's encoding of the generator's arrays (vocabularies and statistics from the first ``n_train`` rows)."""
    n = len(d["label"])
    ids = np.empty((n, len(gen.CAT)), np.int32)
    sizes, off = [], 0
    for j, c in enumerate(gen.CAT):
        r, m = d["cat"][c]
        cnt = np.bincount(r[:n_train][~m[:n_train]], minlength=gen.CAT_SPEC[c][0])
        keep = cnt >= 2
        code = np.cumsum(keep) + 1  # the first kept value gets 2
        local = np.where(keep[r], code[r], 1)
        local[m] = 0
        ids[:, j] = off + local
        sizes.append(int(keep.sum()) + 2)
        off += sizes[-1]
    dense = np.empty((n, len(gen.NUM)), np.float32)
    for j, c in enumerate(gen.NUM):
        v, m = d["num"][c]
        z = np.log1p(v.astype(np.float64))
        ok = ~m[:n_train]
        z = (z - z[:n_train][ok].mean()) / (z[:n_train][ok].std() + 1e-12)
        z[m] = np.nan
        dense[:, j] = z
    return {"ids": ids, "dense": dense, "label": d["label"].astype(np.float32)}, tuple(sizes)


def split(arrays: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, np.ndarray]:
    return {k: v[lo:hi] for k, v in arrays.items()}


HISTORY = 10  # items in DIN's behaviour sequence


def with_history(data: dict[str, Any], spec: Any, field: str = "C4") -> tuple[dict[str, Any], Any]:
    """The data and spec with a behaviour sequence over ``field``'s ids (for DIN): ``HISTORY`` ids drawn from
    other rows' values of that field, a random length of 1..HISTORY, and the row's own id at a random position
    in half of the rows, so that attending to the candidate pays."""
    from dataclasses import replace

    from ctrkit.data.dataset import EncodedData

    j = spec.sparse_names.index(field)
    rng = np.random.default_rng(7)
    out = {}
    for part, d in data.items():
        ids = np.asarray(d.ids)
        n = len(ids)
        seq = ids[rng.integers(0, n, (n, HISTORY)), j].reshape(n, 1, HISTORY)
        lens = rng.integers(1, HISTORY + 1, (n, 1)).astype(np.int32)
        own = rng.random(n) < 0.5
        pos = (rng.random(n) * lens[:, 0]).astype(np.int64)
        seq[own, 0, pos[own]] = ids[own, j]
        out[part] = EncodedData(ids=ids, dense=d.dense, label=d.label, seq=seq, seq_len=lens)
    return out, replace(spec, seq_names=("history",), seq_kinds=("sequence",), seq_pooling=("mean",),
                        seq_targets=(field,), seq_max=HISTORY)


RUN = {"device": "cuda", "compile": "auto"}  # --device cpu: a quick check of the script, without the reference


def ctrkit_run(name: str, train: Any, valid: Any, test: Any, spec: Any, batch_size: int, epochs: int,
               patience: int = 1, **cfg: Any) -> tuple[dict[str, Any], Any]:
    """One ``train`` call with per-epoch wall-clock marks; returns figures and the trained model."""
    import torch

    from ctrkit.evaluate.metrics import auc
    from ctrkit.models import build_model
    from ctrkit.training.trainer import TrainConfig, predict_proba, train as fit

    torch.manual_seed(0)
    model = build_model(name, spec, embed_dim=16, hidden=(400, 400, 400), dropout=0.0, batch_norm=False)
    marks: list[float] = []
    config = TrainConfig(batch_size=batch_size, device=RUN["device"], epochs=epochs, patience=patience, lr=1e-3,
                         progress=False, seed=0, **{"compile": RUN["compile"], **cfg})
    t0 = time.perf_counter()
    res = fit(model, train, valid, config, on_epoch=lambda r: marks.append(time.perf_counter()))
    wall = time.perf_counter() - t0
    epoch_s = [b - a for a, b in zip([t0] + marks[:-1], marks)]
    steady = epoch_s[1:]
    p = predict_proba(model, test, batch_size=65536, device=RUN["device"])
    hist = res.history
    row = {"lib": "ctrkit", "model": name, "batch": batch_size, "precision": res.precision,
           "large_batch": cfg.get("large_batch", "auto"), "compile": config.compile, "epochs": res.epochs,
           "best_epoch": res.best_epoch,
           "epoch_seconds": [round(s, 3) for s in epoch_s],
           "first_epoch_samples_per_s": len(train) / epoch_s[0],
           "samples_per_s": len(train) / median(steady) if steady else None,
           "train_only_samples_per_s": median(len(train) / h["train_seconds"] for h in hist[1:]) if len(hist) > 1
           else None,
           "valid_auc_epoch1": hist[0]["valid"]["auc"], "best_valid_auc": res.best_valid.get("auc"),
           "test_auc": auc(np.asarray(test.label), p), "wall_seconds": wall,
           "seconds_to_best": marks[res.best_epoch - 1] - t0 if res.best_epoch else None}
    return row, model


def profile_step(name: str, data: dict[str, Any], spec: Any, batch_size: int, replays: int = 50) -> dict[str, Any]:
    """Where an epoch's time goes, for ``name`` at ``batch_size`` with the trainer's settings: the captured
    step replayed alone, an epoch of batches as the trainer feeds them (shuffle, gather, copy-in; the last
    batch, filled or not, timed apart), the finiteness checks the trainer makes every 20 steps, the validation
    pass (forward, and metrics once warm), the copy of the best epoch's weights, and the step's GPU kernels by
    total time (``torch.profiler`` over 10 replays)."""
    import torch

    from ctrkit.data.dataset import BatchIterator
    from ctrkit.evaluate import fast
    from ctrkit.models import build_model
    from ctrkit.training.step import TrainStep, large_batch_rule
    from ctrkit.training.trainer import _snapshot, _valid_logits

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(name, spec, embed_dim=16, hidden=(400, 400, 400), dropout=0.0, batch_norm=False).to(dev)
    batches = BatchIterator(data["train"], batch_size=batch_size, shuffle=True, device=dev)
    step = TrainStep(model, dev, bf16=True, rule=large_batch_rule("auto", batch_size, dev, len(batches)),
                     compile=RUN["compile"])
    batches.fill_last = step.graphs  # as the trainer feeds it

    def timed(fn: Any) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t

    def epoch(check_every: int = 0) -> tuple[float, float, int]:
        """(seconds of the batches before the last, seconds of the last, batches before the last), with the
        trainer's finiteness check every ``check_every`` steps"""
        last = len(batches) - 1
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i, b in enumerate(batches):
            if i == last:
                torch.cuda.synchronize()
                return time.perf_counter() - t, timed(lambda b=b: step(b)), i
            step(b)
            if batches.into is None and step.inputs is not None:
                batches.into = step.inputs  # as the trainer feeds it
            if check_every and (i + 1) % check_every == 0:
                step.first_nonfinite(wait=False)
        raise AssertionError("unreachable")

    model.train()
    epoch()  # compiles, captures
    full, tail, n = epoch()
    checked, _, _ = epoch(check_every=20)
    graph = step._graph
    row: dict[str, Any] = {"lib": "ctrkit", "part": "profile", "model": name, "batch": batch_size,
                           "compile": RUN["compile"], "graph": graph is not None,
                           "fed_step_ms": 1e3 * full / n, "last_batch_rows": len(data["train"]) - n * batch_size,
                           "last_batch_filled": batches.repeated > 0, "last_batch_ms": 1e3 * tail,
                           "finite_checks_ms_per_epoch": 1e3 * (checked - full)}
    if graph is not None:
        row["replay_step_ms"] = 1e3 * timed(lambda: [graph.replay() for _ in range(replays)]) / replays
    valid = BatchIterator(data["valid"], batch_size=65536, device=dev)
    y = torch.tensor(np.asarray(data["valid"].label), device=dev)
    _valid_logits(model, step, valid)
    row["valid_rows"] = len(data["valid"])
    row["valid_forward_ms"] = 1e3 * timed(lambda: _valid_logits(model, step, valid))
    logits = _valid_logits(model, step, valid)
    fast.evaluate(y, torch.sigmoid(logits.double()))  # one-time costs (52 ms on 200k rows, H100): not timed
    row["valid_metrics_ms"] = 1e3 * timed(lambda: fast.evaluate(y, torch.sigmoid(logits.double())))
    row["snapshot_ms"] = 1e3 * timed(lambda: _snapshot(model, dev))  # the best epoch's copy of the weights
    row["randperm_ms"] = 1e3 * timed(lambda: torch.randperm(len(data["train"]), device=dev))
    if graph is not None:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                graph.replay()
            torch.cuda.synchronize()
        kernels = [(e.key, e.device_time_total / 10 / 1e3) for e in prof.key_averages() if e.device_time_total > 0]
        kernels.sort(key=lambda k: -k[1])
        row["kernels_ms"] = [[k[:90], round(ms, 4)] for k, ms in kernels[:25]]
        row["kernels_total_ms"] = sum(ms for _, ms in kernels)
    step.close()
    return row


def gpu_util_sampler() -> subprocess.Popen | None:
    """``nvidia-smi`` printing utilisation every 100 ms, or None where it is missing."""
    try:
        return subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                 "-lms", "100"], stdout=subprocess.PIPE, text=True)
    except OSError:
        return None


def peer_env(bundle: Path, python: str | None) -> tuple[str, dict[str, str]]:
    """(interpreter, environment) for a FuxiCTR subprocess. ``python``: an interpreter that has FuxiCTR already (a
    CPU check with the peers' venv); by default the bundle's wheels are installed into a scratch folder beside this
    machine's packages."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    if python is not None:
        return python, env
    site = Path(tempfile.gettempdir()) / "ctrkit-peer-site"
    if not site.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--target", str(site), *map(str, sorted((bundle / "whl").glob("*.whl")))],
                       check=True)
    env["PYTHONPATH"] = str(site)
    return sys.executable, env


def fuxictr_run(bundle: Path, batch_sizes: str, seconds: float, device: str,
                python: str | None = None) -> list[dict[str, Any]]:
    """FuxiCTR's DeepFM at each batch size through the bundle's ``gpu_bench.py`` (a subprocess); its results as
    rows of this benchmark (``python``: see :func:`peer_env`)."""
    python, env = peer_env(bundle, python)
    n = len(batch_sizes.split(","))
    with tempfile.TemporaryDirectory(prefix="fuxictr-") as work:
        results = Path(work) / "results.jsonl"
        cmd = [python, str(bundle / "harness" / "gpu_bench.py"), "--libs", "fuxictr", "--device", device,
               "--feature-map", str(bundle / "feature_map.json"), "--zoo", str(bundle / "zoo"),
               "--results", str(results), "--seconds", str(seconds), "--batch-sizes", batch_sizes,
               "--budget", str(60 + n * (seconds + 60)), "--work", work]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180 + n * (seconds + 90))
        lines = results.read_text().splitlines() if results.exists() else []
    rows = []
    for line in lines:
        r = json.loads(line)
        size = re.fullmatch(r"train_samples_per_s_bs(\d+)", r["metric"])
        if size is None:
            continue
        overall = re.search(r"incl\. epoch boundaries\+eval (\d+)/s", r.get("notes", ""))
        rows.append({"lib": f"{r['lib']} DeepFM (harness data, {seconds:.0f} s per batch size)",
                     "batch": int(size[1]), "samples_per_s": r["value"],
                     "with_epochs_samples_per_s": float(overall[1]) if overall else None, "notes": r["notes"]})
    if len(rows) < n:  # the process also exits non-zero after its runs (Ray's shutdown): judge by the rows
        print(f"FuxiCTR: {len(rows)} of {n} batch sizes ran (rc {run.returncode})\n{run.stdout[-2000:]}"
              f"\n{run.stderr[-3000:]}", flush=True)
    return rows


def fuxictr_ttq(bundle: Path, rows: int, batch_size: int, epochs: int, device: str,
                python: str | None = None) -> dict[str, Any] | None:
    """FuxiCTR's DeepFM trained to early stopping on this benchmark's rows (``bench/fuxictr_ttq.py`` in a
    subprocess, ``python``: see :func:`peer_env`): its time to quality, or None (and its output) if it gave none."""
    python, env = peer_env(bundle, python)
    cmd = [python, str(ROOT / "bench" / "fuxictr_ttq.py"), "--bundle", str(bundle), "--rows", str(rows),
           "--batch-size", str(batch_size), "--epochs", str(epochs), "--device", device]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    for line in run.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"FuxiCTR to early stopping gave no result (rc {run.returncode})\n{run.stdout[-2000:]}\n"
          f"{run.stderr[-3000:]}", flush=True)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", default=str(ROOT.parent / "shared" / "peers"), help="folder of gen_synth_criteo.py")
    ap.add_argument("--rows", type=int, default=10_000_000, help="training rows (validation and test: 10%% each)")
    ap.add_argument("--batch-sizes", default="4096,16384,65536")
    ap.add_argument("--parts", default="speed,zoo,big",
                    help="speed, zoo, rules, big, profile; none of them (e.g. 'none') with --fuxictr-ttq runs "
                    "FuxiCTR alone")
    ap.add_argument("--epochs", type=int, default=8, help="most epochs of an early-stopping run")
    ap.add_argument("--big-rows", type=int, default=100_000_000)
    ap.add_argument("--harness-ref", action="store_true", help="also run the harness's gpu_plain_ref.py")
    ap.add_argument("--fuxictr", type=Path, default=None,
                    help="bundle of bench/peer_bundle.sh: also run FuxiCTR's DeepFM on this device")
    ap.add_argument("--fuxictr-seconds", type=float, default=30.0, help="FuxiCTR's time box per batch size")
    ap.add_argument("--fuxictr-ttq", type=int, default=0, metavar="BATCH",
                    help="with --fuxictr: also train FuxiCTR's DeepFM to early stopping on these rows at this batch")
    ap.add_argument("--fuxictr-python", default=None,
                    help="an interpreter with FuxiCTR installed (a CPU check), instead of the bundle's wheels")
    ap.add_argument("--zoo", default=",".join(ZOO), help="models of the zoo part")
    ap.add_argument("--profile", default="deepfm,xdeepfm", help="models of the profile part")
    ap.add_argument("--no-rule-compare", dest="rule_compare", action="store_false",
                    help="speed part: skip the large batch under CowClip's rule and under none")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", default="auto", choices=("auto", "max"),
                    help="ctrkit's compile setting (max: Inductor's autotuned matrix products)")
    args = ap.parse_args()
    if args.fuxictr_ttq and args.fuxictr is None:
        ap.error("--fuxictr-ttq needs --fuxictr BUNDLE (bench/peer_bundle.sh builds it)")
    RUN.update(device=args.device, compile=args.compile)
    import torch

    from ctrkit.data.dataset import EncodedData
    from ctrkit.nn.embedding import FeatureSpec

    sys.path.insert(0, args.peers)
    import gen_synth_criteo as gen
    import gpu_reference

    parts = set(args.parts.split(","))
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    cuda = args.device == "cuda"
    out: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0) if cuda else "none", "torch": torch.__version__,
                           "rows": args.rows, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "runs": []}
    out["commit"] = source_commit(ROOT)
    results: list[dict[str, Any]] = out["runs"]
    Path(args.out).mkdir(parents=True, exist_ok=True)

    def emit(row: dict[str, Any]) -> None:
        """Print a result and rewrite gpu.json with it, so a run cut short keeps what it measured."""
        results.append(row)
        print("RESULT", json.dumps(row, default=float), flush=True)
        (Path(args.out) / "gpu.json").write_text(json.dumps(out, indent=1, default=float))

    if args.harness_ref:
        ref = subprocess.run([sys.executable, os.path.join(args.peers, "gpu_plain_ref.py"), "--rows", str(args.rows),
                              "--batch-sizes", args.batch_sizes, "--max-steps", "100000"],
                             capture_output=True, text=True)
        for line in ref.stdout.splitlines():
            if line.startswith("RESULT "):
                r = json.loads(line[7:])
                r["lib"] = "harness gpu_plain_ref.py (random ids)"
                emit(r)
        if ref.returncode:
            print(ref.stderr[-3000:], flush=True)
    if args.fuxictr is not None:
        for r in fuxictr_run(args.fuxictr, args.batch_sizes, args.fuxictr_seconds, args.device, args.fuxictr_python):
            emit(r)
    if parts & {"speed", "zoo", "rules", "big", "profile"}:  # FuxiCTR's time to quality alone needs no rows of ours
        t = time.perf_counter()
        n_va = args.rows // 10
        total = args.rows + 2 * n_va
        arrays, field_sizes = encode(gen.generate_arrays(total, 20251122), args.rows, gen)
        print(f"generated and encoded {total:,} rows in {time.perf_counter() - t:.1f} s", flush=True)
        names = (tuple(gen.CAT), tuple(gen.NUM))
        spec = FeatureSpec(n_ids=sum(field_sizes), field_sizes=field_sizes, sparse_names=names[0],
                           dense_names=names[1])
        out["n_ids"] = spec.n_ids
        bounds = {"train": (0, args.rows), "valid": (args.rows, args.rows + n_va), "test": (args.rows + n_va, total)}
        parts_np = {k: split(arrays, *b) for k, b in bounds.items()}
        data = {k: EncodedData(**v) for k, v in parts_np.items()}

    if "speed" in parts:
        for bs in sizes:
            if cuda:
                emit(gpu_reference.run(parts_np["train"], parts_np["test"], spec.n_ids, bs))
                torch.cuda.empty_cache()
            row, _ = ctrkit_run("deepfm", data["train"], data["valid"], data["test"], spec, bs, args.epochs)
            emit(row)
        for other in ("cowclip", "off") if args.rule_compare else ():  # the default rule against the others
            row, _ = ctrkit_run("deepfm", data["train"], data["valid"], data["test"], spec, sizes[-1], args.epochs,
                                large_batch=other)
            emit(row)
    if "zoo" in parts:
        from ctrkit.models import model_names

        seq_data, seq_spec = with_history(data, spec) if "din" in model_names() else (data, spec)
        for name in [z for z in args.zoo.split(",") if z in model_names()]:
            d, sp = (seq_data, seq_spec) if name == "din" else (data, spec)
            try:
                row, _ = ctrkit_run(name, d["train"], d["valid"], d["test"], sp, sizes[-1], 2, patience=2)
                emit(row)
            except Exception as err:  # one model's failure is reported, not the end of the benchmark
                emit({"lib": "ctrkit", "model": name, "error": f"{type(err).__name__}: {err}"[:300]})
    if "rules" in parts:
        import ctrkit.training.trainer as trainer_module
        from ctrkit.training.step import BASE_BATCH, LargeBatchRule

        shipped = trainer_module.large_batch_rule
        for label, fields in RULES.items():
            kw = {k: v for k, v in fields.items() if k != "warm"}
            warm = float(fields.get("warm", 1.0))
            trainer_module.large_batch_rule = (  # type: ignore[assignment]
                lambda _s, bs, _d, warmup_steps=0, kw=kw, warm=warm:
                LargeBatchRule(scale=bs / BASE_BATCH, warmup_steps=int(warmup_steps * warm), **kw))
            try:
                row, _ = ctrkit_run("deepfm", data["train"], data["valid"], data["test"], spec, sizes[-1], args.epochs)
            finally:
                trainer_module.large_batch_rule = shipped
            row["rule"] = label
            emit(row)
        if cuda:
            row, _ = ctrkit_run("deepfm", data["train"], data["valid"], data["test"], spec, BASE_BATCH, args.epochs,
                                precision="fp32")
            row["rule"] = "fp32"
            emit(row)
    if "profile" in parts and cuda:
        for name in args.profile.split(","):
            emit(profile_step(name, data, spec, sizes[-1]))
            torch.cuda.empty_cache()
    if "big" in parts:
        rng = np.random.default_rng(1)
        t = time.perf_counter()
        pick = rng.integers(0, args.rows, args.big_rows)
        big = EncodedData(ids=parts_np["train"]["ids"][pick], dense=parts_np["train"]["dense"][pick],
                          label=parts_np["train"]["label"][pick])
        del pick
        print(f"resampled {args.big_rows:,} rows in {time.perf_counter() - t:.1f} s", flush=True)
        sampler = gpu_util_sampler()
        row, _ = ctrkit_run("deepfm", big, data["valid"], data["test"], spec, sizes[-1], 1)
        if sampler is not None:
            sampler.terminate()
            util = [int(x) for x in sampler.communicate()[0].split() if x.strip().isdigit()]
            busy = util[len(util) // 10:]  # past the start-up (data to the GPU, compilation)
            row["gpu_util_median"] = median(busy) if busy else None
            row["gpu_util_samples"] = len(util)
        row["rows"] = args.big_rows
        emit(row)
        del big
    if args.fuxictr is not None and args.fuxictr_ttq:
        data = parts_np = arrays = None  # ctrkit's rows, if any, leave memory before FuxiCTR's run
        if cuda:
            torch.cuda.empty_cache()
        row = fuxictr_ttq(args.fuxictr, args.rows, args.fuxictr_ttq, args.epochs, args.device, args.fuxictr_python)
        if row is not None:
            emit(row)
    (Path(args.out) / "gpu.json").write_text(json.dumps(out, indent=1, default=float))
    print(f"\n{'lib / model':<58} {'batch':>6} {'samples/s':>12} {'1st epoch/s':>12} {'AUC':>7} {'to best s':>9}")
    for r in results:
        if "batch" not in r:
            continue
        label = r["lib"] if r["lib"] != "ctrkit" else (f"ctrkit {r['model']} {r.get('rule', r.get('large_batch', ''))}"
                                                       f"{' compile max' if r.get('compile') == 'max' else ''}")
        sps = r.get("samples_per_s") or 0
        first = r.get("first_epoch_samples_per_s") or 0
        auc_v = r.get("test_auc") or float("nan")
        tb = r.get("seconds_to_best") or float("nan")
        print(f"{label[:58]:<58} {r['batch']:>6} {sps:>12,.0f} {first:>12,.0f} {auc_v:>7.4f} {tb:>9.1f}")


if __name__ == "__main__":
    main()
