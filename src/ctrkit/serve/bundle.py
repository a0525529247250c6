"""Bundle: schema + encoder + model weights + metrics + versions in one folder, the unit of deployment.

A bundle scores raw records (dicts or a DataFrame): unseen categories get the field's OOV id, missing
optional values its missing id; a multi or sequence field takes a list or a string of items split at its
``sep``, and its unseen items get the OOV id. A model with several heads predicts each (one column per label).
A required field that is absent, a value of the wrong type, or input with the columns of another schema raise
a :class:`ctrkit.data.readers.DataError` that names the field (and the row).
Weights are safetensors; nothing in a bundle is ever unpickled.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file

import ctrkit
from ctrkit.data.dataset import Batch
from ctrkit.data.encode import Encoder
from ctrkit.data.readers import DataError, ReadReport, Source, coerce_chunk, iter_chunks
from ctrkit.evaluate.metrics import evaluate_heads
from ctrkit.models.base import CTRModel, ModelConfig, build_model
from ctrkit.nn.embedding import FeatureSpec
from ctrkit.schema import Field, Schema

BUNDLE_FORMAT = 1
Records = Mapping[str, Any] | Sequence[Mapping[str, Any]] | pl.DataFrame | Any


def _number(value: Any, row: int, name: str) -> float | None:
    """A numeric field's value as float; text that is not a number is an error naming record and field."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return float(value) if value.strip() else None
        except ValueError:
            raise DataError(f"record {row}: field {name!r} expects a number, got {value!r}") from None
    return float(value)


_SCALARS = (str, int, float, bool, np.generic)


def _list_series(f: Field, values: list[Any]) -> pl.Series:
    """A multi / sequence field's record values as one column: all strings (split by the reader at ``sep``)
    or all lists of strings (a string then becomes the list of its items)."""
    def text(x: Any) -> str | None:
        return None if x is None else str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)

    if all(v is None or isinstance(v, str) for v in values):
        return pl.Series(f.name, values, dtype=pl.String)
    items = [None if v is None else ([v] if f.sep is None else v.split(f.sep)) if isinstance(v, str)
             else [text(x) for x in v] for v in values]
    return pl.Series(f.name, items, dtype=pl.List(pl.String))


class BundleError(ValueError):
    """A bundle folder is incomplete or its parts do not belong together."""


def versions() -> dict[str, str]:
    """Library versions recorded in a bundle, to reproduce or audit a model."""
    return {"ctrkit": ctrkit.__version__, "torch": torch.__version__, "polars": pl.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


class Bundle:
    """A trained model with everything needed to score raw records."""

    def __init__(self, schema: Schema, encoder: Encoder, model: CTRModel, model_name: str,
                 metrics: dict[str, Any] | None = None, info: dict[str, Any] | None = None) -> None:
        if encoder.schema.fingerprint() != schema.fingerprint():
            raise BundleError("the encoder was fitted for another schema")
        if model.spec.n_ids != encoder.n_ids or list(model.spec.sparse_names) != encoder.sparse_names:
            raise BundleError("the model was built for another id space than the encoder's")
        self.schema, self.encoder, self.model, self.model_name = schema, encoder, model, model_name
        self.metrics = metrics or {}
        self.info = info or {}
        # Scoring reads the feature columns only: time, group and label are not needed to score.
        self._features = Schema(fields=schema.fields, label=schema.label, columns=schema.columns,
                                crosses=schema.crosses)
        self.model.eval()

    # -- persistence ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the bundle folder (created if needed) and return its path."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        self.schema.save(p / "schema.yaml")
        self.encoder.save(p / "encoder")
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(p / "weights.safetensors"))
        meta = {"format": BUNDLE_FORMAT, "model": self.model_name, "config": self.model.config.to_dict(),
                "spec": self.model.spec.to_dict(), "encoder": self.encoder.fingerprint(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": versions(),
                "info": self.info}
        (p / "model.json").write_text(json.dumps(meta, indent=1))
        (p / "metrics.json").write_text(json.dumps(self.metrics, indent=1, default=float))
        return p

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> Bundle:
        """Read a bundle folder, checking that schema, encoder and weights belong together."""
        p = Path(path)
        for part in ("schema.yaml", "encoder", "weights.safetensors", "model.json"):
            if not (p / part).exists():
                raise BundleError(f"{p} is not a ctrkit bundle: {part} is missing")
        meta = json.loads((p / "model.json").read_text())
        if meta.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{p}: bundle format {meta.get('format')} is not supported by ctrkit "
                              f"{ctrkit.__version__}")
        schema = Schema.load(p / "schema.yaml")
        encoder = Encoder.load(p / "encoder")
        if encoder.fingerprint() != meta["encoder"]:
            raise BundleError(f"{p}: the encoder ({encoder.fingerprint()}) is not the one the model was "
                              f"trained with ({meta['encoder']})")
        spec = FeatureSpec.from_dict(meta["spec"])
        model = build_model(meta["model"], spec, ModelConfig.from_dict(meta["config"]))
        state = load_file(str(p / "weights.safetensors"))
        expected = model.state_dict()
        if set(state) != set(expected):
            raise BundleError(f"{p}: weights do not match model {meta['model']!r} "
                              f"(missing {sorted(set(expected) - set(state))[:5]}, "
                              f"unexpected {sorted(set(state) - set(expected))[:5]})")
        for k, v in state.items():
            if v.shape != expected[k].shape:
                raise BundleError(f"{p}: weight {k} has shape {tuple(v.shape)}, the model expects "
                                  f"{tuple(expected[k].shape)}")
        model.load_state_dict(state)
        model.to(device)
        metrics = json.loads((p / "metrics.json").read_text()) if (p / "metrics.json").exists() else {}
        return cls(schema, encoder, model, meta["model"], metrics, meta.get("info"))

    # -- scoring -------------------------------------------------------------------------------------
    def _frame(self, records: Records) -> pl.DataFrame:
        """Raw records as a polars frame with every feature column, after the per-record checks."""
        if isinstance(records, pl.DataFrame):
            df = records
        elif type(records).__module__.startswith("pandas"):
            df = pl.from_pandas(records)
        else:
            rows = [records] if isinstance(records, Mapping) else list(records)
            for i, r in enumerate(rows):
                if not isinstance(r, Mapping):
                    raise DataError(f"record {i}: expected a mapping of field -> value, got {type(r).__name__}")
                for f in self.schema.fields:
                    if f.required and r.get(f.name) is None:
                        raise DataError(f"record {i}: required field {f.name!r} is missing")
                    v = r.get(f.name)
                    if f.is_list and isinstance(v, (list, tuple, np.ndarray)):
                        bad = [x for x in v if x is not None and not isinstance(x, _SCALARS)]
                        if bad:
                            raise DataError(f"record {i}: field {f.name!r} holds a {type(bad[0]).__name__} item;"
                                            " expected a list of scalars")
                    elif v is not None and not isinstance(v, _SCALARS):
                        raise DataError(f"record {i}: field {f.name!r} has a {type(v).__name__} value; "
                                        "expected " + ("a list or a string" if f.is_list else "a scalar"))
            data: dict[str, pl.Series] = {}
            for f in self.schema.fields:
                values = [r.get(f.name) for r in rows]
                if f.is_list:
                    data[f.name] = _list_series(f, values)
                elif f.kind == "categorical":
                    text = [None if v is None else str(int(v)) if isinstance(v, float) and v.is_integer()
                            else str(v) for v in values]
                    data[f.name] = pl.Series(f.name, text, dtype=pl.String)
                else:
                    data[f.name] = pl.Series(f.name, [_number(v, i, f.name) for i, v in enumerate(values)],
                                             dtype=pl.Float64)
            df = pl.DataFrame(data)
        absent = [c for c in self.schema.input_columns if c not in df.columns]
        if absent:
            raise DataError(f"input lacks the feature columns {absent} that this bundle was trained on "
                            f"(input has {df.columns}); is it data of another schema?")
        return df

    def predict(self, records: Records, batch_size: int = 65536) -> np.ndarray:
        """Click probabilities for raw records (a dict, a list of dicts, or a polars/pandas DataFrame): [n], or
        [n, T] for a model with a head per label (columns in the order of ``schema.label_columns``)."""
        df = self._frame(records)
        if df.height == 0:
            return np.zeros((0, self.model.spec.n_labels) if self._heads > 1 else 0, dtype=np.float64)
        df = df.select(self.schema.input_columns).with_columns(
            pl.int_range(0, df.height, dtype=pl.Int64).alias("_line"))
        good, bad = coerce_chunk(df, self._features, with_label=False)
        if bad.height:
            row = bad.row(0, named=True)
            raise DataError(f"record {row['_line']}: {row['_reason']}")
        self._check_required(good)
        return self._score(good, batch_size)

    def _check_required(self, df: pl.DataFrame, line_col: str = "_line") -> None:
        for f in self.schema.fields:
            if f.required:
                nulls = df.filter(pl.col(f.name).is_null())
                if nulls.height:
                    raise DataError(f"row {nulls[line_col][0]}: required field {f.name!r} is missing")

    @torch.no_grad()
    def _score(self, df: pl.DataFrame, batch_size: int) -> np.ndarray:
        device = next(self.model.parameters()).device
        out = np.empty((df.height, self._heads) if self._heads > 1 else df.height, dtype=np.float64)
        for start in range(0, df.height, batch_size):
            part = df.slice(start, batch_size)
            ids, dense = self.encoder.transform_frame(part)
            seq = [torch.from_numpy(a).to(device) for a in self.encoder.sequences(part)] \
                if self.encoder.seq_names else [None, None]
            batch = Batch(torch.from_numpy(ids).to(device), torch.from_numpy(dense).to(device), None, None, *seq)
            out[start:start + part.height] = torch.sigmoid(self.model(batch)).double().cpu().numpy()
        return out

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
        return self._score(chunk, 65536)

    def evaluate(self, source: Source, **read_kwargs: Any) -> tuple[dict[str, Any], ReadReport]:
        """Metrics of the bundle on a labelled file or frame; bad rows are counted and reported."""
        report = ReadReport()
        ys, ps, gs = [], [], []
        for chunk in iter_chunks(source, self.schema, report=report, **read_kwargs):
            ps.append(self._score_checked(chunk))
            ys.append(self.encoder.labels(chunk))
            g = self.encoder.group_ids(chunk)
            if g is not None:
                gs.append(g)
        if not ys:
            raise DataError(f"{report.source}: no rows to evaluate ({report.bad_rows} rejected)")
        group = np.concatenate(gs) if gs else None
        return evaluate_heads(np.concatenate(ys), np.concatenate(ps), self.model.spec.label_names, group), report
