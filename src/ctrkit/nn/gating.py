"""Gates and fusions of FinalMLP (Mao et al., 2023) and FinalNet (Zhu et al., 2023)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ctrkit.nn.mlp import MLP, linear


class FeatureGate(nn.Module):
    """FinalMLP's stream-specific feature selection: x * 2 sigmoid(MLP(c)), c a context vector [B, C].

    With no context fields the context is a learned vector, so the gate is a learned per-feature scale
    (what the reference implementation does with an empty context list).
    """

    def __init__(self, ctx_dim: int, out_dim: int, hidden: Sequence[int] = (), dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = MLP(ctx_dim, hidden, out_dim, dropout)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return x * (2.0 * torch.sigmoid(self.mlp(ctx)))


class BilinearFusion(nn.Module):
    """FinalMLP's stream fusion: b + w_x^T x + w_y^T y + sum_h x_h^T W_h y_h over ``heads`` chunks -> [B]."""

    def __init__(self, dim_x: int, dim_y: int, heads: int = 1) -> None:
        super().__init__()
        if heads < 1 or dim_x % heads or dim_y % heads:
            raise ValueError(f"both stream widths ({dim_x}, {dim_y}) must divide into {heads} heads")
        self.heads = heads
        self.wx, self.wy = nn.Linear(dim_x, 1), nn.Linear(dim_y, 1, bias=False)
        self.w = nn.Parameter(torch.empty(heads, dim_x // heads, dim_y // heads))
        nn.init.xavier_normal_(self.w)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xh, yh = x.view(len(x), self.heads, -1), y.view(len(y), self.heads, -1)
        return (self.wx(x) + self.wy(y)).squeeze(-1) + torch.einsum("bhi,hij,bhj->b", xh, self.w, yh)


class FieldGate(nn.Module):
    """FinalNet's field gating: gates g = W e + b mixed across fields (W [F, F] starts at 0, b at 1);
    returns [e, g * e] stacked on the field axis -> [B, 2F, D]."""

    def __init__(self, n_fields: int) -> None:
        super().__init__()
        self.mix = nn.Linear(n_fields, n_fields)
        nn.init.zeros_(self.mix.weight)
        nn.init.ones_(self.mix.bias)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        gates = self.mix(emb.transpose(1, 2)).transpose(1, 2)
        return torch.cat([emb, emb * gates], dim=1)


class FactorizedInteraction(nn.Module):
    """FinalNet's replacement of a linear layer: [h2, h1] = W x + b, out = h2 + h1 * h2 (second-order terms).

    FinalNet's block is ``MLP(..., layer=FactorizedInteraction)``: this map, batch norm, ReLU, dropout per layer.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, 2 * out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h2, h1 = linear(x, self.linear).chunk(2, dim=-1)
        return h2 + h1 * h2
