"""Bundle: schema, encoder, weights, calibrator, metrics and versions in one folder, the unit of deployment.

A bundle scores raw records (dicts or a DataFrame) through :mod:`ctrkit.validate`: unseen categories get the
field's OOV id, missing optional values (None) its missing id; a multi or sequence field takes a list or a
string of items split at its ``sep``. A model with several heads predicts each (one column per label). A key or column that is absent, a required
field without a value, a value of the wrong type or a non-finite number raise a
:class:`ctrkit.validate.DataError` that names the field and the record.
Weights are safetensors; nothing in a bundle is ever unpickled. ``manifest.json`` holds the sha256 of every
other file of the folder and the training run's fingerprint (also stamped into the weights and model.json);
``load`` refuses a folder whose files do not match it, and weights that are not finite.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import ctrkit
from ctrkit.data.dataset import Batch
from ctrkit.data.encode import Encoder
from ctrkit.data.readers import ReadReport, Source, iter_chunks
from ctrkit.devices import eval_rows
from ctrkit.evaluate.calibrate import Calibrator
from ctrkit.evaluate.metrics import evaluate_heads
from ctrkit.models.base import CTRModel, build_model, model_class
from ctrkit.models.ensemble import Ensemble
from ctrkit.nn.embedding import FeatureSpec
from ctrkit.schema import Schema
from ctrkit.validate import DataError, Records, coerce_chunk, records_frame

BUNDLE_FORMAT = 1
MANIFEST = "manifest.json"


class BundleError(ValueError):
    """A bundle folder is incomplete, altered, or its parts do not belong together; the message names the file."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _bundle_files(root: Path) -> list[str]:
    """Every file under ``root`` (but the manifest and hidden files), as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not any(part.startswith(".")
                                                                   for part in p.relative_to(root).parts))


def _check_finite(state: Mapping[str, torch.Tensor], where: str) -> None:
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise BundleError(f"{where}: weight {k!r} has {bad} non-finite value(s) (NaN or inf)")


def verify_manifest(root: Path) -> dict[str, Any]:
    """Check every file of the bundle folder ``root`` against its manifest; returns the manifest."""
    path = root / MANIFEST
    if not path.exists():
        if (root / "bundle" / MANIFEST).exists():  # the --out of ctrkit train, which holds the bundle
            raise BundleError(f"{root} is a training run folder; its bundle is {root / 'bundle'}")
        raise BundleError(f"{path} is missing: {root} is not a ctrkit bundle, or one saved before manifests")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        assert isinstance(files, dict) and isinstance(manifest["run"], str)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise BundleError(f"{path}: not a valid manifest (expected {{'run': ..., 'files': {{name: sha256}}}})") \
            from None
    resolved = root.resolve()
    for name in files:
        target = (root / name).resolve()
        if Path(name).is_absolute() or ".." in Path(name).parts or not target.is_relative_to(resolved):
            raise BundleError(f"{path}: the file name {name!r} leaves the bundle folder")
    for name, digest in files.items():
        if not (root / name).is_file():
            raise BundleError(f"{root / name} is missing (listed in {MANIFEST})")
        if _sha256(root / name) != digest:
            raise BundleError(f"{root / name}: contents differ from the sha256 in {MANIFEST} "
                              "(altered, or taken from another bundle)")
    extra = sorted(set(_bundle_files(root)) - set(files))
    if extra:
        raise BundleError(f"{root / extra[0]} is not listed in {MANIFEST} (added after the bundle was saved)")
    return manifest


def versions() -> dict[str, str]:
    """Library versions recorded in a bundle, to reproduce or audit a model."""
    return {"ctrkit": ctrkit.__version__, "torch": torch.__version__, "polars": pl.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


class Bundle:
    """A trained model with everything needed to score raw records."""

    def __init__(self, schema: Schema, encoder: Encoder, model: CTRModel, model_name: str,
                 metrics: dict[str, Any] | None = None, info: dict[str, Any] | None = None,
                 calibrator: Calibrator | None = None) -> None:
        if encoder.schema.fingerprint() != schema.fingerprint():
            raise BundleError("the encoder was fitted for another schema")
        if model.spec.n_ids != encoder.n_ids or list(model.spec.sparse_names) != encoder.sparse_names:
            raise BundleError("the model was built for another id space than the encoder's")
        self.schema, self.encoder, self.model, self.model_name = schema, encoder, model, model_name
        encoder.schema = schema  # equal by fingerprint: one object, so the bundle's checks and the encoder's agree
        self.metrics = metrics or {}
        self.info = info or {}
        # raw logit -> served probability: the exact downsampling / class-weight correction, then Platt or isotonic
        self.calibrator = calibrator or Calibrator()
        # identifies the training run: stamped into the weights, model.json and the manifest
        self.run = self.info.get("run") or uuid.uuid4().hex[:16]
        self.info["run"] = self.run
        # Scoring reads the feature columns only: time, group and label are not needed to score.
        self._features = Schema(fields=schema.fields, label=schema.label, columns=schema.columns,
                                crosses=schema.crosses)
        self.model.eval()

    # -- persistence ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the bundle folder (created if needed; must not hold another bundle's files) and return its path.

        Weights that are not finite are refused; ``manifest.json`` is written last, over every file written.
        """
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise BundleError(f"{p} exists and is not a folder")
        if p.is_dir() and not (p / MANIFEST).exists() and _bundle_files(p):
            raise BundleError(f"{p} holds files that are not a bundle's; a bundle needs a folder of its own "
                              "(every file in it is part of the bundle)")
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        _check_finite(state, f"cannot save {p}")
        p.mkdir(parents=True, exist_ok=True)
        if (p / MANIFEST).exists():  # saving over a bundle: its files go, so none of them outlives it unlisted
            for name in _bundle_files(p):
                (p / name).unlink()
            (p / MANIFEST).unlink()
        self.schema.save(p / "schema.yaml")
        self.encoder.save(p / "encoder")
        save_file(state, str(p / "weights.safetensors"), metadata={"run": self.run})
        meta = {"format": BUNDLE_FORMAT, "model": self.model_name, "config": self.model.config.to_dict(),
                **({"members": len(self.model.members)} if isinstance(self.model, Ensemble) else {}),
                "spec": self.model.spec.to_dict(), "encoder": self.encoder.fingerprint(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": versions(),
                "info": self.info}
        (p / "model.json").write_text(json.dumps(meta, indent=1))
        (p / "metrics.json").write_text(json.dumps(self.metrics, indent=1, default=float))
        self._save_extras(p)
        files = {name: _sha256(p / name) for name in _bundle_files(p)}
        (p / MANIFEST).write_text(json.dumps({"format": BUNDLE_FORMAT, "run": self.run, "files": files}, indent=1))
        return p

    def _save_extras(self, path: Path) -> None:
        """Parts beyond schema, encoder, weights and metrics; the manifest covers whatever is written here."""
        self.calibrator.save(path / "calibration.json")

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> Bundle:
        """Read a bundle folder, checking that schema, encoder and weights belong together."""
        p = Path(path)
        if not p.is_dir():
            inside = f"; a bundle is the folder that holds it, {p.parent}" if (p.parent / MANIFEST).exists() else ""
            raise BundleError(f"{p}: no such bundle folder{inside}")
        manifest = verify_manifest(p)
        for part in ("schema.yaml", "encoder/encoder.json", "weights.safetensors", "model.json"):
            if not (p / part).exists():
                raise BundleError(f"{p} is not a ctrkit bundle: {part} is missing")
        try:
            meta = json.loads((p / "model.json").read_text())
            schema = Schema.load(p / "schema.yaml")
            encoder = Encoder.load(p / "encoder")
            metrics = json.loads((p / "metrics.json").read_text()) if (p / "metrics.json").exists() else {}
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise BundleError(str(exc) if str(p) in str(exc) else f"{p}: {exc}") from None
        if meta.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{p / 'model.json'}: bundle format {meta.get('format')} is not supported by "
                              f"ctrkit {ctrkit.__version__}")
        if encoder.fingerprint() != meta.get("encoder"):
            raise BundleError(f"{p / 'encoder'}: the encoder ({encoder.fingerprint()}) is not the one the model "
                              f"was trained with ({meta.get('encoder')})")
        try:
            spec = FeatureSpec.from_dict(meta["spec"])
            config = model_class(meta["model"]).config_class.from_dict(meta["config"])
            members = int(meta.get("members", 1))
            nets = [build_model(meta["model"], spec, config) for _ in range(members)]
            model = nets[0] if members == 1 else Ensemble(nets)
        except (KeyError, ValueError, TypeError) as exc:
            raise BundleError(f"{p / 'model.json'}: cannot build the model it describes ({exc})") from None
        weights = p / "weights.safetensors"
        try:
            with safe_open(str(weights), framework="pt") as fh:
                run = (fh.metadata() or {}).get("run")
                state = {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise BundleError(f"{weights}: not a readable safetensors file ({exc})") from None
        for where, value in ((weights, run), (p / "model.json", (meta.get("info") or {}).get("run"))):
            if value != manifest["run"]:
                raise BundleError(f"{where}: comes from training run {value}, the bundle's manifest from run "
                                  f"{manifest['run']}")
        _check_finite(state, str(weights))
        expected = model.state_dict()
        if set(state) != set(expected):
            raise BundleError(f"{weights}: weights do not match model {meta['model']!r} "
                              f"(missing {sorted(set(expected) - set(state))[:5]}, "
                              f"unexpected {sorted(set(state) - set(expected))[:5]})")
        for k, v in state.items():  # a module's extra state (fitted trees as bytes) has the length it has
            if v.shape != expected[k].shape and not k.endswith("_extra_state"):
                raise BundleError(f"{weights}: weight {k} has shape {tuple(v.shape)}, the model expects "
                                  f"{tuple(expected[k].shape)}")
        model.load_state_dict(state)
        model.to(device)
        try:
            calibrator = Calibrator.load(p / "calibration.json") if (p / "calibration.json").exists() else None
        except (ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"{p / 'calibration.json'}: {exc}") from None
        return cls(schema, encoder, model, meta["model"], metrics, meta.get("info"), calibrator)

    # -- scoring -------------------------------------------------------------------------------------
    def _frame(self, records: Records) -> pl.DataFrame:
        """Raw records as a typed frame of the feature columns (with ``_line``, the record number), through the
        validation layer; the first bad record is an error naming it and the field."""
        df = records_frame(records, self.schema)
        if df.columns != self.schema.input_columns:
            df = df.select(self.schema.input_columns)
        df = df.hstack([pl.Series("_line", np.arange(df.height, dtype=np.int64))])  # eager: no query to plan
        good, bad = coerce_chunk(df, self._features, with_label=False)
        if bad.height:
            row = bad.row(0, named=True)
            raise DataError(f"record {row['_line']}: {row['_reason']}")
        self._check_required(good, "record")
        return good

    def predict(self, records: Records, batch_size: int | None = None) -> np.ndarray:
        """Click probabilities for raw records (a dict, a list of dicts, or a polars/pandas DataFrame): [n], or
        [n, T] for a model with a head per label (columns in the order of ``schema.label_columns``); scored
        ``batch_size`` rows at a time (None: the device's block, :func:`~ctrkit.devices.eval_rows`)."""
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        encoded = self.encoder.encode_records(records)  # plain dicts in one compiled pass, where it is built
        if encoded is not None:
            return self.calibrator(self._forward_blocks(*encoded, batch_size=batch_size))
        good = self._frame(records)
        if good.height == 0:
            return np.zeros((0, self._heads) if self._heads > 1 else 0, dtype=np.float64)
        return self._score(good, batch_size)

    def encode(self, records: Records) -> tuple[np.ndarray, np.ndarray]:
        """The global categorical ids [n, F] and dense columns [n, D] of raw records, as the model sees them (the
        same checks as predict)."""
        return self.encoder.transform_frame(self._frame(records))

    def _check_required(self, df: pl.DataFrame, where: str = "row") -> None:
        for f in self.schema.fields:
            if f.required:
                nulls = df.filter(pl.col(f.name).is_null())
                if nulls.height:
                    raise DataError(f"{where} {nulls['_line'][0]}: required field {f.name!r} is missing")

    @torch.no_grad()
    def _logits(self, df: pl.DataFrame, batch_size: int | None = None) -> np.ndarray:
        rows = eval_rows(next(self.model.parameters()).device, batch_size)
        out = np.empty((df.height, self._heads) if self._heads > 1 else df.height, dtype=np.float64)
        for start in range(0, df.height, rows):
            part = df.slice(start, rows)
            seq = self.encoder.sequences(part) if self.encoder.seq_names else (None, None)
            out[start:start + part.height] = self._forward(*self.encoder.transform_frame(part), *seq)
        return self._finite(out, df["_line"].to_numpy())

    @torch.no_grad()
    def _forward_blocks(self, ids: np.ndarray, dense: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Raw logits of encoded rows without list fields (:meth:`Encoder.encode_records`), a block at a time."""
        rows = eval_rows(next(self.model.parameters()).device, batch_size)
        out = np.empty((len(ids), self._heads) if self._heads > 1 else len(ids), dtype=np.float64)
        for s in range(0, len(ids), rows):
            out[s:s + rows] = self._forward(ids[s:s + rows], dense[s:s + rows], None, None)
        return self._finite(out, np.arange(len(ids)))

    def _forward(self, ids: np.ndarray, dense: np.ndarray, seq: np.ndarray | None, lengths: np.ndarray | None
                 ) -> np.ndarray:
        """Raw logits of one block of encoded rows on the model's device."""
        device = next(self.model.parameters()).device
        arrays = [ids, dense, None, None] + ([None, None] if seq is None else [seq, lengths])
        batch = Batch(*(None if a is None else torch.from_numpy(a).to(device) for a in arrays))
        return self.model(batch).double().cpu().numpy()

    def _finite(self, logits: np.ndarray, lines: np.ndarray) -> np.ndarray:
        if not np.isfinite(logits).all():
            first = int(np.flatnonzero(~np.isfinite(logits))[0]) // (self._heads if logits.ndim == 2 else 1)
            raise BundleError(f"the model gave a non-finite score for row {lines[first]}")
        return logits

    def _score(self, df: pl.DataFrame, batch_size: int | None = None) -> np.ndarray:
        return self.calibrator(self._logits(df, batch_size))

    @property
    def _heads(self) -> int:
        """Number of probabilities per record: the model's heads (1 for a single-task model)."""
        return self.model.spec.n_labels if getattr(self.model, "multi_head", False) else 1

    def predict_file(self, source: Source, **read_kwargs: Any) -> np.ndarray:
        """Score every row of a file, in order; any unparseable row is an error naming its line."""
        report = ReadReport()
        parts = [self._score_checked(chunk) for chunk in
                 iter_chunks(source, self._features, report=report, with_label=False, **read_kwargs)]
        if report.bad_rows:
            raise DataError(f"{report.bad_rows} row(s) cannot be scored: " + "; ".join(report.examples))
        return np.concatenate(parts) if parts else np.zeros(0)

    def _score_checked(self, chunk: pl.DataFrame) -> np.ndarray:
        self._check_required(chunk)
        return self._score(chunk)

    def labelled_logits(self, source: Source, report: ReadReport | None = None,
                        **read_kwargs: Any) -> dict[str, np.ndarray | None]:
        """Raw model logits of a labelled file or frame with its ``label``, ``weight`` and ``group`` columns
        (None when the schema has no such column); bad rows are counted in ``report``."""
        report = report if report is not None else ReadReport()
        cols: dict[str, list[np.ndarray]] = {"logits": [], "label": [], "weight": [], "group": []}
        for chunk in iter_chunks(source, self.schema, report=report, **read_kwargs):
            self._check_required(chunk)
            cols["logits"].append(self._logits(chunk))
            cols["label"].append(self.encoder.labels(chunk))
            for key, values in (("weight", self.encoder.weights(chunk)), ("group", self.encoder.group_ids(chunk))):
                if values is not None:
                    cols[key].append(values)
        if not cols["label"]:
            raise DataError(f"{report.source}: no rows to evaluate ({report.bad_rows} rejected)")
        return {k: np.concatenate(v) if v else None for k, v in cols.items()}

    def evaluate(self, source: Source, **read_kwargs: Any) -> tuple[dict[str, Any], ReadReport]:
        """Metrics of the served probabilities on a labelled file or frame (weighted when the schema has a
        weight column; per head for a multi-task model); bad rows are counted and reported."""
        report = ReadReport()
        d = self.labelled_logits(source, report, **read_kwargs)
        return evaluate_heads(d["label"], self.calibrator(d["logits"]), self.model.spec.label_names, d["group"],
                              d["weight"]), report
