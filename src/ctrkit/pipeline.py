"""One call from raw files to a saved, evaluated bundle: encode, train, evaluate, save.

This is what ``ctrkit train`` runs; from Python, ``ctrkit.train(...)``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctrkit.data.encode import encode_files
from ctrkit.data.readers import Source, libfm_schema
from ctrkit.evaluate.metrics import evaluate_heads
import ctrkit.models  # noqa: F401  (registers the model zoo)
from ctrkit.models.base import build_model, default_config, model_class
from ctrkit.nn.embedding import FeatureSpec
from ctrkit.schema import Schema
from ctrkit.serve.bundle import Bundle
from ctrkit.serve.monitor import reference_distribution
from ctrkit.validate import DataError, check_labels
from ctrkit.training.trainer import TrainConfig, TrainResult, predict_proba, train as train_model

TEST_KEYS = ("auc", "logloss", "ece", "pred_actual_ratio", "n", "positives")


@dataclass
class Run:
    """The outcome of :func:`train`: the bundle, its metrics and the training record."""

    bundle: Bundle
    metrics: dict[str, Any]
    result: TrainResult
    out: Path | None = None
    reports: dict[str, Any] = field(default_factory=dict)


def _resolve_schema(schema: Schema | str | Path | None, fmt: str | None, fields: list[str] | None) -> Schema:
    if isinstance(schema, Schema):
        return schema
    if schema is not None:
        if fields:
            raise ValueError("--fields names the tokens of a libFM file without a schema; with --schema, list "
                             "the fields in the schema instead")
        return Schema.load(schema)
    if fmt == "libfm":
        if not fields:
            raise ValueError("--format libfm needs --fields a,b,... (the field of each token, in order)")
        return libfm_schema(list(fields))
    raise ValueError("a schema is needed: pass --schema YAML (see `ctrkit schema infer`) or --format libfm --fields")


def train(train_data: Source, *, schema: Schema | str | Path | None = None, valid: Source | None = None,
          test: Source | None = None, model: str = "deepfm", out: str | Path | None = None,
          fmt: str | None = None, fields: list[str] | None = None, epochs: int | None = None,
          batch_size: int | None = None, lr: float | None = None, embed_dim: int | None = None,
          seed: int = 0, device: str = "cpu", bad_rows: str | Path | None = None, progress: bool = True,
          model_options: dict[str, Any] | None = None, train_options: dict[str, Any] | None = None,
          log: Any = None) -> Run:
    """Encode ``train_data`` (fitting the encoder on it only), train ``model``, evaluate, and save a bundle.

    Without ``valid`` a validation part is cut from the training data (by time when the schema has a time
    field). With ``out``, writes ``out/bundle/`` and ``out/metrics.json``.
    """
    t0 = time.perf_counter()
    sch = _resolve_schema(schema, fmt, fields)
    cls = model_class(model)
    read_kwargs: dict[str, Any] = {"fmt": fmt} if fmt else {}
    created = bool(out) and not Path(out).exists()
    if out:
        if Path(out).exists() and not Path(out).is_dir():
            raise DataError(f"--out {out} exists and is not a folder")
        Path(out).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ctrkit-data-", dir=str(out) if out else None))
    try:
        enc = encode_files(sch, train_data, work, valid=valid, test=test, seed=seed, bad_rows=bad_rows,
                           **read_kwargs)
        if log:
            for name, rep in enc.reports.items():
                log(f"{name}: {rep.summary()}")
            log(f"encoded {enc.rows:,} rows in {enc.seconds:.1f}s; {enc.encoder.n_ids:,} ids")
        sources = {"train": train_data, "valid": train_data if valid is None else valid, "test": test}
        for name, split in (("train", "training"), ("valid", "validation"), ("test", "test")):
            data = enc.data.get(name)
            if data is not None:
                src = sources[name]
                check_labels(np.asarray(data.label), sch, str(src) if isinstance(src, (str, Path)) else "<frame>",
                             split)
        spec = FeatureSpec.from_encoder(enc.encoder)
        mcfg = default_config(model, embed_dim=embed_dim, **(model_options or {}))
        torch.manual_seed(seed)
        net = build_model(model, spec, mcfg)
        topts = {**cls.train_defaults, **(train_options or {})}
        for key, value in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)):
            if value is not None:
                topts[key] = value
        train_set = enc.data["train"]
        topts.setdefault("batch_size", default_batch_size(len(train_set)))
        tcfg = TrainConfig(seed=seed, device=device, progress=progress, **topts)
        valid_set = enc.data.get("valid")
        # the batch iterator decides whether the data becomes resident or streams from the memory map
        result = train_model(net, train_set, valid_set, tcfg,
                             on_epoch=(lambda r: log(_epoch_line(r))) if log else None)
        metrics: dict[str, Any] = {}
        for name in ("valid", "test"):
            data = enc.data.get(name)
            if data is not None and len(data):
                p = predict_proba(net, data, device=device)
                m = evaluate_heads(np.asarray(data.label), p, spec.label_names,
                                   None if data.group is None else np.asarray(data.group))
                metrics[name] = m
                if name == "valid":  # what live pCTR is compared with for drift (PSI)
                    metrics["pctr_reference"] = reference_distribution(p if p.ndim == 1 else p[:, 0])
        metrics["train"] = {**result.to_dict(), "rows": len(train_set), "config": tcfg.to_dict()}
        metrics["encode"] = {"seconds": round(enc.seconds, 3), "rows": enc.rows, "n_ids": enc.encoder.n_ids,
                             "rows_per_s": round(enc.rows / enc.seconds, 1) if enc.seconds else None}
        metrics["data"] = {k: r.to_dict() for k, r in enc.reports.items()}
        metrics["model"] = {"name": model, "config": net.config.to_dict(),
                            "parameters": int(sum(p.numel() for p in net.parameters()))}
        metrics["seconds"] = round(time.perf_counter() - t0, 3)
        net.to("cpu")
        bundle = Bundle(sch, enc.encoder, net, model, metrics)
        if out:
            bundle.save(Path(out) / "bundle")
            (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
        return Run(bundle=bundle, metrics=metrics, result=result, out=Path(out) if out else None,
                   reports={k: r.to_dict() for k, r in enc.reports.items()})
    except BaseException:
        if created:  # a failed run leaves no half-written output folder behind
            shutil.rmtree(out, ignore_errors=True)  # type: ignore[arg-type]
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def default_batch_size(n_train: int, largest: int = 4096, steps: int = 32) -> int:
    """4096, or the power of two that still gives about ``steps`` updates per epoch on small data (>= 64)."""
    if n_train >= largest * steps:
        return largest
    return max(64, 1 << max(int(n_train // steps).bit_length() - 1, 0))


def _epoch_line(r: dict[str, Any]) -> str:
    v = r.get("valid") or {}
    s = f"epoch {r['epoch']}: {r['samples_per_s']:,.0f} samples/s, lr {r['lr']:.0e}"
    if v:
        s += f", valid auc {v['auc']:.4f} logloss {v['logloss']:.4f}"
    return s
