"""One embedding table for every sparse field (ids already offset into a global space) plus numeric fields.

A numeric field j with value x gets the vector ``x * v_j`` (and a learned ``m_j`` when the value is missing),
so numeric fields take part in pairwise interactions and the MLP exactly like categorical ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ctrkit.data.dataset import Batch


@dataclass(frozen=True)
class FeatureSpec:
    """What a model needs to know about its inputs: the id space and the field layout."""

    n_ids: int
    field_sizes: tuple[int, ...]
    sparse_names: tuple[str, ...]
    dense_names: tuple[str, ...]

    @property
    def n_sparse(self) -> int:
        """Number of id fields (columns of ``ids``)."""
        return len(self.sparse_names)

    @property
    def n_dense(self) -> int:
        """Number of numeric fields (columns of ``dense``)."""
        return len(self.dense_names)

    @property
    def n_fields(self) -> int:
        """All fields, the unit of pairwise interactions."""
        return self.n_sparse + self.n_dense

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (saved in a bundle)."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> FeatureSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(n_ids=int(d["n_ids"]), field_sizes=tuple(d["field_sizes"]),  # type: ignore[arg-type]
                   sparse_names=tuple(d["sparse_names"]), dense_names=tuple(d["dense_names"]))  # type: ignore[arg-type]

    @classmethod
    def from_encoder(cls, encoder: object) -> FeatureSpec:
        """The spec of a fitted :class:`ctrkit.data.encode.Encoder`."""
        return cls(n_ids=encoder.n_ids, field_sizes=tuple(encoder.field_sizes()),  # type: ignore[attr-defined]
                   sparse_names=tuple(encoder.sparse_names), dense_names=tuple(encoder.dense_names))  # type: ignore[attr-defined]


class FeatureEmbedding(nn.Module):
    """A batch's ids [B, Fs] + dense [B, Fd] (NaN = missing) -> embeddings [B, Fs + Fd, dim].

    ``sparse=True`` makes the table's gradient sparse (only the rows in the batch), which keeps an
    optimizer step proportional to the batch instead of to the vocabulary.
    """

    def __init__(self, spec: FeatureSpec, dim: int, sparse: bool = False, init_std: float = 1e-2) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"embedding dim must be >= 1, got {dim}")
        if spec.n_fields == 0:
            raise ValueError("the feature spec has no fields: a model needs at least one categorical or numeric field")
        self.spec, self.dim = spec, dim
        self.table = nn.Embedding(max(spec.n_ids, 1), dim, sparse=sparse)
        nn.init.normal_(self.table.weight, std=init_std)
        self.dense_vec = nn.Parameter(torch.randn(spec.n_dense, dim) * init_std)
        self.dense_missing = nn.Parameter(torch.randn(spec.n_dense, dim) * init_std)

    def forward(self, batch: Batch) -> torch.Tensor:
        ids, dense = batch.ids, batch.dense
        parts = []
        if self.spec.n_sparse:
            parts.append(self.table(ids))
        if self.spec.n_dense:
            missing = torch.isnan(dense).unsqueeze(-1)
            x = torch.nan_to_num(dense, nan=0.0).unsqueeze(-1)
            parts.append(torch.where(missing, self.dense_missing, x * self.dense_vec))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class FeatureLinear(nn.Module):
    """The first-order term: a 1-wide embedding per id, a weight per numeric field, and a bias -> [B]."""

    def __init__(self, spec: FeatureSpec, sparse: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.table = nn.Embedding(max(spec.n_ids, 1), 1, sparse=sparse)
        nn.init.zeros_(self.table.weight)
        self.dense_w = nn.Parameter(torch.zeros(spec.n_dense))
        self.dense_missing = nn.Parameter(torch.zeros(spec.n_dense))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, batch: Batch) -> torch.Tensor:
        ids, dense = batch.ids, batch.dense
        out = self.bias.expand(ids.shape[0] if ids.dim() == 2 else dense.shape[0])
        if self.spec.n_sparse:
            out = out + self.table(ids).squeeze(-1).sum(dim=1)
        if self.spec.n_dense:
            missing = torch.isnan(dense)
            x = torch.nan_to_num(dense, nan=0.0)
            out = out + torch.where(missing, self.dense_missing, x * self.dense_w).sum(dim=1)
        return out
