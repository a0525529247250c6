"""Feature-interaction layers as batched tensor ops (no loop over samples or field pairs)."""

from __future__ import annotations

import torch
from torch import nn

from ctrkit.nn import cin_gpu, fm_gpu
from ctrkit.nn.mlp import exporting, linear


class _PairwiseAndSquares(torch.autograd.Function):
    """Per sample of emb [B, F, D] and the fields given by their sums only (``extra`` [B, D] and ``extra_sq``
    [B]): sum_{i<j} <e_i, e_j> over all fields and sum_i ||e_i||^2, with a one-pass backward.

    Autograd through ``((sum e)^2 - sum e^2) / 2`` plus a separate squared norm for an L2 penalty walks the
    [B, F, D] tensor about ten times; here the forward reads it twice and the backward writes it once:
    d pair / d e_i = s - e_i and d sq / d e_i = 2 e_i, with s the sum of every field's vector.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, emb: torch.Tensor, extra: torch.Tensor | None,
                extra_sq: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(emb.device.type, enabled=False):  # sums of squares stay in full precision
            s = emb.sum(dim=1)
            flat = emb.reshape(emb.shape[0], -1)
            sq = torch.linalg.vecdot(flat, flat)
            if extra is not None and extra_sq is not None:
                s, sq = s + extra.to(s.dtype), sq + extra_sq.to(sq.dtype)
            pair = 0.5 * (torch.linalg.vecdot(s, s) - sq)
        ctx.save_for_backward(emb, s)
        ctx.extra = extra is not None
        return pair, sq

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g_pair: torch.Tensor | None,
                 g_sq: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        emb, s = ctx.saved_tensors  # type: ignore[attr-defined]
        zero = torch.zeros(emb.shape[0], dtype=emb.dtype, device=emb.device)
        g_pair = zero if g_pair is None else g_pair
        g_sq = zero if g_sq is None else g_sq
        g_s = g_pair.unsqueeze(1) * s
        g_emb = torch.addcmul(g_s.unsqueeze(1), emb, (2 * g_sq - g_pair).view(-1, 1, 1))
        if not ctx.extra:  # type: ignore[attr-defined]
            return g_emb, None, None
        return g_emb, g_s, g_sq - 0.5 * g_pair


def pairwise_and_squares(emb: torch.Tensor, extra: tuple[torch.Tensor, torch.Tensor] | None = None,
                         copy: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(FM pairwise term [B], squared norm of each sample's embeddings [B], the vectors) of emb [B, F, D], plus
    the fields given by ``extra`` = (their vectors' sum [B, D], their squared norms' sum [B]) only.

    The second output is what a per-sample L2 penalty on the looked-up rows needs, so a model with an FM
    term gets its penalty without another pass over the embeddings. The third is ``emb``, or with ``copy`` on a
    GPU, ``emb`` in the dtype that autocast gives an MLP over it, written by the same pass
    (:mod:`~ctrkit.nn.fm_gpu`): a DeepFM's MLP reads that copy.
    """
    total, squares = extra if extra is not None else (None, None)
    if emb.is_cuda and fm_gpu.AVAILABLE and not exporting():
        kind = emb.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else emb.dtype
        pair, sq, _, vectors = fm_gpu.fm_terms(emb.contiguous(), total, squares, dtype if copy else None)
        return pair, sq, vectors if copy else emb
    pair, sq = _PairwiseAndSquares.apply(emb, total, squares)
    return pair, sq, emb


class FactorizationMachine(nn.Module):
    """Pairwise term of an FM: sum_{i<j} <e_i, e_j> = ((sum_i e_i)^2 - sum_i e_i^2) / 2, summed over dims.

    Input [B, F, D]; output [B].
    """

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return pairwise_and_squares(emb)[0]


def field_pairs(n_fields: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the n(n-1)/2 field pairs i < j in row-major order: the one index every pair layer gathers by."""
    rows, cols = torch.triu_indices(n_fields, n_fields, offset=1, device=device)
    return rows, cols


class _Pairs(nn.Module):
    """Holds the pair indices of ``n_fields`` fields as buffers (they follow the module to its device)."""

    def __init__(self, n_fields: int) -> None:
        super().__init__()
        if n_fields < 1:
            raise ValueError(f"a pair layer needs at least one field, got {n_fields}")
        self.n_fields = n_fields
        rows, cols = field_pairs(n_fields)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    @property
    def n_pairs(self) -> int:
        """Number of field pairs i < j."""
        return self.n_fields * (self.n_fields - 1) // 2


class FieldAwareInteraction(_Pairs):
    """FFM (Juan et al., 2016): sum_{i<j} <v_{i, f_j}, v_{j, f_i}>, from field-aware embeddings [B, F, F, D].

    ``emb[b, i, j]`` is the vector field i's value keeps for meeting field j (one lookup of an F*D wide table,
    reshaped); both sides of every pair come from one gather each. Output [B].
    """

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        left = emb[:, self.rows, self.cols]
        right = emb[:, self.cols, self.rows]
        return (left * right).sum(dim=(1, 2))


class CIN(nn.Module):
    """Compressed interaction network of xDeepFM (Lian et al., 2018) over field vectors x0 [B, m, D].

    Layer k: X^k_h = sum_{i, j} W^{k,h}_{ij} (X^{k-1}_i * X^0_j), a 1x1 convolution over the H_{k-1} * m outer
    products. With ``split_half`` every layer but the last sends half its maps on and half to the output.
    The output [B, sum of output maps] is each output map summed over the embedding axis.
    """

    def __init__(self, n_fields: int, layer_sizes: tuple[int, ...], split_half: bool = True) -> None:
        super().__init__()
        if not layer_sizes or any(h < 1 for h in layer_sizes):
            raise ValueError(f"CIN layer sizes must be >= 1, got {layer_sizes}")
        if split_half and any(h % 2 for h in layer_sizes[:-1]):
            raise ValueError(f"split_half needs even sizes for every layer but the last, got {layer_sizes}")
        self.split_half = split_half
        self.convs = nn.ModuleList()
        prev, out = n_fields, 0
        for k, h in enumerate(layer_sizes):
            self.convs.append(nn.Conv1d(prev * n_fields, h, kernel_size=1, bias=False))
            last = k == len(layer_sizes) - 1
            prev = h // 2 if split_half and not last else h
            out += h // 2 if split_half and not last else h
        self.out_features = out

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        if x0.is_cuda and cin_gpu.AVAILABLE and not exporting():  # the same layers without the outer product in memory
            return cin_gpu.cin(x0, [conv.weight for conv in self.convs], self.split_half)
        b, m, d = x0.shape
        x, pooled = x0, []
        for k, conv in enumerate(self.convs):
            h = conv((x.unsqueeze(2) * x0.unsqueeze(1)).reshape(b, -1, d))
            if self.split_half and k < len(self.convs) - 1:
                x, direct = h.split(h.shape[1] // 2, dim=1)
            else:
                x = direct = h
            pooled.append(direct.sum(dim=2))
        return torch.cat(pooled, dim=1)


class CrossNet(nn.Module):
    """DCN's cross network (Wang et al., 2017): x_{l+1} = x_0 (w_l^T x_l) + b_l + x_l on flat vectors [B, d]."""

    def __init__(self, dim: int, n_layers: int) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"a cross network needs at least one layer, got {n_layers}")
        self.weight = nn.Parameter(torch.empty(n_layers, dim))
        self.bias = nn.Parameter(torch.zeros(n_layers, dim))
        nn.init.xavier_normal_(self.weight)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for w, b in zip(self.weight, self.bias):
            x = x0 * (x @ w).unsqueeze(-1) + b + x
        return x


class CrossNetV2(nn.Module):
    """DCN-V2's cross network (Wang et al., 2021): x_{l+1} = x_0 * (W_l x_l + b_l) + x_l, full-rank W_l [d, d]."""

    def __init__(self, dim: int, n_layers: int) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"a cross network needs at least one layer, got {n_layers}")
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * linear(x, layer) + x
        return x


class CrossNetMix(nn.Module):
    """DCN-V2's low-rank mixture of experts: x_{l+1} = sum_e G_e(x_l) x_0 * (U_e g(C_e g(V_e^T x_l)) + b_l) + x_l.

    E experts of rank r per layer, g = tanh, gates G = softmax over experts of a linear map of x_l. All
    experts of a layer are one batched product.
    """

    def __init__(self, dim: int, n_layers: int, rank: int = 32, experts: int = 4) -> None:
        super().__init__()
        if n_layers < 1 or rank < 1 or experts < 1:
            raise ValueError(f"layers, rank and experts must be >= 1, got {n_layers}, {rank}, {experts}")
        self.u = nn.Parameter(torch.empty(n_layers, experts, dim, rank))
        self.v = nn.Parameter(torch.empty(n_layers, experts, dim, rank))
        self.c = nn.Parameter(torch.empty(n_layers, experts, rank, rank))
        for p in (self.u, self.v, self.c):
            nn.init.xavier_normal_(p)
        self.bias = nn.Parameter(torch.zeros(n_layers, dim))
        self.gates = nn.ModuleList(nn.Linear(dim, experts, bias=False) for _ in range(n_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for l, gate in enumerate(self.gates):
            h = torch.tanh(torch.einsum("bd,edr->ber", x, self.v[l]))
            h = torch.tanh(torch.einsum("ber,ers->bes", h, self.c[l]))
            experts = x0.unsqueeze(1) * (torch.einsum("bes,eds->bed", h, self.u[l]) + self.bias[l])
            x = torch.einsum("be,bed->bd", torch.softmax(gate(x), dim=-1), experts) + x
        return x


BILINEAR_KINDS = ("field_all", "field_each", "field_interaction")


class BilinearInteraction(_Pairs):
    """FiBiNET's bilinear interaction (Huang et al., 2019): p_ij = (v_i W) * v_j for every pair i < j -> [B, P, D].

    ``kind`` picks W: one shared matrix ("field_all"), one per field i ("field_each") or one per pair
    ("field_interaction"). Every pair goes through one batched product.
    """

    def __init__(self, n_fields: int, dim: int, kind: str = "field_interaction") -> None:
        super().__init__(n_fields)
        if kind not in BILINEAR_KINDS:
            raise ValueError(f"bilinear kind must be one of {BILINEAR_KINDS}, got {kind!r}")
        self.kind = kind
        lead = {"field_all": (), "field_each": (n_fields,), "field_interaction": (self.n_pairs,)}[kind]
        self.weight = nn.Parameter(torch.randn(*lead, dim, dim) / dim**0.5)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        right = emb[:, self.cols]
        if self.kind == "field_all":
            left = emb[:, self.rows] @ self.weight
        elif self.kind == "field_each":
            left = torch.einsum("bfd,fde->bfe", emb, self.weight)[:, self.rows]
        else:
            left = torch.einsum("bpd,pde->bpe", emb[:, self.rows], self.weight)
        return left * right


class SENet(nn.Module):
    """Squeeze-and-excitation over fields (FiBiNET): a = relu(W2 relu(W1 z)), z_f = mean of e_f; returns a_f e_f.

    ``reduction`` sets the bottleneck width max(1, F // reduction).
    """

    def __init__(self, n_fields: int, reduction: int = 3) -> None:
        super().__init__()
        if reduction < 1:
            raise ValueError(f"SENet reduction must be >= 1, got {reduction}")
        hidden = max(1, n_fields // reduction)
        self.excite = nn.Sequential(nn.Linear(n_fields, hidden, bias=False), nn.ReLU(),
                                    nn.Linear(hidden, n_fields, bias=False), nn.ReLU())

    def gates(self, emb: torch.Tensor) -> torch.Tensor:
        """The per-field weights a [B, F] of emb [B, F, D]."""
        return self.excite(emb.mean(dim=2))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return emb * self.gates(emb).unsqueeze(-1)


class DotInteraction(_Pairs):
    """DLRM's interaction (Naumov et al., 2019): <x_i, x_j> of every pair i < j of vectors [B, F, D] -> [B, P]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x, x.transpose(1, 2))[:, self.rows, self.cols]
