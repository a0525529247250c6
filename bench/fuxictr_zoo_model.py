"""Train one FuxiCTR model-zoo model (DCNv2, FinalMLP, ...) on data FuxiCTR has already preprocessed.

Runs with the peer venv's interpreter (bench/setup_peers.sh), never inside ctrkit's environment: bench/peers.py
starts it with the polars 1.x overlay on PYTHONPATH. The model class comes from the model-zoo source that
setup_peers.sh extracts from a reczoo/FuxiCTR clone (``<zoo>/<Model>/src``); the hyper-parameters come as one JSON
object (``--params``), the settings BARS published for the model and dataset. Training is FuxiCTR's own
``model.fit`` (early stopping on validation AUC, best checkpoint reloaded), then ``model.evaluate`` on test. The
figures are printed as ``RESULT {json}`` rows through the shared harness's ``benchutil.record``:
``fit_wall_seconds``, ``train_samples_per_s``, ``test_AUC``, ``test_logloss``, ``parameters``, ``epochs``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time


def main() -> None:
    """Parse the flags, train, evaluate, record."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model-zoo class name, e.g. DCNv2 or FinalMLP")
    ap.add_argument("--data-dir", required=True, help="FuxiCTR's processed folder (feature_map.json, *.parquet)")
    ap.add_argument("--zoo", required=True, help="folder holding <model>/src from the FuxiCTR snapshot")
    ap.add_argument("--harness", required=True, help="the shared peer harness folder (benchutil.py)")
    ap.add_argument("--work", required=True, help="scratch folder for FuxiCTR's checkpoints")
    ap.add_argument("--params", required=True, help="JSON object of model and training settings")
    ap.add_argument("--seed", type=int, default=2021)
    ap.add_argument("--dataset-name", default="frappe_x1_recon")
    ap.add_argument("--results", default=None, help="JSONL file the RESULT rows are appended to")
    args = ap.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sys.path.insert(0, args.harness)
    import benchutil as bu
    import fuxictr
    from fuxictr.features import FeatureMap
    from fuxictr.pytorch.dataloaders import RankDataLoader
    from fuxictr.pytorch.torch_utils import seed_everything
    sys.path.insert(0, os.path.join(args.zoo, args.model))
    import src as zoo  # the model-zoo package of this model

    lib, machine = f"fuxictr {fuxictr.__version__}", bu.machine_desc("cpu")
    given = json.loads(args.params)
    params = dict(model_root=os.path.join(args.work, "checkpoints"), verbose=0, metrics=["logloss", "AUC"],
                  monitor="AUC", monitor_mode="max", early_stop_patience=2, save_best_only=True, eval_steps=None,
                  loss="binary_crossentropy", optimizer="adam", task="binary_classification", gpu=-1,
                  num_workers=3, shuffle=True, data_format="parquet", net_regularizer=0)
    params.update(given, seed=args.seed)
    seed_everything(args.seed)
    data_dir = args.data_dir
    feature_map = FeatureMap(os.path.basename(os.path.normpath(data_dir)), data_dir)
    feature_map.load(os.path.join(data_dir, "feature_map.json"), params)
    loader_kw = {k: v for k, v in params.items() if k != "gpu"}
    train_gen, valid_gen = RankDataLoader(feature_map, stage="train",
                                          train_data=os.path.join(data_dir, "train.parquet"),
                                          valid_data=os.path.join(data_dir, "valid.parquet"), **loader_kw)
    model = getattr(zoo, args.model)(feature_map, model_id=f"{args.model}_{args.dataset_name}_{args.seed}",
                                     **params)
    os.makedirs(model.model_dir, exist_ok=True)  # fuxictr's set_logger() normally creates it
    n_params = sum(p.numel() for p in model.parameters())
    # train_step calls self.forward() directly, so no hook fires on the model: time its embedding layer
    timer = bu.StepTimer(model.embedding_layer)
    t0 = time.perf_counter()
    model.fit(train_gen, validation_data=valid_gen, epochs=params["epochs"])
    fit_s = time.perf_counter() - t0
    timer.remove()
    epochs = len(timer.t) / max(1, len(train_gen))
    tp = timer.throughput(params["batch_size"], warmup=10)
    test_gen = RankDataLoader(feature_map, stage="test", test_data=os.path.join(data_dir, "test.parquet"),
                              **{k: v for k, v in loader_kw.items() if k != "shuffle"})
    res = model.evaluate(test_gen)
    note = (f"{args.model} model-zoo source; params {json.dumps(given, sort_keys=True)}; seed {args.seed}; "
            f"{epochs:.0f} epochs (best-valid checkpoint reloaded by fit); model.fit wall incl. validation")
    rec = lambda metric, value, unit: bu.record(lib, args.model, args.dataset_name, metric, value, unit,  # noqa: E731
                                                 machine, note, args.results)
    rec("fit_wall_seconds", fit_s, "s")
    rec("train_samples_per_s", tp["samples_per_s"], "samples/s")
    rec("epochs", epochs, "")
    rec("parameters", n_params, "")
    rec("test_AUC", float(res["AUC"]), "")
    rec("test_logloss", float(res["logloss"]), "")
    try:
        import ray
        ray.shutdown()
    except ImportError:
        pass


if __name__ == "__main__":
    main()
