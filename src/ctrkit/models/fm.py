"""Factorization machine (Rendle, 2010) and DeepFM (Guo et al., 2017) over one shared embedding table."""

from __future__ import annotations

import torch

from ctrkit.models.base import CTRModel, ModelConfig, register
from ctrkit.nn.embedding import FeatureEmbedding, FeatureLinear, FeatureSpec
from ctrkit.nn.interactions import FactorizationMachine
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
        self.fm = FactorizationMachine()

    def forward(self, ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(ids, dense)
        self._remember_penalty(emb)
        return self.linear(ids, dense) + self.fm(emb)


@register
class DeepFM(CTRModel):
    """FM plus an MLP over the concatenated field embeddings; both share the embedding table."""

    name = "deepfm"
    defaults = {"embed_dim": 16, "hidden": (400, 400), "dropout": 0.2, "batch_norm": True}

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        super().__init__(spec, config)
        config = self.config
        self.linear = FeatureLinear(spec, sparse=bool(config.sparse_grad))
        self.embedding = FeatureEmbedding(spec, config.embed_dim, sparse=bool(config.sparse_grad),
                                          init_std=config.init_std)
        self.fm = FactorizationMachine()
        self.mlp = MLP(spec.n_fields * config.embed_dim, config.hidden, 1, config.dropout, config.batch_norm)

    def forward(self, ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(ids, dense)
        self._remember_penalty(emb)
        return self.linear(ids, dense) + self.fm(emb) + self.mlp(emb.flatten(1)).squeeze(-1)
