"""xDeepFM (Lian et al., 2018): first-order term + compressed interaction network + MLP, one embedding table."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ctrkit.data.dataset import Batch
from ctrkit.models.base import CTRModel, ModelConfig, register
from ctrkit.nn.embedding import FeatureEmbedding, FeatureLinear, FeatureSpec
from ctrkit.nn.interactions import CIN
from ctrkit.nn.mlp import MLP


@dataclass(frozen=True)
class XDeepFMConfig(ModelConfig):
    """``cin_sizes``: feature maps per CIN layer; ``split_half``: half of each layer's maps go to the output."""

    cin_sizes: tuple[int, ...] = (32, 32)
    split_half: bool = True


@register
class XDeepFM(CTRModel):
    """logit = linear + w^T CIN(E) + MLP(flat E): explicit vector-wise interactions of bounded order."""

    name = "xdeepfm"
    config_class = XDeepFMConfig

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        super().__init__(spec, config)
        cfg = self.config
        self.linear = FeatureLinear(spec, sparse=bool(cfg.sparse_grad))
        self.embedding = FeatureEmbedding(spec, cfg.embed_dim, sparse=bool(cfg.sparse_grad), init_std=cfg.init_std)
        self.cin = CIN(spec.n_fields, cfg.cin_sizes, cfg.split_half)
        self.cin_out = nn.Linear(self.cin.out_features, 1, bias=False)
        self.mlp = MLP(spec.n_fields * cfg.embed_dim, cfg.hidden, 1, cfg.dropout, cfg.batch_norm)

    def forward(self, batch: Batch) -> torch.Tensor:
        emb = self.embed_fields(batch)
        return (self.linear(batch) + self.cin_out(self.cin(emb)).squeeze(-1)
                + self.mlp_over_fields(emb, batch).squeeze(-1))
