"""Logistic regression over all features: the first-order term alone."""

from __future__ import annotations

import torch

from ctrkit.data.dataset import Batch
from ctrkit.models.base import CTRModel, ModelConfig, register
from ctrkit.nn.embedding import FeatureLinear, FeatureSpec


@register
class LR(CTRModel):
    """logit = bias + sum of per-id weights + per-numeric-field weights."""

    name = "lr"

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        super().__init__(spec, config)
        config = self.config
        self.linear = FeatureLinear(spec, sparse=bool(config.sparse_grad))

    def forward(self, batch: Batch) -> torch.Tensor:
        self._penalty = None
        return self.linear(batch)
