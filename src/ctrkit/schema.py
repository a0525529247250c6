"""Schema: names every column of a click log and says how each feature is encoded.

A schema is plain data (dataclasses), saved to and loaded from YAML. It is the contract between a raw
file, the encoder, the model and the scorer: a bundle refuses input whose columns do not fit it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

Kind = Literal["categorical", "numeric"]
NumericTransform = Literal["log1p_standardize", "standardize", "log1p", "none", "bucketize"]

KINDS: tuple[str, ...] = ("categorical", "numeric")
TRANSFORMS: tuple[str, ...] = ("log1p_standardize", "standardize", "log1p", "none", "bucketize")


class SchemaError(ValueError):
    """A schema, or data checked against it, is not valid; the message names the field."""


@dataclass
class Field:
    """One feature column.

    categorical: values become ids through a vocabulary fitted on training data (``min_count`` drops rare
    values to the field's OOV id) or, with ``hash_buckets``, through a stable hash into that many buckets.
    numeric: ``transform`` says how values are scaled; ``bucketize`` turns the value into a categorical id
    through ``n_buckets`` quantile bins fitted on training data. Missing values get their own id / flag.
    ``required``: a missing value is an error at scoring time instead of the field's missing id.
    """

    name: str
    kind: Kind = "categorical"
    min_count: int = 1
    hash_buckets: int | None = None
    transform: NumericTransform = "log1p_standardize"
    n_buckets: int = 32
    required: bool = False

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise SchemaError(f"field name must be a non-empty string, got {self.name!r}")
        for key in ("min_count", "n_buckets", "hash_buckets"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise SchemaError(f"field {self.name!r}: {key} must be an integer, got {value!r}")
        if not isinstance(self.required, bool):
            raise SchemaError(f"field {self.name!r}: required must be true or false, got {self.required!r}")
        if self.kind not in KINDS:
            raise SchemaError(f"field {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.transform not in TRANSFORMS:
            raise SchemaError(f"field {self.name!r}: transform must be one of {TRANSFORMS}, got {self.transform!r}")
        if self.min_count < 1:
            raise SchemaError(f"field {self.name!r}: min_count must be >= 1, got {self.min_count}")
        if self.hash_buckets is not None and self.hash_buckets < 1:
            raise SchemaError(f"field {self.name!r}: hash_buckets must be >= 1, got {self.hash_buckets}")
        if self.n_buckets < 2:
            raise SchemaError(f"field {self.name!r}: n_buckets must be >= 2, got {self.n_buckets}")

    @property
    def is_sparse(self) -> bool:
        """True when the field becomes an id (categorical, or a bucketized numeric)."""
        return self.kind == "categorical" or self.transform == "bucketize"

    def to_dict(self) -> dict[str, Any]:
        """Only the settings that differ from the defaults, so YAML stays short."""
        defaults = Field(name=self.name)
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        for f in fields(self):
            if f.name in ("name", "kind"):
                continue
            if self.kind == "categorical" and f.name in ("transform", "n_buckets"):
                continue
            if self.kind == "numeric" and f.name in ("min_count", "hash_buckets"):
                continue
            value = getattr(self, f.name)
            if value != getattr(defaults, f.name):
                out[f.name] = value
        return out


@dataclass
class Schema:
    """All columns of a log: the feature fields, the label and the optional time / position / group columns.

    ``columns`` is the full column order of files without a header line (a raw Criteo TSV); it may list
    columns that are neither features nor roles, which are then read and ignored. ``time_format`` says how the
    time column is written: a strftime format (``%Y-%m-%d %H:%M:%S``), ``epoch_s`` or ``epoch_ms``; without
    it, ISO dates and times are parsed and plain integers kept as they are.
    """

    fields: list[Field]
    label: str
    time: str | None = None
    position: str | None = None
    group: str | None = None
    columns: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    time_format: str | None = None

    def __post_init__(self) -> None:
        self.fields = [f if isinstance(f, Field) else Field(**f) for f in self.fields]
        if not self.fields:
            raise SchemaError("a schema needs at least one feature field")
        names = [f.name for f in self.fields]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SchemaError(f"duplicate field names: {dup}")
        if not self.label or not isinstance(self.label, str):
            raise SchemaError(f"a schema needs a label column name, got {self.label!r}")
        for role in ("time", "position", "group"):
            value = getattr(self, role)
            if value is not None and (not isinstance(value, str) or not value):
                raise SchemaError(f"`{role}` must be a column name, got {value!r}")
        if self.time_format is not None:
            if not self.time:
                raise SchemaError("`time_format` is set but the schema has no `time` column")
            if self.time_format not in ("epoch_s", "epoch_ms") and "%" not in str(self.time_format):
                raise SchemaError(f"time_format must be a strftime format (with %), epoch_s or epoch_ms, "
                                  f"got {self.time_format!r}")
        if self.label in names:
            raise SchemaError(f"the label {self.label!r} cannot also be a feature field")
        if self.columns is not None:
            needed = set(names) | {c for c in (self.label, self.time, self.position, self.group) if c}
            missing = sorted(needed - set(self.columns))
            if missing:
                raise SchemaError(f"`columns` does not list {missing}, which the schema uses")

    # -- views -------------------------------------------------------------------------------------
    def field(self, name: str) -> Field:
        """The field called ``name``; a SchemaError lists the known names otherwise."""
        for f in self.fields:
            if f.name == name:
                return f
        raise SchemaError(f"no field {name!r}; fields are {[f.name for f in self.fields]}")

    @property
    def sparse_fields(self) -> list[Field]:
        """Fields that become ids, in schema order."""
        return [f for f in self.fields if f.is_sparse]

    @property
    def dense_fields(self) -> list[Field]:
        """Numeric fields that stay continuous, in schema order."""
        return [f for f in self.fields if not f.is_sparse]

    @property
    def input_columns(self) -> list[str]:
        """Columns a scorer reads: the feature fields."""
        return [f.name for f in self.fields]

    @property
    def role_columns(self) -> list[str]:
        """Label, time, position and group columns that are set."""
        return [c for c in (self.label, self.time, self.position, self.group) if c]

    # -- persistence -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain dict, the YAML layout."""
        out: dict[str, Any] = {"label": self.label}
        for role in ("time", "time_format", "position", "group"):
            if getattr(self, role):
                out[role] = getattr(self, role)
        out["fields"] = [f.to_dict() for f in self.fields]
        if self.columns is not None:
            out["columns"] = list(self.columns)
        if self.extra:
            out["extra"] = dict(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "schema") -> Schema:
        """Build from the YAML layout; unknown keys are an error that names them."""
        if not isinstance(data, dict):
            raise SchemaError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
        known = {"label", "time", "time_format", "position", "group", "fields", "columns", "extra"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SchemaError(f"{source}: unknown keys {unknown}; known keys are {sorted(known)}")
        if "fields" not in data or "label" not in data:
            raise SchemaError(f"{source}: needs both `label` and `fields`")
        field_keys = {f.name for f in fields(Field)}
        parsed = []
        if not isinstance(data["fields"], list):
            raise SchemaError(f"{source}: `fields` must be a list, got {type(data['fields']).__name__}")
        for i, item in enumerate(data["fields"]):
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, dict):
                raise SchemaError(f"{source}: fields[{i}] must be a mapping or a name, got {item!r}")
            bad = sorted(set(item) - field_keys)
            if bad:
                raise SchemaError(f"{source}: field {item.get('name', i)!r} has unknown keys {bad}")
            parsed.append(Field(**item))
        return cls(
            fields=parsed,
            label=data["label"],
            time=data.get("time"),
            time_format=data.get("time_format"),
            position=data.get("position"),
            group=data.get("group"),
            columns=data.get("columns"),
            extra=data.get("extra") or {},
        )

    def to_yaml(self) -> str:
        """YAML text of the schema."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_yaml(cls, text: str, source: str = "schema") -> Schema:
        """Parse YAML text (safe loader only)."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SchemaError(f"{source}: not valid YAML: {exc}") from exc
        return cls.from_dict(data, source=source)

    def save(self, path: str | Path) -> None:
        """Write the schema as YAML."""
        Path(path).write_text(self.to_yaml())

    @classmethod
    def load(cls, path: str | Path) -> Schema:
        """Read a schema YAML file."""
        p = Path(path)
        if not p.exists():
            raise SchemaError(f"schema file {p} does not exist")
        return cls.from_yaml(p.read_text(), source=str(p))

    def fingerprint(self) -> str:
        """A short hash of what the encoder and model depend on (fields and label), for bundle checks."""
        payload = json.dumps({"label": self.label, "fields": [asdict(f) for f in self.fields]}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --- inference --------------------------------------------------------------------------------------
LABEL_NAMES = ("label", "click", "clicked", "is_click", "y", "target")
TIME_NAMES = ("timestamp", "time", "ts", "event_time", "datetime", "date")
POSITION_NAMES = ("position", "pos", "rank", "slot")
GROUP_NAMES = ("user", "user_id", "userid", "uid")


def infer_schema(path: str | Path, label: str | None = None, sample_rows: int = 100_000) -> Schema:
    """Guess a schema from the first ``sample_rows`` rows of a file with a header (CSV/TSV/Parquet).

    Strings become categorical; integers with few distinct values (or few relative to the sample)
    categorical, other numbers numeric; a 0/1 column named like a label is the label; the result
    is a starting point to edit, printed by ``ctrkit schema infer``.
    """
    import polars as pl

    from ctrkit.data.readers import read_sample

    df = read_sample(path, n_rows=sample_rows)
    cols = df.columns
    lower = {c.lower(): c for c in cols}

    def pick(names: tuple[str, ...]) -> str | None:
        for n in names:
            if n in lower:
                return lower[n]
        return None

    if label is None:
        label = pick(LABEL_NAMES)
        if label is None:
            raise SchemaError(
                f"{path}: cannot guess the label column among {cols}; pass --label COLUMN"
            )
    elif label not in cols:
        raise SchemaError(f"{path}: label column {label!r} not found; columns are {cols}")
    time_col = pick(TIME_NAMES)
    pos_col = pick(POSITION_NAMES)
    group_col = pick(GROUP_NAMES)
    n = max(df.height, 1)
    out: list[Field] = []
    for c in cols:
        if c in (label, time_col):
            continue
        s = df[c]
        distinct = s.n_unique()
        if s.dtype == pl.String or s.dtype == pl.Boolean or s.dtype == pl.Categorical:
            kind: Kind = "categorical"
        elif s.dtype.is_integer():
            kind = "categorical" if distinct <= 64 or c == pos_col or c == group_col else "numeric"
        elif s.dtype.is_float():
            kind = "numeric"
        elif s.dtype.is_temporal():
            continue
        else:
            kind = "categorical"
        if kind == "categorical" and distinct == n and n > 1000 and c != group_col:
            continue  # a row id: unique per row, useless as a feature
        if kind == "numeric" and s.drop_nulls().min() is not None and s.drop_nulls().min() >= 0:
            transform: NumericTransform = "log1p_standardize"
        else:
            transform = "standardize"
        out.append(Field(name=c, kind=kind, transform=transform))
    if not out:
        raise SchemaError(f"{path}: no feature columns left after taking the label and time columns")
    return Schema(fields=out, label=label, time=time_col, position=pos_col, group=group_col)
