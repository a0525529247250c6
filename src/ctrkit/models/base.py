"""Base class, typed configuration and the registry that maps a model name to its class."""

from __future__ import annotations

import types
import typing
from dataclasses import asdict, dataclass, fields, replace
from importlib import resources
from typing import Any, ClassVar

import torch
import yaml
from torch import nn

from ctrkit.nn.embedding import FeatureLinear, FeatureSpec


SMALL_TABLE = 1 << 22  # embedding parameters up to which dense gradients and a whole-table L2 are used
TABLE_L2, BATCH_L2 = 0.05, 1e-5


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters shared by the model zoo; each model reads the ones it uses.

    ``emb_l2`` is an L2 penalty on embeddings. Scope "table": lambda / 2 * ||W||^2 of every embedding table
    at every step (the classic form; it shrinks rarely seen rows too, which matters on small data, and needs
    dense gradients). Scope "batch": lambda * ||e||^2 of the rows each sample looks up, averaged over the
    batch (cost proportional to the batch; works with sparse gradients, for large vocabularies).
    ``None`` / "auto" values are resolved by :meth:`resolve` from the size of the id space: tables up to
    ``SMALL_TABLE`` parameters train with dense gradients and a table L2 (``table_l2``, 0.05 when None), larger
    ones with sparse gradients and a batch L2 of 1e-5. ``linear_l2`` is the table-scope
    L2 of the first-order weights (the 1-wide tables of :class:`~ctrkit.nn.embedding.FeatureLinear`); None: ``emb_l2``.
    """

    embed_dim: int = 16
    hidden: tuple[int, ...] = (400, 400, 400)
    dropout: float = 0.0
    batch_norm: bool = False
    emb_l2: float | None = None
    emb_l2_scope: str = "auto"
    table_l2: float | None = None
    sparse_grad: bool | None = None
    init_std: float = 1e-2
    linear_l2: float | None = None

    def __post_init__(self) -> None:
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {self.embed_dim}")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden sizes must be >= 1, got {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("emb_l2", "linear_l2", "table_l2"):
            if (value := getattr(self, name)) is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.emb_l2_scope not in ("auto", "batch", "table"):
            raise ValueError(f"emb_l2_scope must be 'auto', 'batch' or 'table', got {self.emb_l2_scope!r}")
        if self.emb_l2_scope == "table" and self.sparse_grad:
            raise ValueError("emb_l2_scope 'table' penalises every row each step, so it needs sparse_grad=False")

    def resolve(self, spec: FeatureSpec) -> ModelConfig:
        """A copy with every automatic setting decided for this id space."""
        sparse = self.sparse_grad
        if sparse is None:
            sparse = False if self.emb_l2_scope == "table" else spec.n_ids * self.embed_dim > SMALL_TABLE
        scope = self.emb_l2_scope if self.emb_l2_scope != "auto" else ("batch" if sparse else "table")
        defaults = {"table": TABLE_L2 if self.table_l2 is None else self.table_l2, "batch": BATCH_L2}
        l2 = self.emb_l2 if self.emb_l2 is not None else defaults[scope]
        return replace(self, sparse_grad=sparse, emb_l2_scope=scope, emb_l2=l2)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a dict, naming any unknown key; lists become tuples."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model settings {unknown}; known: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        for k, v in d.items():
            if not _fits(v, hints[k]):
                raise ValueError(f"model setting {k} must be {_describe(hints[k])}, got {v!r}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _fits(value: Any, hint: Any) -> bool:
    """Whether a setting's value (as YAML or JSON give it) has the type its field declares."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_fits(x, args[0]) for x in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    """A field's type in words, for an error message."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(args[0], _describe(args[0]))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


class CTRModel(nn.Module):
    """A CTR model: ``forward(batch) -> logits [B]`` (or [B, T] for T heads).

    The sigmoid lives in the loss and the scorer; a model reads the parts of the
    :class:`~ctrkit.data.dataset.Batch` it uses, so trainer, scorer and GPU path never branch on a model's name.
    """

    name: ClassVar[str] = ""
    multi_head: ClassVar[bool] = False  # True: logits [B, T], one head per label of the spec
    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    defaults: ClassVar[dict[str, Any]] = {}
    train_defaults: ClassVar[dict[str, Any]] = {}
    config_version: ClassVar[int | None] = None

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        super().__init__()
        self.spec, self.config = spec, config.resolve(spec)
        self._penalty: torch.Tensor | None = None

    def _remember_penalty(self, squares: torch.Tensor) -> None:
        """Keep the L2 term of the rows this batch looked up, for :meth:`regularization`.

        ``squares`` [B] is each sample's sum of squared embedding entries (``pairwise_and_squares`` gives it
        alongside an FM term; otherwise ``emb.pow(2).sum(dim=(1, 2))``).
        """
        if self.training and self.config.emb_l2 and self.config.emb_l2_scope == "batch":
            self._penalty = self.config.emb_l2 * squares.mean()
        else:
            self._penalty = None

    def mlp_over_fields(self, emb: torch.Tensor, batch: Any, numeric: bool = True) -> torch.Tensor:
        """``self.mlp(emb.flatten(1))`` [B, out] for the field vectors ``emb`` straight from ``self.embedding``
        (``numeric=False``: given without the numeric fields); a first ``nn.Linear`` layer reads them through
        :meth:`~ctrkit.nn.embedding.FeatureEmbedding.project_inputs`, which folds the numeric fields' columns (the
        same result; on Criteo's layout the first layer reads 448 of 624 columns)."""
        first = self.mlp[0]
        if type(first) is nn.Linear:
            return self.mlp.with_first_weight(*self.embedding.project_inputs(emb, batch, first.weight, numeric))
        if not numeric and self.spec.n_dense:  # another first layer (a serving form's) reads every field's vector
            emb = torch.cat([emb, self.embedding.numeric_vectors(batch)], dim=1)
        return self.mlp(emb.flatten(1))

    def embed_fields(self, batch: Any) -> torch.Tensor:
        """``self.embedding(batch)`` [B, F, D], remembering its batch-scope L2 term: the usual first line of a forward."""
        emb = self.embedding(batch)
        if self.training and self.config.emb_l2 and self.config.emb_l2_scope == "batch":
            self._penalty = self.config.emb_l2 * emb.pow(2).sum(dim=tuple(range(1, emb.dim()))).mean()
        else:
            self._penalty = None
        return emb

    def regularization(self) -> torch.Tensor | None:
        """The regularisation term to add to the loss of the last training forward pass, or None.

        A batch-scope term is handed over once: the model lets go of it (and of its graph) when asked.
        """
        cfg = self.config
        if self.training and cfg.emb_l2_scope == "table":
            tables = [m for m in self.modules() if isinstance(m, nn.Embedding)]
            if cfg.linear_l2 is None and cfg.emb_l2:
                return 0.5 * cfg.emb_l2 * sum(m.weight.pow(2).sum() for m in tables)
            if cfg.linear_l2 is not None:
                linear = {id(m.table) for m in self.modules() if isinstance(m, FeatureLinear)}
                terms = [(cfg.linear_l2 if id(m) in linear else cfg.emb_l2, m.weight) for m in tables]
                if any(l2 for l2, _ in terms):
                    return 0.5 * sum(l2 * w.pow(2).sum() for l2, w in terms if l2)
        penalty, self._penalty = self._penalty, None
        return penalty if self.training else None

    def explain(self, batch: Any) -> dict[str, torch.Tensor]:
        """What the model can show about a batch: "fields" [B, F] weights and / or "pairs" [B, F, F] scores
        (row i's weight on field j). Models without such weights say so."""
        shows = sorted(n for n, c in _REGISTRY.items() if c.explain is not CTRModel.explain)
        raise ValueError(f"model {self.name!r} has no field weights to show; models that do: {shows}")

    def fit_features(self, data: Any) -> None:
        """Learn whatever the model derives from the training data before the first step (an
        :class:`~ctrkit.data.dataset.EncodedData`); most models derive nothing."""

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters with sparse gradients (embedding tables when ``sparse_grad``)."""
        return [m.weight for m in self.modules() if isinstance(m, nn.Embedding) and m.sparse]


_REGISTRY: dict[str, type[CTRModel]] = {}


def load_defaults(name: str) -> dict[str, Any] | None:
    """The tuned defaults shipped for model ``name`` (``configs/<name>.yaml``: ``version``, ``model``, ``train``),
    or None when the package ships none."""
    path = resources.files("ctrkit.models") / "configs" / f"{name}.yaml"
    if not path.is_file():
        return None
    doc = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(doc) - {"version", "model", "train"})
    if unknown or not isinstance(doc.get("version"), int):
        raise ValueError(f"{path}: needs an integer `version` and only `model` / `train` sections, "
                         f"got keys {sorted(doc)}")
    return doc


def model_summary(name: str) -> str:
    """One sentence on model ``name``: the first of its shipped YAML's leading comment (which says what the
    model is and how it is set up), else the first line of its class docstring."""
    cls = model_class(name)
    path = resources.files("ctrkit.models") / "configs" / f"{cls.name}.yaml"
    comment = []
    if path.is_file():
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("#").strip())
    text = " ".join(comment) or (cls.__doc__ or "").strip().split("\n")[0]
    end = text.find(". ")
    return text if end < 0 else text[:end + 1]


def register(cls: type[CTRModel]) -> type[CTRModel]:
    """Class decorator: make a model available by its ``name``, with the defaults of its YAML file when shipped."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name`")
    doc = load_defaults(cls.name)
    if doc is not None:
        cls.defaults, cls.train_defaults = dict(doc.get("model") or {}), dict(doc.get("train") or {})
        cls.config_version = doc["version"]
        cls.config_class.from_dict(cls.defaults)  # a bad shipped file fails at import, naming the setting
    _REGISTRY[cls.name] = cls
    return cls


def model_names() -> list[str]:
    """Names accepted by :func:`build_model` and ``ctrkit train --model``."""
    return sorted(_REGISTRY)


def default_config(name: str, **overrides: Any) -> ModelConfig:
    """The tuned default configuration of a model, with overrides applied."""
    cls = model_class(name)
    return _with_overrides(cls.config_class.from_dict(dict(cls.defaults)), overrides)


def _with_overrides(config: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    """``config`` with the non-None ``overrides``; an unknown name is a ValueError that lists the known ones."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    return type(config).from_dict({**config.to_dict(), **clean}) if clean else config


def model_class(name: str) -> type[CTRModel]:
    """The registered class for ``name`` (case-insensitive); the error lists the available names."""
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {model_names()}")
    return _REGISTRY[key]


def build_model(name: str, spec: FeatureSpec, config: ModelConfig | None = None, **overrides: Any) -> CTRModel:
    """Instantiate a registered model for ``spec``; ``config`` defaults to the model's tuned defaults.

    ``overrides`` apply on top of ``config`` when both are given.
    """
    cls = model_class(name)
    if config is not None and not isinstance(config, cls.config_class):
        config = cls.config_class.from_dict(config.to_dict())
    cfg = default_config(name, **overrides) if config is None else _with_overrides(config, overrides)
    return cls(spec, cfg)
