"""Schema: names every column of a click log and says how each feature is encoded.

A schema is plain data (dataclasses), saved to and loaded from YAML. It is the contract between a raw
file, the encoder, the model and the scorer: a bundle refuses input whose columns do not fit it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

Kind = Literal["categorical", "numeric", "multi", "sequence"]
NumericTransform = Literal["log1p_standardize", "standardize", "log1p", "none", "bucketize"]
Pooling = Literal["mean", "sum"]

KINDS: tuple[str, ...] = ("categorical", "numeric", "multi", "sequence")
TRANSFORMS: tuple[str, ...] = ("log1p_standardize", "standardize", "log1p", "none", "bucketize")
POOLINGS: tuple[str, ...] = ("mean", "sum")
LIST_KINDS: tuple[str, ...] = ("multi", "sequence")
# settings added after the first format: left out of a fingerprint while at their default, so the bundles
# saved before them keep loading
_LATER_KEYS = {"sep": None, "pooling": "mean", "max_len": 20, "share_vocab": None}


class SchemaError(ValueError):
    """A schema, or data checked against it, is not valid; the message names the field."""


STAT_BUCKETS = 1 << 24  # a stat's counts are arrays over its field's ids: a hashed field of at most this many
_UNITS_US = {"us": 1, "ms": 1_000, "s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000,
             "w": 604_800_000_000}


def window_span(window: str) -> int:
    """A stat's window in the time column's units: ``7d``, ``12h``, ``30m``, ``45s``, ``500ms``, ``2w`` in epoch
    microseconds (how dates and epoch_s / epoch_ms times are read); a bare integer in the column's own units (a
    typed column of plain numbers, read as they are)."""
    m = re.fullmatch(r"([1-9][0-9]*)(us|ms|s|m|h|d|w)?", str(window).strip())
    if m is None:
        raise SchemaError(f"window must be a positive duration such as 7d, 12h, 30m, 45s or a whole number of the "
                          f"time column's units, got {window!r}")
    return int(m.group(1)) * _UNITS_US[m.group(2) or "us"]


@dataclass(frozen=True)
class Stat:
    """A rolling click statistic of one categorical field (a user, an item, an ad; a cross or a field hashed into at
    most :data:`STAT_BUCKETS` buckets too; a hashed field counts per bucket): for each row, the
    impressions and clicks of the training rows with the same value strictly before the row's time (within
    ``window`` when set), as two numeric features: the log-odds of the click rate smoothed by ``prior``
    pseudo-impressions at the training rate, and log1p of the impressions. Valid, test and served rows read a
    snapshot frozen at the end of training (:mod:`ctrkit.data.rolling`)."""

    field: str
    window: str | None = None
    prior: float = 10.0

    def __post_init__(self) -> None:
        if not self.field or not isinstance(self.field, str):
            raise SchemaError(f"a stat needs a field name, got {self.field!r}")
        if self.window is not None:
            object.__setattr__(self, "window", str(self.window).strip())
            window_span(self.window)
        if isinstance(self.prior, bool) or not isinstance(self.prior, (int, float)) or not self.prior > 0:
            raise SchemaError(f"stat of {self.field!r}: prior must be a positive number, got {self.prior!r}")
        object.__setattr__(self, "prior", float(self.prior))

    @property
    def columns(self) -> tuple[str, str]:
        """The names of its two dense features: ``<field>_ctr`` and ``<field>_n``, with ``_<window>`` after."""
        tail = f"_{self.window}" if self.window else ""
        return f"{self.field}_ctr{tail}", f"{self.field}_n{tail}"

    def to_dict(self) -> dict[str, Any] | str:
        """The field's name alone at the defaults, else a mapping of what differs."""
        out: dict[str, Any] = {"field": self.field}
        if self.window:
            out["window"] = self.window
        if self.prior != 10.0:
            out["prior"] = self.prior
        return self.field if len(out) == 1 else out


@dataclass
class Field:
    """One feature column.

    categorical: values become ids through a vocabulary fitted on training data (``min_count`` drops rare
    values to the field's OOV id) or, with ``hash_buckets``, through a stable hash into that many buckets.
    numeric: ``transform`` says how values are scaled; ``bucketize`` turns the value into a categorical id
    through ``n_buckets`` quantile bins fitted on training data. Missing values get their own id / flag.
    multi: a set of values in one cell (genres, tags), a list or a string split at ``sep``; pooled (``pooling``
    mean or sum) into one field vector; an empty set is the field's missing id. At most ``max_len`` values
    are kept (the first ones).
    sequence: an ordered list of ids, oldest first (a user's history); the most recent ``max_len`` are kept,
    the rest of the block is padding with a mask. ``share_vocab: item_id`` looks the ids up in that
    categorical field's vocabulary (fitted on both columns), so history and candidate share their embeddings.
    ``required``: a missing value is an error at scoring time instead of the field's missing id.
    """

    name: str
    kind: Kind = "categorical"
    min_count: int = 1
    hash_buckets: int | None = None
    transform: NumericTransform = "log1p_standardize"
    n_buckets: int = 32
    required: bool = False
    sep: str | None = None
    pooling: Pooling = "mean"
    max_len: int = 20
    share_vocab: str | None = None

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
        if self.pooling not in POOLINGS:
            raise SchemaError(f"field {self.name!r}: pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.max_len < 1:
            raise SchemaError(f"field {self.name!r}: max_len must be >= 1, got {self.max_len}")
        if self.sep is not None and not (isinstance(self.sep, str) and self.sep):
            raise SchemaError(f"field {self.name!r}: sep must be a non-empty string, got {self.sep!r}")
        if self.kind not in LIST_KINDS and (self.sep is not None or self.share_vocab is not None):
            raise SchemaError(f"field {self.name!r}: sep and share_vocab apply to multi and sequence fields only")
        if self.kind in LIST_KINDS and self.hash_buckets is not None and self.share_vocab is not None:
            raise SchemaError(f"field {self.name!r}: a shared vocabulary cannot also be hashed")

    @property
    def is_sparse(self) -> bool:
        """True when the field becomes one id per row (categorical, or a bucketized numeric)."""
        return self.kind == "categorical" or (self.kind == "numeric" and self.transform == "bucketize")

    @property
    def is_list(self) -> bool:
        """True when the field holds several ids per row (multi or sequence)."""
        return self.kind in LIST_KINDS

    def to_dict(self) -> dict[str, Any]:
        """Only the settings that differ from the defaults, so YAML stays short."""
        defaults = Field(name=self.name)
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        for f in fields(self):
            if f.name in ("name", "kind"):
                continue
            if self.kind != "numeric" and f.name in ("transform", "n_buckets"):
                continue
            if self.kind == "numeric" and f.name in ("min_count", "hash_buckets"):
                continue
            if self.kind not in LIST_KINDS and f.name in _LATER_KEYS:
                continue
            value = getattr(self, f.name)
            if value != getattr(defaults, f.name):
                out[f.name] = value
        return out


@dataclass
class Schema:
    """All columns of a log: the feature fields, the label(s) and the optional time / position / group columns.

    ``weight`` names an optional column of sample weights (e.g. 1/propensity): training losses and metrics
    count a row of weight w as w rows; a missing or negative weight makes the row bad.

    ``columns`` is the full column order of files without a header line (a raw Criteo TSV); it may list
    columns that are neither features nor roles, which are then read and ignored. ``time_format`` says how the
    time column is written: a strftime format (``%Y-%m-%d %H:%M:%S``), ``epoch_s`` or ``epoch_ms``; without
    it, ISO dates and times are parsed and plain integers kept as they are.
    ``labels`` names several 0/1 label columns for multi-task models (``label`` is then the first); ``crosses``
    lists groups of categorical fields whose combined value becomes one more categorical field, named
    ``a_x_b``, encoded like any other. ``stats`` lists rolling click statistics (:class:`Stat`) of categorical
    fields or crosses, each two more dense features; they need the ``time`` column.
    """

    fields: list[Field]
    label: str
    time: str | None = None
    position: str | None = None
    group: str | None = None
    columns: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    time_format: str | None = None
    labels: list[str] | None = None
    crosses: list[list[str]] | None = None
    weight: str | None = None
    stats: list[Stat] | None = None

    def __post_init__(self) -> None:
        self.fields = [f if isinstance(f, Field) else Field(**f) for f in self.fields]
        if self.stats is not None:
            self.stats = [_stat(s) for s in self.stats] or None
        if not self.fields:
            raise SchemaError("a schema needs at least one feature field")
        if self.labels is not None:
            if not isinstance(self.labels, (list, tuple)) or not all(isinstance(x, str) for x in self.labels):
                raise SchemaError(f"labels must be a list of column names, got {self.labels!r}")
            self.labels = list(self.labels)
            if not self.labels or len(set(self.labels)) != len(self.labels):
                raise SchemaError(f"labels must be distinct column names, got {self.labels}")
            if not self.label:
                self.label = self.labels[0]
            if self.label != self.labels[0]:
                raise SchemaError(f"label {self.label!r} must be the first of labels {self.labels}")
            if len(self.labels) == 1:
                self.labels = None
        if self.crosses is not None:
            self.crosses = [list(c) for c in self.crosses] or None
        names = [f.name for f in self.features]
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
        for lab in self.label_columns:
            if lab in names:
                raise SchemaError(f"the label {lab!r} cannot also be a feature field")
        if self.weight and self.weight in names + list(self.label_columns):
            raise SchemaError(f"the weight column {self.weight!r} cannot also be a feature field or the label")
        self._check_links()
        if self.columns is not None:
            needed = {f.name for f in self.fields} | set(self.role_columns)
            missing = sorted(needed - set(self.columns))
            if missing:
                raise SchemaError(f"`columns` does not list {missing}, which the schema uses")

    def _check_links(self) -> None:
        """Crosses name categorical fields; a shared vocabulary is a categorical field with a vocabulary."""
        kinds = {f.name: f for f in self.fields}
        for cross in self.crosses or []:
            if len(cross) < 2:
                raise SchemaError(f"a cross needs at least two fields, got {cross}")
            for name in cross:
                if name not in kinds or kinds[name].kind != "categorical":
                    raise SchemaError(f"cross {cross}: {name!r} is not a categorical field")
        for f in self.fields:
            if f.share_vocab is None:
                continue
            target = kinds.get(f.share_vocab)
            if target is None or target.kind != "categorical" or target.hash_buckets is not None:
                raise SchemaError(f"field {f.name!r}: share_vocab {f.share_vocab!r} must name a categorical "
                                  "field with a vocabulary (not hashed)")
        if not self.stats:
            return
        if not self.time:
            raise SchemaError("stats count each row's history before its time: the schema needs a `time` column")
        keyed = {f.name for f in self.features if f.kind == "categorical" and (f.hash_buckets or 0) <= STAT_BUCKETS}
        taken = {f.name for f in self.features} | set(self.role_columns)
        for st in self.stats:
            if st.field not in keyed:
                raise SchemaError(f"stat of {st.field!r}: not a categorical field or a cross (hashed into at most "
                                  f"{STAT_BUCKETS:,} buckets); those are {sorted(keyed)}")
            clash = sorted(taken & set(st.columns))
            if clash:
                raise SchemaError(f"stat of {st.field!r}: its feature {clash[0]!r} is already a column name")
            taken |= set(st.columns)

    # -- views -------------------------------------------------------------------------------------
    def field(self, name: str) -> Field:
        """The field called ``name``; a SchemaError lists the known names otherwise."""
        for f in self.fields:
            if f.name == name:
                return f
        raise SchemaError(f"no field {name!r}; fields are {[f.name for f in self.fields]}")

    @property
    def features(self) -> list[Field]:
        """The declared fields, then one categorical field per cross (``a_x_b``)."""
        return self.fields + [Field(name="_x_".join(c)) for c in self.crosses or []]

    @property
    def sparse_fields(self) -> list[Field]:
        """Fields that become one id per row (crosses included), in schema order."""
        return [f for f in self.features if f.is_sparse]

    @property
    def dense_fields(self) -> list[Field]:
        """Numeric fields that stay continuous, in schema order."""
        return [f for f in self.fields if f.kind == "numeric" and not f.is_sparse]

    @property
    def stat_columns(self) -> list[str]:
        """The dense features of ``stats``, two per stat, after the numeric fields in the dense block."""
        return [c for st in self.stats or () for c in st.columns]

    @property
    def list_fields(self) -> list[Field]:
        """Multi and sequence fields (several ids per row), in schema order."""
        return [f for f in self.fields if f.is_list]

    @property
    def label_columns(self) -> list[str]:
        """Every label column: ``labels`` when set, else ``[label]``."""
        return list(self.labels) if self.labels else [self.label]

    @property
    def input_columns(self) -> list[str]:
        """Columns a scorer reads: the feature fields."""
        return [f.name for f in self.fields]

    @property
    def role_columns(self) -> list[str]:
        """Label(s), time, position, group and weight columns that are set."""
        return [*self.label_columns, *(c for c in (self.time, self.position, self.group, self.weight) if c)]

    # -- persistence -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain dict, the YAML layout."""
        out: dict[str, Any] = {"labels": list(self.labels)} if self.labels else {"label": self.label}
        for role in ("time", "time_format", "position", "group", "weight"):
            if getattr(self, role):
                out[role] = getattr(self, role)
        out["fields"] = [f.to_dict() for f in self.fields]
        if self.columns is not None:
            out["columns"] = list(self.columns)
        if self.crosses:
            out["crosses"] = [list(c) for c in self.crosses]
        if self.stats:
            out["stats"] = [st.to_dict() for st in self.stats]
        if self.extra:
            out["extra"] = dict(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "schema") -> Schema:
        """Build from the YAML layout; unknown keys are an error that names them."""
        if not isinstance(data, dict):
            raise SchemaError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
        known = {"label", "labels", "time", "time_format", "position", "group", "weight", "fields", "columns",
                 "extra", "crosses", "stats"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SchemaError(f"{source}: unknown keys {unknown}; known keys are {sorted(known)}")
        if "fields" not in data or ("label" not in data and "labels" not in data):
            raise SchemaError(f"{source}: needs both `label` and `fields` (or `labels` for several)")
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
            try:
                parsed.append(Field(**item))
            except SchemaError as exc:
                raise SchemaError(f"{source}: {exc}") from None
        try:
            return cls._of(data, parsed)
        except SchemaError as exc:  # the file's name before what is wrong in it
            raise SchemaError(f"{source}: {exc}") from None

    @classmethod
    def _of(cls, data: dict[str, Any], parsed: list[Field]) -> Schema:
        return cls(
            fields=parsed,
            label=data.get("label") or "",
            labels=data.get("labels"),
            crosses=data.get("crosses"),
            stats=data.get("stats"),
            time=data.get("time"),
            time_format=data.get("time_format"),
            position=data.get("position"),
            group=data.get("group"),
            weight=data.get("weight"),
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
        """A short hash of what the encoder and model depend on (fields, labels, crosses), for bundle checks.

        Settings added later are left out while at their default, so older schemas keep their fingerprint.
        """
        fs = [{k: v for k, v in asdict(f).items() if k not in _LATER_KEYS or v != _LATER_KEYS[k]}
              for f in self.fields]
        content: dict[str, Any] = {"label": self.label, "fields": fs}
        if self.labels:
            content["labels"] = self.labels
        if self.crosses:
            content["crosses"] = self.crosses
        if self.stats:
            content["stats"] = [asdict(st) for st in self.stats]
        payload = json.dumps(content, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _stat(item: Any) -> Stat:
    """A :class:`Stat` from itself, a field name or a mapping (unknown keys named)."""
    if isinstance(item, Stat):
        return item
    if isinstance(item, str):
        return Stat(field=item)
    if not isinstance(item, dict):
        raise SchemaError(f"a stat is a field name or a mapping with field, window and prior, got {item!r}")
    bad = sorted(set(item) - {"field", "window", "prior"})
    if bad:
        raise SchemaError(f"stat {item.get('field')!r} has unknown keys {bad}; known keys are field, window, prior")
    return Stat(**item)


# --- inference --------------------------------------------------------------------------------------
LABEL_NAMES = ("label", "click", "clicked", "is_click", "clk", "y", "target")
OUTCOME_WORDS = ("click", "clk", "label", "target", "purchase", "buy", "bought", "conversion", "convert", "order",
                 "cart", "like", "share", "install", "signup", "outcome", "response")
TIME_NAMES = ("timestamp", "time", "ts", "event_time", "datetime", "date")
POSITION_NAMES = ("position", "pos", "rank", "slot")
GROUP_NAMES = ("user", "user_id", "userid", "uid")
TIME_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d", "%Y/%m/%d %H:%M:%S",
                "%Y/%m/%d", "%d/%m/%Y %H:%M:%S", "%m/%d/%Y %H:%M:%S", "%d-%b-%Y", "%Y%m%d%H%M%S")
MULTI_SEPARATORS = ("|", ";", ",", " ")
EPOCH_S = (1e8, 4.2e9)  # 1973 .. 2103 in seconds


def _is_id_name(name: str) -> bool:
    """``user_id``, ``itemId``, ``uid``, ``zip_code``, ``sku``: a name that says the integers are labels."""
    lower = name.lower()
    return (lower in GROUP_NAMES or bool(re.search(r"(^|[_\-. ])(id|ids|uid|key|code|zip|zipcode|sku|hash)$", lower))
            or bool(re.search(r"[a-z0-9](Id|ID)$", name)) or lower.endswith(("userid", "itemid", "adid", "movieid")))


@dataclass
class Inference:
    """What ``schema infer`` concluded: the schema, the columns left out (with why) and other observations."""

    schema: Schema
    sampled: int
    source: str
    left_out: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_yaml(self) -> str:
        """The schema as YAML, headed by comments saying what was left out and noticed."""
        head = [f"# inferred by `ctrkit schema infer` from {self.sampled:,} rows of {self.source}; review before use"]
        head += [f"# left out: {c}: {why}" for c, why in self.left_out.items()]
        head += [f"# note: {n}" for n in self.notes]
        return "\n".join(head) + "\n" + self.schema.to_yaml()

    def summary(self) -> list[str]:
        """Short lines for a person: the roles, the kinds, and what was left out or noticed."""
        s = self.schema
        cat = [f.name for f in s.fields if f.kind == "categorical"]
        num = [f.name for f in s.fields if f.kind == "numeric"]
        rare = [f.name for f in s.fields if f.kind == "categorical" and f.min_count > 1]
        roles = ", ".join(f"{r}: {getattr(s, r)}" + (f" ({s.time_format})" if r == "time" and s.time_format else "")
                          for r in ("time", "position", "group") if getattr(s, r))
        lines = [f"{self.source}: {self.sampled:,} rows sampled; label: {s.label}" + (f"; {roles}" if roles else ""),
                 f"{len(cat)} categorical ({', '.join(cat[:8])}{', ...' if len(cat) > 8 else ''}), "
                 f"{len(num)} numeric ({', '.join(num[:8])}{', ...' if len(num) > 8 else ''})"]
        if rare:
            lines.append(f"min_count 2 proposed for {len(rare)} field(s) with many values seen once: "
                         f"{', '.join(rare[:8])}{', ...' if len(rare) > 8 else ''}")
        lines += [f"left out {c}: {why}" for c, why in self.left_out.items()]
        lines += self.notes
        return lines


def infer_schema(path: str | Path, label: str | None = None, sample_rows: int = 100_000) -> Schema:
    """Guess a schema from the first ``sample_rows`` rows of a file (see :func:`infer`)."""
    return infer(path, label=label, sample_rows=sample_rows).schema


def _time_format(s: Any, name: str) -> tuple[bool, str | None]:
    """(is a time column, its time_format) of a sampled column: dates and times, or epoch numbers named so."""
    import polars as pl

    values = s.drop_nulls()
    if values.len() == 0:
        return False, None
    if s.dtype.is_temporal():
        return True, None
    if s.dtype == pl.String:
        text = values.str.strip_chars()
        for fmt in TIME_FORMATS:
            if text.str.to_datetime(format=fmt, strict=False).null_count() == 0:
                return True, fmt
        try:  # ISO 8601 with fractions or a zone, which the readers parse without a format
            iso = text.str.to_datetime(strict=False, time_zone="UTC").null_count() == 0
        except Exception:  # noqa: BLE001 - polars refuses some mixes of zones: then it is not one time column
            iso = False
        return iso, None
    lower = name.lower()
    named = lower in TIME_NAMES or any(w in lower for w in ("time", "date")) or lower.endswith("_ts")
    if s.dtype.is_numeric() and named:
        lo, hi = float(values.min()), float(values.max())
        if EPOCH_S[0] <= lo and hi <= EPOCH_S[1]:
            return True, "epoch_s"
        if EPOCH_S[0] * 1000 <= lo and hi <= EPOCH_S[1] * 1000:
            return True, "epoch_ms"
    return False, None


def _is_binary(s: Any) -> bool:
    """A numeric column with exactly the two values 0 and 1 (or -1 and 1)."""
    import polars as pl

    values = s.drop_nulls()
    if not s.dtype.is_numeric() or values.n_unique() != 2:
        return False
    return set(values.cast(pl.Float64).unique().to_list()) in ({0.0, 1.0}, {-1.0, 1.0})


def _multi_separator(s: Any) -> str | None:
    """The separator of a column whose values are lists (``Action|Comedy``): most values hold it, and the
    separate tokens are far fewer than the distinct joined values."""
    values = s.drop_nulls().unique()
    if values.len() < 10:
        return None
    for sep in MULTI_SEPARATORS:
        holding = values.str.contains(sep, literal=True)
        if holding.mean() >= 0.3:
            tokens = values.str.split(sep).explode().str.strip_chars().n_unique()
            if tokens * 2 <= values.len():
                return sep
    return None


def infer(path: str | Path, label: str | None = None, sample_rows: int = 100_000) -> Inference:
    """Guess a schema from the first ``sample_rows`` rows of a CSV/TSV/Parquet file (header line or not).

    Strings are categorical; integers are categorical when named like ids (``user_id``, ``zip_code``) or when
    they are a small dense code set (hour, weekday, position), numeric otherwise; floats numeric. A column
    unique in every row (a row id) or constant is left out; ``min_count: 2`` is proposed where many values are
    seen once. Dates and times, and epoch seconds / milliseconds in a column named like a time, give ``time``
    with its ``time_format``. The label is the column named like one (the first 0/1 column of a file without
    a header line); other 0/1 columns named like an outcome are left out, since as inputs they would leak it.
    """
    import polars as pl

    from ctrkit.data.readers import DataError, detect_format, has_header_line, read_sample

    df = read_sample(path, n_rows=sample_rows)
    cols = df.columns
    fmt = detect_format(path)
    headerless = fmt in ("csv", "tsv") and not has_header_line(path, "\t" if fmt == "tsv" else ",")
    lower = {c.lower(): c for c in cols}
    n = df.height
    if n == 0:
        raise DataError(f"{path}: a header line but no rows to infer from")

    def pick(names: tuple[str, ...]) -> str | None:
        for name in names:
            if name in lower:
                return lower[name]
        return None

    if label is None:
        label = pick(LABEL_NAMES)
        if label is None and headerless:
            label = next((c for c in cols if _is_binary(df[c])), None)
        if label is None:
            odd = next((sep for sep in (";", "|", ":") if len(cols) == 1 and sep in cols[0]), None)
            hint = (f" (one column: the file looks separated by {odd!r}; ctrkit reads commas in .csv files and tabs "
                    "in .tsv files)") if odd else ""
            raise SchemaError(f"{path}: cannot guess the label column among {cols}{hint}; pass --label COLUMN")
    elif label not in cols:
        raise SchemaError(f"{path}: label column {label!r} not found; columns are {cols}")
    seen = df[label].drop_nulls()
    if seen.dtype.is_numeric() and seen.n_unique() == 1 and float(seen[0]) in (-1.0, 0.0, 1.0):
        raise SchemaError(f"{path}: the label column {label!r} is {seen[0]} in all {seen.len():,} sampled rows: a "
                          "label must take both values (--rows samples more of the file)")
    if not _is_binary(df[label]):
        raise SchemaError(f"{path}: the label column {label!r} is not 0/1 (or -1/1) in the sampled rows; values "
                          f"like {df[label].drop_nulls().unique().head(5).to_list()}")
    left_out: dict[str, str] = {}
    notes: list[str] = []
    time_col, time_format = None, None
    for c in [pick(TIME_NAMES)] + cols:
        if c is None or c == label:
            continue
        is_time, tf = _time_format(df[c], c)
        if is_time and time_col is None:
            time_col, time_format = c, tf
        elif is_time and c != time_col:
            left_out[c] = "a second date/time column (only one can be the schema's `time`)"
    pos_col = pick(POSITION_NAMES)
    group_col = pick(GROUP_NAMES)
    out: list[Field] = []
    for c in cols:
        if c in (label, time_col) or c in left_out:
            continue
        s = df[c]
        values = s.drop_nulls()
        distinct = values.n_unique()
        if distinct <= 1:
            left_out[c] = ("empty in every sampled row" if distinct == 0
                           else f"constant ({values[0]!r} in every sampled row that has a value)")
            continue
        if _is_binary(s) and any(w in c.lower() for w in OUTCOME_WORDS):
            left_out[c] = (f"a second label-like 0/1 column beside {label!r}: as a feature it would leak the "
                           "outcome; train a model of its own with --label if it is one")
            continue
        if s.dtype == pl.String or s.dtype == pl.Boolean or s.dtype == pl.Categorical:
            kind: Kind = "categorical"
        elif s.dtype.is_integer():
            lo, hi = int(values.min()), int(values.max())
            small_code_set = distinct <= 32 and hi - lo + 1 <= 2 * distinct
            kind = "categorical" if (_is_id_name(c) or small_code_set or c in (pos_col, group_col)) else "numeric"
        elif s.dtype.is_float():
            kind = "numeric"
        else:
            kind = "categorical"
        if distinct == values.len() == n and n >= 100 and c != group_col and (
                kind == "categorical" or s.dtype.is_integer()):
            left_out[c] = f"unique in every one of the {n:,} sampled rows: a row id, useless as a feature"
            continue
        f = Field(name=c, kind=kind)
        if kind == "numeric":
            f.transform = "log1p_standardize" if float(values.min()) >= 0 else "standardize"
        else:
            counts = values.cast(pl.String).value_counts()["count"]
            once = int((counts == 1).sum())
            if once >= 5 and once >= 0.1 * distinct:
                f.min_count = 2
            if s.dtype == pl.String:
                sep = _multi_separator(values)
                if sep is not None:
                    notes.append(f"{c} looks multi-valued (values joined by {sep!r}); kept as one categorical")
        out.append(f)
    if not out:
        raise SchemaError(f"{path}: no feature columns left after taking the label and time columns")
    schema = Schema(fields=out, label=label, time=time_col, position=pos_col if pos_col in [f.name for f in out]
                    else None, group=group_col if group_col in [f.name for f in out] else None,
                    columns=list(cols) if headerless else None, time_format=time_format)
    if headerless:
        notes.append(f"the first line holds data, not names: columns are called c1..c{len(cols)} "
                     "(rename them in `columns` and the fields)")
    return Inference(schema=schema, sampled=n, source=str(path), left_out=left_out, notes=notes)
