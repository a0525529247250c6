"""One embedding table for every sparse field (ids already offset into a global space) plus numeric fields.

A numeric field j with value x gets the vector ``x * v_j`` (and a learned ``m_j`` when the value is missing),
so numeric fields take part in pairwise interactions and the MLP exactly like categorical ones. A multi or
sequence field is pooled (masked mean or sum of its items' vectors) into one field vector, so every model uses
it; models that attend over a sequence (DIN) also get the unpooled vectors and their mask.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ctrkit.data.dataset import Batch

_TABLES_ON: ContextVar[str | None] = ContextVar("tables_on", default=None)


@contextmanager
def tables_on(device: str) -> Iterator[None]:
    """Build the embedding tables of the models made inside on ``device``; "meta" allocates nothing, for tables
    that a sharding backend (:mod:`ctrkit.training.sharded`) allocates and initialises shard by shard."""
    token = _TABLES_ON.set(device)
    try:
        yield
    finally:
        _TABLES_ON.reset(token)


@dataclass(frozen=True)
class FeatureSpec:
    """What a model needs to know about its inputs: the id space, the field layout and the label heads.

    ``seq_*`` describe the blocks of ``Batch.seq`` (multi and sequence fields): kind, pooling and the
    categorical field whose vocabulary a sequence shares (its candidate, for target attention), or "".
    ``label_names`` are the label columns, one output head each (empty: one head).
    """

    n_ids: int
    field_sizes: tuple[int, ...]
    sparse_names: tuple[str, ...]
    dense_names: tuple[str, ...]
    seq_names: tuple[str, ...] = ()
    seq_kinds: tuple[str, ...] = ()
    seq_pooling: tuple[str, ...] = ()
    seq_targets: tuple[str, ...] = ()
    seq_max: int = 0
    label_names: tuple[str, ...] = ()

    @property
    def n_sparse(self) -> int:
        """Number of id fields (columns of ``ids``)."""
        return len(self.sparse_names)

    @property
    def n_dense(self) -> int:
        """Number of numeric fields (columns of ``dense``)."""
        return len(self.dense_names)

    @property
    def n_seq(self) -> int:
        """Number of multi and sequence fields (blocks of ``seq``)."""
        return len(self.seq_names)

    @property
    def n_fields(self) -> int:
        """All fields, the unit of pairwise interactions: id fields, pooled list fields, numeric fields."""
        return self.n_sparse + self.n_seq + self.n_dense

    @property
    def n_labels(self) -> int:
        """Number of label heads (at least one)."""
        return max(len(self.label_names), 1)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (saved in a bundle)."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        """Inverse of :meth:`to_dict`; a spec saved before the list fields and heads existed loads too."""
        tuples = {k: tuple(d.get(k, ())) for k in ("field_sizes", "sparse_names", "dense_names", "seq_names",
                                                   "seq_kinds", "seq_pooling", "seq_targets", "label_names")}
        return cls(n_ids=int(d["n_ids"]), seq_max=int(d.get("seq_max", 0)), **tuples)

    @classmethod
    def from_encoder(cls, encoder: Any) -> FeatureSpec:
        """The spec of a fitted :class:`ctrkit.data.encode.Encoder`."""
        lists = encoder.schema.list_fields
        labels = encoder.schema.label_columns
        return cls(n_ids=encoder.n_ids, field_sizes=tuple(encoder.field_sizes()),
                   sparse_names=tuple(encoder.sparse_names), dense_names=tuple(encoder.dense_names),
                   seq_names=tuple(f.name for f in lists), seq_kinds=tuple(f.kind for f in lists),
                   seq_pooling=tuple(f.pooling for f in lists),
                   seq_targets=tuple(f.share_vocab or "" for f in lists), seq_max=encoder.seq_max,
                   label_names=tuple(labels) if len(labels) > 1 else ())


def sequence_mask(batch: Batch, length: int) -> torch.Tensor:
    """bool [B, Fq, L]: True at the positions of ``batch.seq`` that hold an id (before the row's length)."""
    assert batch.seq_len is not None
    return torch.arange(length, device=batch.seq_len.device) < batch.seq_len.unsqueeze(-1)


def pool(values: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Masked pooling of values [B, Fq, L, ...] over L: the sum, divided by the count where ``mean`` [Fq]."""
    m = mask.to(values.dtype)
    m = m.view(*m.shape, *([1] * (values.dim() - m.dim())))
    total = (values * m).sum(dim=2)
    count = m.sum(dim=2).clamp_min(1.0)
    scale = torch.where(mean.view(1, -1, *([1] * (total.dim() - 2))), 1.0 / count, torch.ones_like(count))
    return total * scale


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
        self.spec, self.dim, self.init_std = spec, dim, init_std
        self.table = nn.Embedding(max(spec.n_ids, 1), dim, sparse=sparse, device=_TABLES_ON.get())
        nn.init.normal_(self.table.weight, std=init_std)
        self.dense_vec = nn.Parameter(torch.randn(spec.n_dense, dim) * init_std)
        self.dense_missing = nn.Parameter(torch.randn(spec.n_dense, dim) * init_std)
        self.register_buffer("_mean", torch.tensor([p == "mean" for p in spec.seq_pooling], dtype=torch.bool),
                             persistent=False)

    def sequences(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The unpooled item vectors [B, Fq, L, dim] of the multi / sequence fields and their mask [B, Fq, L]."""
        if batch.seq is None or batch.seq_len is None:
            raise ValueError(f"the model was built for the list fields {list(self.spec.seq_names)}, but the batch "
                             "carries no seq / seq_len")
        return self.table(batch.seq), sequence_mask(batch, batch.seq.shape[-1])

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.fields(batch)

    def fields(self, batch: Batch, pooled: torch.Tensor | None = None,
               rows: torch.Tensor | None = None, numeric: bool = True) -> torch.Tensor:
        """Field vectors [B, F, dim]; ``pooled`` [B, Fq, dim] replaces the default pooling of the list fields;
        ``rows`` is ``self.table(batch.ids)`` when the caller has already looked it up (one lookup, one gradient);
        ``numeric=False`` leaves the numeric fields out ([B, Fs + Fq, dim]), for a model that reads them through
        :meth:`numeric_sums` and :meth:`project`."""
        parts = []
        if self.spec.n_sparse:
            parts.append(self.table(batch.ids) if rows is None else rows)
        if self.spec.n_seq:
            if pooled is None:
                pooled = pool(*self.sequences(batch), self._mean)
            parts.append(pooled)
        if self.spec.n_dense and numeric:
            parts.append(self.numeric_vectors(batch))
        if not parts:
            return self.dense_vec.new_zeros(batch.dense.shape[0], 0, self.dim)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def numeric_vectors(self, batch: Batch) -> torch.Tensor:
        """The numeric fields' vectors [B, Fd, dim]: x v_j, or the missing vector m_j where x is missing."""
        missing = torch.isnan(batch.dense).unsqueeze(-1)
        x = torch.nan_to_num(batch.dense, nan=0.0).unsqueeze(-1)
        return torch.where(missing, self.dense_missing, x * self.dense_vec)

    def numeric_sums(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the numeric fields' vectors [B, dim], sum of their squared norms [B]) in the weights' precision
        (at least float32), without the [B, Fd, dim] vectors: x v_j sums to x @ V (plus the missing vectors m_j
        where x is missing), and ||x v_j||^2 is x^2 ||v_j||^2.

        Both are views of one matrix product, [x, missing, x^2] @ [[V, 0], [M, |m|^2], [0, |v|^2]], its sides
        padded to multiples of four values (16 bytes, the alignment a GPU's matrix kernels want). As four products
        of Fd-column operands, a 65,536-row DeepFM step on an H200 ran two unaligned fp32 kernels (``align1``,
        36 + 20 us) that the step of xDeepFM, which has no numeric sums, does not.
        """
        dtype = torch.promote_types(self.dense_vec.dtype, torch.float32)
        fd, dim = self.dense_vec.shape
        k_pad, n_pad = -(3 * fd) % 4, -(dim + 1) % 4
        with torch.autocast(batch.dense.device.type, enabled=False):
            missing = torch.isnan(batch.dense).to(dtype)
            x = torch.nan_to_num(batch.dense.to(dtype), nan=0.0)
            vec, miss = self.dense_vec.to(dtype), self.dense_missing.to(dtype)
            inputs = F.pad(torch.cat([x, missing, x * x], dim=1), (0, k_pad))
            weight = torch.cat([F.pad(vec, (0, 1)), torch.cat([miss, miss.pow(2).sum(1, keepdim=True)], dim=1),
                                F.pad(vec.pow(2).sum(1, keepdim=True), (dim, 0))])
            out = inputs @ F.pad(weight, (0, n_pad, 0, k_pad))
        return out[:, :dim], out[:, dim]

    def project_inputs(self, emb: torch.Tensor, batch: Batch, weight: torch.Tensor,
                       numeric: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(fields [B, K1], weight [out, K1 + K2], rest [B, K2] or None): the product of [fields, rest] and
        ``weight`` equals ``emb.flatten(1)`` times a first layer's ``weight`` [out, F * dim], for the field vectors
        ``emb`` that :meth:`fields` gave for ``batch`` (``numeric=False``: given without the numeric fields), with
        each numeric field's ``dim`` columns folded into two. ``fields`` are the categorical and list fields'
        vectors, ``rest`` the folded numeric inputs, which are data: they need no input gradient.

        A numeric field's vector is x * v (or the missing vector m), so its block of the layer is W_f (x v) =
        x (W_f v): the layer reads [x, missing] against [W_f v, W_f m] instead of dim columns. The result is the
        same up to rounding; on 26 categorical and 13 numeric fields of dim 16 the layer's matrix products read
        448 columns instead of 624, in the forward and the backward pass. The folded columns sit beside the
        field vectors' in one product (padded with zeros to a multiple of 8, which a GPU's matrix units want),
        so the layer's bias and ReLU can be applied in that product.
        """
        fd, dim = self.spec.n_dense, self.dim
        if fd == 0 or (dim <= 2 and numeric):
            return emb.flatten(1), weight, None
        k = (emb.shape[1] - (fd if numeric else 0)) * dim
        blocks = weight[:, k:].reshape(weight.shape[0], fd, dim)
        pad = -(k + 2 * fd) % 8
        folded = torch.cat([weight[:, :k], torch.einsum("ofd,fd->of", blocks, self.dense_vec),
                            torch.einsum("ofd,fd->of", blocks, self.dense_missing),
                            weight.new_zeros(weight.shape[0], pad)], dim=1)
        dense = batch.dense.to(emb.dtype)
        rest = torch.cat([torch.nan_to_num(dense, nan=0.0), torch.isnan(dense).to(emb.dtype),
                          emb.new_zeros(emb.shape[0], pad)], dim=1)
        return (emb[:, :-fd] if numeric else emb).flatten(1), folded, rest

    def project(self, emb: torch.Tensor, batch: Batch, layer: nn.Linear, numeric: bool = True) -> torch.Tensor:
        """``layer(emb.flatten(1))`` through :meth:`project_inputs`."""
        fields, weight, rest = self.project_inputs(emb, batch, layer.weight, numeric=numeric)
        return F.linear(fields if rest is None else torch.cat([fields, rest], dim=1), weight, layer.bias)


class FeatureLinear(nn.Module):
    """The first-order term: a 1-wide embedding per id, a weight per numeric field, and a bias -> [B]."""

    def __init__(self, spec: FeatureSpec, sparse: bool = False) -> None:
        super().__init__()
        self.spec, self.init_std = spec, 0.0  # the first-order weights start at zero
        self.table = nn.Embedding(max(spec.n_ids, 1), 1, sparse=sparse, device=_TABLES_ON.get())
        nn.init.zeros_(self.table.weight)
        self.dense_w = nn.Parameter(torch.zeros(spec.n_dense))
        self.dense_missing = nn.Parameter(torch.zeros(spec.n_dense))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, batch: Batch) -> torch.Tensor:
        ids, dense = batch.ids, batch.dense
        out = self.bias.expand(ids.shape[0] if ids.dim() == 2 else dense.shape[0])
        if self.spec.n_sparse:
            out = out + self.table(ids).squeeze(-1).sum(dim=1)
        if self.spec.n_seq:
            assert batch.seq is not None
            mean = torch.tensor([p == "mean" for p in self.spec.seq_pooling], device=out.device)
            out = out + pool(self.table(batch.seq).squeeze(-1), sequence_mask(batch, batch.seq.shape[-1]),
                             mean).sum(dim=1)
        if self.spec.n_dense:
            missing = torch.isnan(dense)
            x = torch.nan_to_num(dense, nan=0.0)
            out = out + torch.where(missing, self.dense_missing, x * self.dense_w).sum(dim=1)
        return out
