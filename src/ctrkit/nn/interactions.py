"""Feature-interaction layers as batched tensor ops (no loop over samples or field pairs)."""

from __future__ import annotations

import torch
from torch import nn


class _PairwiseAndSquares(torch.autograd.Function):
    """Per sample of emb [B, F, D]: sum_{i<j} <e_i, e_j> and sum_i ||e_i||^2, with a one-pass backward.

    Autograd through ``((sum e)^2 - sum e^2) / 2`` plus a separate squared norm for an L2 penalty walks the
    [B, F, D] tensor about ten times; here the forward reads it twice and the backward writes it once:
    d pair / d e_i = s - e_i and d sq / d e_i = 2 e_i, with s = sum_j e_j.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(emb.device.type, enabled=False):  # sums of squares stay in full precision
            s = emb.sum(dim=1)
            flat = emb.reshape(emb.shape[0], -1)
            sq = torch.linalg.vecdot(flat, flat)
            pair = 0.5 * (torch.linalg.vecdot(s, s) - sq)
        ctx.save_for_backward(emb, s)
        return pair, sq

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g_pair: torch.Tensor | None,
                 g_sq: torch.Tensor | None) -> torch.Tensor:
        emb, s = ctx.saved_tensors  # type: ignore[attr-defined]
        zero = torch.zeros(emb.shape[0], dtype=emb.dtype, device=emb.device)
        g_pair = zero if g_pair is None else g_pair
        g_sq = zero if g_sq is None else g_sq
        return torch.addcmul((g_pair.unsqueeze(1) * s).unsqueeze(1), emb, (2 * g_sq - g_pair).view(-1, 1, 1))


def pairwise_and_squares(emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(FM pairwise term [B], squared norm of each sample's embeddings [B]) of emb [B, F, D].

    The second output is what a per-sample L2 penalty on the looked-up rows needs, so a model with an FM
    term gets its penalty without another pass over the embeddings.
    """
    return _PairwiseAndSquares.apply(emb)  # type: ignore[no-any-return]


class FactorizationMachine(nn.Module):
    """Pairwise term of an FM: sum_{i<j} <e_i, e_j> = ((sum_i e_i)^2 - sum_i e_i^2) / 2, summed over dims.

    Input [B, F, D]; output [B].
    """

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return pairwise_and_squares(emb)[0]
