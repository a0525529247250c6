"""What a model can show about its fields: attention between field pairs (AutoInt, FAT), SENet field weights
(FiBiNET), cross-layer weights (DCN, DCN-V2), ranked as field importances and top field pairs; and, for any
model, what shuffling each input column costs its served probabilities (permutation importance)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import torch

from ctrkit.data.dataset import Batch
from ctrkit.data.readers import Source, iter_chunks
from ctrkit.models.base import CTRModel


@dataclass
class Explanation:
    """Field importances and field-pair scores, highest first, averaged over ``rows`` rows."""

    model: str
    kind: str
    rows: int
    fields: list[tuple[str, float]] = field(default_factory=list)
    pairs: list[tuple[str, str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"model": self.model, "kind": self.kind, "rows": self.rows,
                "fields": [{"field": f, "score": s} for f, s in self.fields],
                "pairs": [{"a": a, "b": b, "score": s} for a, b, s in self.pairs]}


def field_names(model: CTRModel, n_fields: int) -> list[str]:
    """The names of the model's field vectors, in the embedding's order."""
    names = list(model.spec.sparse_names) + list(model.spec.dense_names)
    return names if len(names) == n_fields else names[:n_fields] + [f"field{i}" for i in range(len(names), n_fields)]


class _Accumulator:
    """Sums of the per-row "fields" [B, F] and "pairs" [B, F, F] a model's ``explain`` returns."""

    def __init__(self) -> None:
        self.rows, self.fields, self.pairs = 0, None, None  # type: int, np.ndarray | None, np.ndarray | None

    def add(self, shown: dict[str, torch.Tensor]) -> None:
        for key in ("fields", "pairs"):
            if key in shown:
                total = shown[key].detach().double().sum(dim=0).cpu().numpy()
                setattr(self, key, total if getattr(self, key) is None else getattr(self, key) + total)
        self.rows += int(next(iter(shown.values())).shape[0])

    def result(self, model: CTRModel, top: int) -> Explanation:
        n = max(self.rows, 1)
        pairs = None if self.pairs is None else self.pairs / n
        fields = self.fields / n if self.fields is not None else (None if pairs is None else pairs.mean(axis=0))
        kind = "field-pair weights (attention received / pair scores)" if pairs is not None else "field weights"
        if fields is None:
            raise ValueError(f"model {model.name!r} showed nothing")
        names = field_names(model, len(fields))
        ranked = sorted(zip(names, fields.tolist()), key=lambda t: -t[1])
        out = Explanation(model=getattr(model, "member_name", model.name), kind=kind, rows=self.rows, fields=ranked)
        if pairs is not None:
            i, j = np.triu_indices(len(fields), k=1)
            sym = (pairs[i, j] + pairs[j, i]) / 2
            order = np.argsort(-sym)[:top]
            out.pairs = [(names[i[k]], names[j[k]], float(sym[k])) for k in order]
        return out


def shows_weights(model: CTRModel) -> bool:
    """Whether the model (every member of an ensemble) has field weights or pair scores to show."""
    return all(type(m).explain is not CTRModel.explain for m in getattr(model, "members", [model]))


def _check(**counts: int) -> None:
    """A ValueError naming the first count below 1 (``top``, ``rows`` or ``repeats``, as the CLI's options are
    called)."""
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")


@torch.no_grad()
def explain_batch(model: CTRModel, batch: Batch, top: int = 10) -> Explanation:
    """The model's field importances and top ``top`` field pairs on one batch (a ValueError when the model
    has nothing to show)."""
    _check(top=top)
    model.eval()
    acc = _Accumulator()
    acc.add(model.explain(batch))
    return acc.result(model, top)


@torch.no_grad()
def explain_bundle(bundle: Any, source: Source, max_rows: int = 100_000, top: int = 10,
                   **read_kwargs: Any) -> Explanation:
    """:func:`explain_batch` over the first ``max_rows`` rows of a file, read and encoded as the bundle scores."""
    _check(top=top, rows=max_rows)
    model: CTRModel = bundle.model
    model.eval()
    device = next(model.parameters()).device
    acc = _Accumulator()
    for chunk in iter_chunks(source, bundle._features, with_label=False, **read_kwargs):
        chunk = chunk.head(max_rows - acc.rows)
        ids, dense = bundle.encoder.transform_frame(chunk)
        for start in range(0, len(ids), 8192):
            acc.add(model.explain(Batch(torch.from_numpy(ids[start:start + 8192]).to(device),
                                        torch.from_numpy(dense[start:start + 8192]).to(device))))
        if acc.rows >= max_rows:
            break
    if acc.rows == 0:
        raise ValueError(f"{source}: no rows to explain")
    return acc.result(model, top)


@dataclass
class FieldImportance:
    """How much worse the served probabilities get when one input column is shuffled across the rows (permutation
    importance): the drop in AUC and the rise in logloss, mean and standard deviation over ``repeats`` shuffles."""

    model: str
    rows: int
    repeats: int
    auc: float
    logloss: float
    fields: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"model": self.model, "kind": "permutation", "rows": self.rows, "repeats": self.repeats,
                "auc": self.auc, "logloss": self.logloss, "fields": self.fields}


def permutation_importance(bundle: Any, source: Source, max_rows: int = 100_000, repeats: int = 3, seed: int = 0,
                           **read_kwargs: Any) -> FieldImportance:
    """Rank the schema's input columns by what shuffling each costs the bundle's served probabilities on the first
    ``max_rows`` labelled rows of ``source`` (weighted when the schema has a weight column; a multi-task bundle's
    first head). Model-agnostic, unlike :func:`explain_bundle`; a column is shuffled raw, so a cross made from it
    is shuffled with it."""
    from ctrkit.evaluate.metrics import auc, logloss

    _check(rows=max_rows, repeats=repeats)
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    frames, have = [], 0
    for chunk in iter_chunks(source, bundle.schema, **read_kwargs):
        frames.append(chunk.head(max_rows - have))
        have += frames[-1].height
        if have >= max_rows:
            break
    if not have:
        raise ValueError(f"{source}: no labelled rows to shuffle")
    frame = pl.concat(frames)
    bundle._check_required(frame)
    y, w = bundle.encoder.labels(frame), bundle.encoder.weights(frame)
    if y.ndim == 2:
        y = y[:, 0]

    def served(df: pl.DataFrame) -> np.ndarray:
        p = bundle._score(df)
        return p[:, 0] if p.ndim == 2 else p

    base = served(frame)
    base_auc, base_loss = auc(y, base, w), logloss(y, base, w)
    rng = np.random.default_rng(seed)
    rows = []
    for f in bundle.schema.fields:
        drops, rises = [], []
        for _ in range(repeats):
            shuffled = frame.with_columns(frame[f.name].gather(rng.permutation(frame.height)))
            p = served(shuffled)
            drops.append(base_auc - auc(y, p, w))
            rises.append(logloss(y, p, w) - base_loss)
        rows.append({"field": f.name, "auc_drop": float(np.mean(drops)), "auc_drop_std": float(np.std(drops)),
                     "logloss_rise": float(np.mean(rises)), "logloss_rise_std": float(np.std(rises))})
    rows.sort(key=lambda r: (-r["auc_drop"], -r["logloss_rise"]))
    return FieldImportance(model=bundle.model.name, rows=frame.height, repeats=repeats, auc=base_auc,
                           logloss=base_loss, fields=rows)
