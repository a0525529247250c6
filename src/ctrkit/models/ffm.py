"""Field-aware factorization machine (Juan et al., 2016) over one F*D-wide embedding table."""

from __future__ import annotations

import torch

from ctrkit.data.dataset import Batch
from ctrkit.models.base import CTRModel, ModelConfig, register
from ctrkit.nn.embedding import FeatureEmbedding, FeatureLinear, FeatureSpec
from ctrkit.nn.interactions import FieldAwareInteraction


@register
class FFM(CTRModel):
    """logit = first-order term + sum_{i<j} <v_{i, f_j}, v_{j, f_i}>.

    Each id keeps one ``embed_dim`` vector per field: a row of an F * embed_dim wide table, so every
    field-aware vector of a sample comes from one lookup and every pair from one gather.
    """

    name = "ffm"

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        super().__init__(spec, config)
        cfg = self.config
        self.linear = FeatureLinear(spec, sparse=bool(cfg.sparse_grad))
        self.embedding = FeatureEmbedding(spec, spec.n_fields * cfg.embed_dim, sparse=bool(cfg.sparse_grad),
                                          init_std=cfg.init_std)
        self.ffm = FieldAwareInteraction(spec.n_fields)

    def forward(self, batch: Batch) -> torch.Tensor:
        emb = self.embed_fields(batch)
        return self.linear(batch) + self.ffm(emb.view(*emb.shape[:2], self.spec.n_fields, -1))
