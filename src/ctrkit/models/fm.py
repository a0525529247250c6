"""Factorization machine (Rendle, 2010) and DeepFM (Guo et al., 2017) over one shared embedding table."""

from __future__ import annotations

import torch

from ctrkit.data.dataset import Batch
from ctrkit.models.base import CTRModel, ModelConfig, register
from ctrkit.nn.embedding import FeatureEmbedding, FeatureLinear, FeatureSpec
from ctrkit.nn.interactions import pairwise_and_squares
from ctrkit.nn.mlp import MLP


@register
class FM(CTRModel):
    """logit = first-order term + sum over field pairs of <e_i, e_j>."""

    name = "fm"
    defaults = {"embed_dim": 16, "emb_l2": 1e-5, "emb_l2_scope": "batch"}
    train_defaults = {"lr": 0.01}

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        super().__init__(spec, config)
        config = self.config
        self.linear = FeatureLinear(spec, sparse=bool(config.sparse_grad))
        self.embedding = FeatureEmbedding(spec, config.embed_dim, sparse=bool(config.sparse_grad),
                                          init_std=config.init_std)

    def _fm_terms(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(first-order + pairwise logit, field embeddings), for this model and the ones built on it."""
        emb = self.embedding(batch)
        pairwise, squares = pairwise_and_squares(emb)
        self._remember_penalty(squares)
        return self.linear(batch) + pairwise, emb

    def forward(self, batch: Batch) -> torch.Tensor:
        return self._fm_terms(batch)[0]


@register
class DeepFM(FM):
    """FM plus an MLP over the concatenated field embeddings; both share the embedding table."""

    name = "deepfm"
    defaults = {"embed_dim": 16, "hidden": (400, 400), "dropout": 0.2, "batch_norm": True}
    train_defaults = {}

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        super().__init__(spec, config)
        cfg = self.config
        self.mlp = MLP(spec.n_fields * cfg.embed_dim, cfg.hidden, 1, cfg.dropout, cfg.batch_norm)

    def forward(self, batch: Batch) -> torch.Tensor:
        logit, emb = self._fm_terms(batch)
        return logit + self.mlp(emb.flatten(1)).squeeze(-1)
