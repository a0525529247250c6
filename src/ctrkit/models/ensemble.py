"""A deep ensemble: models of one kind and settings, trained apart, serving the mean of their logits.

Each member is trained by itself with a seed of its own (initial weights, batch order, dropout masks), as
Lakshminarayanan et al. ("Simple and Scalable Predictive Uncertainty Estimation using Deep Ensembles", NeurIPS
2017) train theirs; they share the encoded data and, on a small log, the exact first-order fit that
:func:`ctrkit.pipeline.train` makes once. On a small log the members' errors are far from perfectly correlated, so
their mean ranks better than any one of them (Frappe_x1, three seeds: one FinalMLP 0.9865 test AUC, the mean of
two 0.9888). Training and scoring cost the sum of the members'. The calibrator of the bundle is fitted on the
ensemble's logits, like any model's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ctrkit.models.base import CTRModel


class Ensemble(CTRModel):
    """The mean logit ([B], or [B, T] per head) of ``members``, models of one registered kind and config."""

    name = "ensemble"

    def __init__(self, members: list[CTRModel]) -> None:
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        first = members[0]
        for m in members[1:]:
            if m.name != first.name or m.config != first.config:
                a, b = first.config.to_dict(), m.config.to_dict()
                diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
                raise ValueError(f"ensemble members must be one model with one config: {first.name} and {m.name}"
                                 + (f", settings {diff}" if diff else ""))
        super().__init__(first.spec, first.config)
        self.members = nn.ModuleList(members)
        self.member_name = first.name
        self.multi_head = first.multi_head  # type: ignore[misc]  # as its members, not as the class says

    def forward(self, batch: Any) -> torch.Tensor:
        """The members' logits, averaged."""
        out = self.members[0](batch)
        for m in self.members[1:]:
            out = out + m(batch)
        return out / len(self.members)

    def regularization(self) -> torch.Tensor | None:
        """None: members are trained one by one, each with its own penalty, never as an ensemble."""
        return None

    def explain(self, batch: Any) -> dict[str, torch.Tensor]:
        """The members' field weights and pair scores, averaged (the members' own error when they have none)."""
        shown = [m.explain(batch) for m in self.members]
        return {k: torch.stack([s[k] for s in shown]).mean(0) for k in shown[0]}
