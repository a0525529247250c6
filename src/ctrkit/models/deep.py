"""The plain deep models: an MLP over the field embeddings (DNN) and Wide & Deep (Cheng et al., 2016)."""

from __future__ import annotations

import torch

from ctrkit.data.dataset import Batch
from ctrkit.models.base import CTRModel, ModelConfig, register
from ctrkit.nn.embedding import FeatureEmbedding, FeatureLinear, FeatureSpec
from ctrkit.nn.mlp import MLP


@register
class DNN(CTRModel):
    """logit = MLP(concatenated field embeddings): the deep part alone, the baseline every other model must beat."""

    name = "dnn"

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        super().__init__(spec, config)
        cfg = self.config
        self.embedding = FeatureEmbedding(spec, cfg.embed_dim, sparse=bool(cfg.sparse_grad), init_std=cfg.init_std)
        self.mlp = MLP(spec.n_fields * cfg.embed_dim, cfg.hidden, 1, cfg.dropout, cfg.batch_norm)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.mlp_over_fields(self.embed_fields(batch), batch).squeeze(-1)


@register
class WideDeep(DNN):
    """logit = wide part (a weight per raw id, cross-product ids included, and per numeric field) + DNN.

    Cross-product fields declared in the schema are ordinary categorical fields of the id space, so the
    wide part memorises them and the deep part embeds them like any other field.
    """

    name = "wide_deep"

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        super().__init__(spec, config)
        self.wide = FeatureLinear(spec, sparse=bool(self.config.sparse_grad))

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.wide(batch) + super().forward(batch)
