"""FuxiCTR's DeepFM trained to early stopping on the rows ``bench_gpu.py`` trains ctrkit on: its time to quality.

Run by ``bench_gpu.py --fuxictr-ttq BATCH`` in a subprocess whose ``PYTHONPATH`` holds the bundle's packages
(``bench/peer_bundle.sh``), or directly with an interpreter that has FuxiCTR 2.3.10. The rows are
``gen_synth_criteo.generate_arrays`` with bench_gpu's seed: the first ``--rows`` for training, the next 10% for
validation and the 10% after for test, as bench_gpu splits them. Each split is written as FuxiCTR's parquet input
in its own encoding (the harness's ``fx_encode``, vocabulary fitted on the training rows, checked there against a
feature map FuxiCTR wrote), with a feature map of these vocabulary sizes. Then FuxiCTR's own ``fit`` runs with the
harness's model settings, early stopping on validation AUC with patience 1 (as bench_gpu's ctrkit runs), restores
its best weights and scores the test rows. Reported (one ``RESULT`` JSON line and ``--out``): the epochs, the best
one, the wall time from the start of ``fit`` to the end of the best epoch's evaluation, and the test AUC. Encoding
and writing the parquet files are not timed, as bench_gpu does not time ctrkit's encoding.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

SEED = 20251122  # bench_gpu.py's draw


def stub_polars() -> bool:
    """Stand in for polars where it is missing: FuxiCTR's metrics module imports it for grouped metrics, which are
    not used here. The stand-in has empty classes, since scikit-learn checks types against polars' once it is
    imported. Returns whether it stood in."""
    try:
        import polars  # noqa: F401
        return False
    except ImportError:
        stub = types.ModuleType("polars")
        stub.__version__ = "0.0.0"  # type: ignore[attr-defined]
        for name in ("DataFrame", "LazyFrame", "Series", "Expr", "DataType", "Schema"):
            setattr(stub, name, type(name, (), {}))
        sys.modules["polars"] = stub
        return True


def write_splits(bundle: Path, rows: int, work: Path) -> dict[str, Any]:
    """The train / valid / test parquet files in FuxiCTR's encoding and their feature map, under ``work``."""
    import numpy as np
    import pandas as pd

    sys.path.insert(0, str(bundle / "harness"))
    import gen_synth_criteo as gen
    from gpu_bench import fx_encode

    n_va = rows // 10
    d = gen.generate_arrays(rows + 2 * n_va, SEED)
    order = ["label"] + gen.CAT[::-1] + gen.NUM[::-1]  # the column order of FuxiCTR's own files
    sizes: dict[str, int] = {}
    for name, lo, hi in (("train", 0, rows), ("valid", rows, rows + n_va), ("test", rows + n_va, rows + 2 * n_va)):
        enc = fx_encode(d, rows, np.arange(lo, hi))
        sizes = {c: int(enc[c + "::vocab_size"]) for c in gen.NUM + gen.CAT}
        pd.DataFrame({c: enc[c] for c in order}).to_parquet(work / f"{name}.parquet")
    fmap = json.loads((bundle / "feature_map.json").read_text())
    features = []
    for f in fmap["features"]:
        (name, spec), = f.items()
        features.append({name: {**spec, "vocab_size": sizes[name]}})
    fmap.update(dataset_id="ttq", features=features, total_features=sum(sizes.values()))
    (work / "feature_map.json").write_text(json.dumps(fmap, indent=1))
    return {"rows": rows, "valid_rows": n_va, "test_rows": n_va}


def train(bundle: Path, work: Path, batch_size: int, epochs: int, device: str) -> dict[str, Any]:
    """FuxiCTR's DeepFM on the files of :func:`write_splits`, to early stopping; its figures."""
    stubbed = stub_polars()
    import fuxictr
    import torch
    from fuxictr.features import FeatureMap
    from fuxictr.pytorch.dataloaders import RankDataLoader
    from fuxictr.pytorch.torch_utils import seed_everything

    sys.path.insert(0, str(bundle / "zoo" / "DeepFM_torch"))
    from src import DeepFM

    seed_everything(2021)
    cuda = device.startswith("cuda")
    params = dict(model_root=str(work / "ckpt"), verbose=0, metrics=["logloss", "AUC"], monitor="AUC",
                  monitor_mode="max", early_stop_patience=1, save_best_only=True, eval_steps=None,
                  loss="binary_crossentropy", optimizer="adam", task="binary_classification", learning_rate=1e-3,
                  embedding_dim=16, hidden_units=[400, 400, 400], hidden_activations="relu", net_regularizer=0,
                  embedding_regularizer=1e-5, batch_norm=False, net_dropout=0, batch_size=batch_size,
                  gpu=0 if cuda else -1, num_workers=3, shuffle=True, seed=2021, data_format="parquet")
    feature_map = FeatureMap("ttq", str(work))
    feature_map.load(str(work / "feature_map.json"), params)
    kw = {k: v for k, v in params.items() if k != "gpu"}
    train_gen, valid_gen, test_gen = RankDataLoader(feature_map, stage="both", train_data=str(work / "train.parquet"),
                                                    valid_data=str(work / "valid.parquet"),
                                                    test_data=str(work / "test.parquet"), **kw)
    model = DeepFM(feature_map, **params)
    os.makedirs(model.model_dir, exist_ok=True)
    marks: list[tuple[float, float]] = []  # (seconds since fit began, validation AUC) per evaluation
    judge = model.checkpoint_and_earlystop
    t0 = time.perf_counter()

    def timed(logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if cuda:
            torch.cuda.synchronize()
        marks.append((time.perf_counter() - t0, float(logs["AUC"])))
        judge(logs, *args, **kwargs)

    model.checkpoint_and_earlystop = timed
    model.fit(train_gen, validation_data=valid_gen, epochs=epochs)
    wall = time.perf_counter() - t0
    test = model.evaluate(test_gen)
    best = max(range(len(marks)), key=lambda i: marks[i][1])  # the first of equal AUCs, as FuxiCTR keeps it
    return {"lib": f"fuxictr {fuxictr.__version__} DeepFM to early stopping", "batch": batch_size,
            "epochs": len(marks), "best_epoch": best + 1, "valid_auc": [round(a, 6) for _, a in marks],
            "epoch_ends_s": [round(s, 2) for s, _ in marks], "seconds_to_best": marks[best][0],
            "best_valid_auc": marks[best][1], "test_auc": float(test["AUC"]), "test_logloss": float(test["logloss"]),
            "wall_seconds": wall, "polars_stubbed": stubbed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="bench/peer_bundle.sh's folder")
    ap.add_argument("--rows", type=int, default=10_000_000, help="training rows (validation and test: 10%% each)")
    ap.add_argument("--batch-size", type=int, default=65536)
    ap.add_argument("--epochs", type=int, default=8, help="most epochs")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", type=Path, default=None,
                    help="scratch folder, kept (default: a temporary one, removed at the end)")
    ap.add_argument("--out", type=Path, default=None, help="write the result here as JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="fuxictr-ttq-") as scratch:
        work = args.work or Path(scratch)
        shutil.rmtree(work / "ckpt", ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        sizes = write_splits(args.bundle, args.rows, work)
        print(f"encoded and wrote {sizes} in {time.perf_counter() - t:.1f} s", flush=True)
        row = {**train(args.bundle, work, args.batch_size, args.epochs, args.device), **sizes}
    print("RESULT", json.dumps(row), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
