"""Feature-interaction layers as batched tensor ops (no loop over samples or field pairs)."""

from __future__ import annotations

import torch
from torch import nn


class FactorizationMachine(nn.Module):
    """Pairwise term of an FM: sum_{i<j} <e_i, e_j> = ((sum_i e_i)^2 - sum_i e_i^2) / 2, summed over dims.

    Input [B, F, D]; output [B] (or [B, D] with ``reduce_sum=False``).
    """

    def __init__(self, reduce_sum: bool = True) -> None:
        super().__init__()
        self.reduce_sum = reduce_sum

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        square_of_sum = emb.sum(dim=1).pow(2)
        sum_of_square = emb.pow(2).sum(dim=1)
        out = 0.5 * (square_of_sum - sum_of_square)
        return out.sum(dim=1) if self.reduce_sum else out
