"""Layers over sequence fields: DIN's target attention (Zhou et al., 2018) and a batched mixture of experts."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class TargetAttention(nn.Module):
    """DIN's activation unit: a behaviour h_j gets the weight a(h_j, t) = MLP([h_j, t, h_j - t, h_j * t]) and the
    user vector is sum_j a(h_j, t) h_j over the unmasked positions (no softmax, as in the paper, so the sum keeps
    the intensity of interest).

    Input: keys [B, L, D], target [B, D], mask [B, L] (True = an item); output [B, D]. All positions go
    through the MLP at once; the MLP uses PReLU, as the paper's public code does (Dice is its variant).
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (80, 40)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = 4 * dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.PReLU(h)]
            d = h
        layers.append(nn.Linear(d, 1))
        self.mlp = nn.Sequential(*layers)

    def weights(self, keys: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The attention weights [B, L], zero at masked positions.

        The first layer's product with [h, t, h - t, h * t] is split by its four blocks of columns, so the
        target's part is computed once per row instead of once per position and no [B, L, 4D] input is built.
        """
        first = self.mlp[0]
        wh, wt, wd, wp = first.weight.split(keys.shape[-1], dim=1)
        x = keys @ (wh + wd).T + (keys * target.unsqueeze(1)) @ wp.T + (target @ (wt - wd).T + first.bias).unsqueeze(1)
        score = self.mlp[1:](x.reshape(-1, x.shape[-1])).view(keys.shape[:-1])  # PReLU's channels are dim 1
        return score * mask.to(score.dtype)

    def forward(self, keys: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bl,bld->bd", self.weights(keys, target, mask), keys)


class Experts(nn.Module):
    """``n`` MLPs (Linear -> ReLU per layer) on one input, as one batched matmul per layer: [B, in] -> [B, n, out]."""

    def __init__(self, n: int, in_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        if n < 1 or not hidden:
            raise ValueError(f"experts need n >= 1 and at least one hidden size, got {n} and {list(hidden)}")
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        d = in_dim
        for h in hidden:
            w = torch.empty(n, d, h)
            for e in range(n):  # the init of nn.Linear, expert by expert
                nn.init.kaiming_uniform_(w[e].T, a=5 ** 0.5)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.empty(n, h).uniform_(-d ** -0.5, d ** -0.5)))
            d = h
        self.out_features = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(torch.einsum("bi,nih->bnh", x, self.weights[0]) + self.biases[0])
        for w, b in zip(list(self.weights)[1:], list(self.biases)[1:]):
            h = torch.relu(torch.einsum("bni,nih->bnh", h, w) + b)
        return h
