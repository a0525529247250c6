"""Training losses on logits: plain, class-weighted and focal binary cross-entropy, all honouring sample weights.

Each loss is a pure function ``loss(logits, label, weight) -> scalar``: the weighted mean over the batch,
sum(w_i * l_i) / sum(w_i), so the scale of the weights does not change the step size. ``weight=None`` means
every row weighs 1. With logits and labels [B, T] (T heads) a row's loss is the sum over its heads.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

LOSSES = ("bce", "weighted", "focal")
Loss = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _fp32(logits: torch.Tensor) -> torch.Tensor:
    """Logits in fp32 at least (a bf16 forward pass gives bf16 logits)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _heads(logits: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits in fp32 at least, and the labels they are scored against: a one-head model of multi-label data
    learns the first label; logits and labels [B, T] are T heads."""
    logits = _fp32(logits)
    return logits, label[:, 0] if logits.dim() == 1 and label.dim() == 2 else label


def _weighted_mean(per_row: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """sum(w_i l_i) / sum(w_i), where l_i sums the heads of row i."""
    per_row = per_row.sum(dim=1) if per_row.dim() == 2 else per_row
    if weight is None:
        return per_row.mean()
    return (per_row * weight).sum() / weight.sum().clamp_min(1e-12)


def bce(logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """-[y log p + (1 - y) log(1 - p)], p = sigmoid(logit)."""
    logits, label = _heads(logits, label)
    return _weighted_mean(F.binary_cross_entropy_with_logits(logits, label, reduction="none"), weight)


def weighted_bce(logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None = None, *,
                 pos_weight: float = 1.0) -> torch.Tensor:
    """-[pos_weight * y log p + (1 - y) log(1 - p)]: positives count ``pos_weight`` times.

    The optimum is the odds multiplied by ``pos_weight``; the bundle divides them back (see
    :func:`ctrkit.training.sampling.logit_shift`), so served probabilities stay unbiased.
    """
    logits, label = _heads(logits, label)
    per_row = F.binary_cross_entropy_with_logits(logits, label, reduction="none",
                                                 pos_weight=torch.tensor(pos_weight, dtype=logits.dtype,
                                                                      device=logits.device))
    return _weighted_mean(per_row, weight)


def focal(logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None = None, *,
          alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al., 2017): -[alpha y (1-p)^gamma log p + (1-alpha)(1-y) p^gamma log(1-p)].

    It down-weights easy rows; its probabilities are not calibrated, so pair it with ``--calibrate``.
    """
    logits, label = _heads(logits, label)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, label, reduction="none")
    p_true = label * p + (1 - label) * (1 - p)
    a = label * alpha + (1 - label) * (1 - alpha)
    return _weighted_mean(a * (1 - p_true).pow(gamma) * ce, weight)


def make_loss(name: str, pos_weight: float = 1.0, alpha: float = 0.25, gamma: float = 2.0) -> Loss:
    """The loss called ``name`` with its settings bound."""
    if name == "bce":
        return bce
    if name == "weighted":
        if pos_weight <= 0:
            raise ValueError(f"pos_weight must be > 0, got {pos_weight}")
        return partial(weighted_bce, pos_weight=pos_weight)
    if name == "focal":
        if not 0 < alpha < 1 or gamma < 0:
            raise ValueError(f"focal loss needs 0 < alpha < 1 and gamma >= 0, got alpha={alpha}, gamma={gamma}")
        return partial(focal, alpha=alpha, gamma=gamma)
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
