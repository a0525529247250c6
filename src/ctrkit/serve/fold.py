"""A serving form of the embedding-sum models in which one table lookup replaces the first layer.

The first layer of an MLP over concatenated field embeddings is a sum over fields: ``concat(e_f) @ W =
sum_f e_f @ W_f``. For an id field, ``e_f`` is a row of the embedding table, so ``E[id] @ W_f`` can be computed
once per id when the bundle loads; for a numeric field, ``e_f`` is ``x * v_f`` (or ``m_f`` when the value is
missing), so its term is ``x * (v_f @ W_f)``. The first layer's matrix product (624 x 400 multiply-adds per
candidate for DeepFM on Criteo's 39 fields) becomes a sum of 26 precomputed rows and a 13-column product.
Evaluation-mode batch norm is an affine map and folds into the same table. The first-order weights and
the FM term fold in beside it: the FM pairwise term is ``(|sum_f e_f|^2 - sum_f |e_f|^2) / 2``, and both sums
are sums over fields of per-id quantities (the row itself and its squared norm). So the whole model up to its
second hidden layer is one ``embedding_bag`` over a table of width ``hidden + 1 + dim + 1``.

The answer is the model's own up to float rounding; the scorer checks it against the model before it may
serve. The price is memory: ``n_ids x width`` floats, so :func:`fold` declines beyond ``max_bytes``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ctrkit.models.base import CTRModel
from ctrkit.nn.mlp import Dropout

MAX_BYTES = 1 << 30
FOLDABLE = ("lr", "fm", "deepfm", "dnn", "wide_deep")


class FoldError(ValueError):
    """The model cannot be folded (its kind, its inputs, or the table's size); the message says which."""


def _bn_affine(layers: list[nn.Module], i: int, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(weight [out, in], bias [out]) of ``linear`` with an evaluation-mode BatchNorm1d at ``layers[i]`` folded
    in, and the index of the layer after them."""
    w = linear.weight.detach().double()
    b = linear.bias.detach().double() if linear.bias is not None else w.new_zeros(w.shape[0])
    if i < len(layers) and isinstance(layers[i], nn.BatchNorm1d):
        bn = layers[i]
        assert bn.running_mean is not None and bn.running_var is not None
        scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        w = w * scale[:, None]
        b = (b - bn.running_mean.double()) * scale + bn.bias.detach().double()
        i += 1
    return w, b, i


class FoldedModel(nn.Module):
    """logits [B] of pre-encoded ids [B, Fs] and dense [B, Fd], computed as :mod:`ctrkit.serve.fold` explains."""

    def __init__(self, table: torch.Tensor, dense: torch.Tensor, bias: torch.Tensor, hidden: int,
                 linear: bool, fm_dim: int, rest: list[nn.Module]) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.register_buffer("dense", dense.float().contiguous())  # [3 * Fd, width]: x, missing, x^2 rows
        self.register_buffer("bias", bias.float())
        self.hidden, self.linear, self.fm_dim = hidden, linear, fm_dim
        self.rest = nn.Sequential(*rest)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        if ids.shape[1]:
            s = F.embedding_bag(ids, self.table, mode="sum") + self.bias
        else:
            s = self.bias.repeat(len(ids), 1)
        if dense.shape[1]:
            miss = torch.isnan(dense)
            x = torch.where(miss, 0.0, dense)
            s = torch.addmm(s, torch.cat([x, miss.to(x.dtype), x * x], dim=1), self.dense)
        h = self.hidden
        logit = self.rest(s[:, :h]).squeeze(-1) if h else s.new_zeros(len(s))
        if self.linear:
            logit = logit + s[:, h]
        if self.fm_dim:
            at = h + int(self.linear)
            total = s[:, at:at + self.fm_dim]
            logit = logit + 0.5 * (torch.linalg.vecdot(total, total) - s[:, at + self.fm_dim])
        return logit


def fold(model: CTRModel, offsets: Sequence[int] | None = None, max_bytes: int = MAX_BYTES) -> FoldedModel:
    """The folded serving form of an evaluation-mode ``lr``, ``fm``, ``deepfm``, ``dnn`` or ``wide_deep``
    model with one output and no list fields; a :class:`FoldError` says why another cannot be folded.

    ``offsets`` gives the first id of each id field (``Encoder.offsets`` in ``sparse_names`` order); without
    it the fields lie one after another in the order of ``spec.field_sizes``.
    """
    spec, cfg = model.spec, model.config
    starts = list(offsets) if offsets is not None else [0, *itertools.accumulate(spec.field_sizes)][:-1]
    if model.name not in FOLDABLE:
        raise FoldError(f"{model.name} is not an embedding-sum model (folded: {', '.join(FOLDABLE)})")
    if spec.n_seq or spec.n_labels > 1:
        raise FoldError("the folded form takes id and numeric fields and one head, "
                        "not list fields or several labels")
    if model.training:
        raise FoldError("fold a model in evaluation mode (batch norm must use its running statistics)")
    mlp = getattr(model, "mlp", None)
    if model.name == "deepfm" and not getattr(cfg, "deep", True):
        mlp = None
    lin = getattr(model, "linear", None) or getattr(model, "wide", None)  # the first-order term, if any
    has_linear = lin is not None
    fm_dim = int(cfg.embed_dim) if model.name in ("fm", "deepfm") and getattr(cfg, "fm", True) else 0
    layers = list(mlp) if mlp is not None else []
    if layers:
        first = layers[0]
        if not isinstance(first, nn.Linear) or first.in_features != spec.n_fields * cfg.embed_dim:
            raise FoldError("the MLP's first layer is not a linear map of the concatenated field embeddings")
        w1, b1, nxt = _bn_affine(layers, 1, first)
    else:
        w1, b1, nxt = torch.zeros(0, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), 0
    hidden = w1.shape[0]
    width = hidden + int(has_linear) + (fm_dim + 1 if fm_dim else 0)
    n_ids = max(spec.n_ids, 1)
    if n_ids * width * 4 > max_bytes:
        raise FoldError(f"the folded table would take {n_ids * width * 4 / 2**30:.2f} GiB "
                        f"({n_ids:,} ids x {width} columns), over the {max_bytes / 2**30:.2f} GiB allowed")
    rest = _rest(layers[nxt:]) if layers else []
    table = torch.zeros(n_ids, width)  # float32, filled a field at a time from float64 products
    dense = torch.zeros(3, spec.n_dense, width, dtype=torch.float64)
    bias = torch.zeros(width, dtype=torch.float64)
    bias[:hidden] = b1
    dim = int(cfg.embed_dim)
    emb = getattr(model, "embedding", None)
    e = emb.table.weight.detach() if emb is not None else None
    for j, (lo, size) in enumerate(zip(starts, spec.field_sizes) if hidden else ()):
        assert e is not None
        w = w1[:, j * dim:(j + 1) * dim].T
        for at in range(lo, lo + size, 1 << 16):  # float64 products, a block of rows at a time
            hi = min(at + (1 << 16), lo + size)
            table[at:hi, :hidden] = e[at:hi].double() @ w
    col = hidden
    if has_linear:
        assert lin is not None
        table[:, col] = lin.table.weight.detach()[:, 0]
        bias[col] = float(lin.bias.detach())
        dense[0, :, col] = lin.dense_w.detach().double()
        dense[1, :, col] = lin.dense_missing.detach().double()
        col += 1
    if fm_dim:
        assert e is not None and emb is not None
        table[:, col:col + dim] = emb.table.weight.detach()
        for lo in range(0, n_ids, 1 << 16):
            rows = e[lo:lo + (1 << 16)].double()
            table[lo:lo + len(rows), col + dim] = (rows * rows).sum(1)
        v, m = emb.dense_vec.detach().double(), emb.dense_missing.detach().double()
        dense[0, :, col:col + dim] = v
        dense[1, :, col:col + dim] = m
        dense[1, :, col + dim] = (m * m).sum(1)
        dense[2, :, col + dim] = (v * v).sum(1)
    if hidden and spec.n_dense:
        assert emb is not None
        wd = w1[:, spec.n_sparse * dim:].reshape(hidden, spec.n_dense, dim)
        dense[0, :, :hidden] = torch.einsum("hfd,fd->fh", wd, emb.dense_vec.detach().double())
        dense[1, :, :hidden] = torch.einsum("hfd,fd->fh", wd, emb.dense_missing.detach().double())
    return FoldedModel(table, dense.reshape(3 * spec.n_dense, width), bias, hidden, has_linear, fm_dim, rest)


def _rest(layers: list[nn.Module]) -> list[nn.Module]:
    """The MLP after its first linear layer (and batch norm), in evaluation form: batch norms folded into the
    linear layers before them, dropout gone."""
    out: list[nn.Module] = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, nn.Linear):
            w, b, i = _bn_affine(layers, i + 1, layer)
            folded = nn.Linear(w.shape[1], w.shape[0])
            folded.weight.data, folded.bias.data = w.float(), b.float()
            out.append(folded)
            continue
        if isinstance(layer, nn.ReLU):
            out.append(layer)
        elif not isinstance(layer, (nn.Dropout, Dropout)):
            raise FoldError(f"the MLP has a {type(layer).__name__} layer, which the folded form does not know")
        i += 1
    return out
