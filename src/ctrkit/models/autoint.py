"""AutoInt and AutoInt+ (Song et al., 2019): multi-head self-attention over the fields, plus an MLP for AutoInt+."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ctrkit.data.dataset import Batch
from ctrkit.models.base import CTRModel, ModelConfig, register
from ctrkit.nn.attention import FieldSelfAttention, attend
from ctrkit.nn.embedding import FeatureEmbedding, FeatureSpec
from ctrkit.nn.mlp import MLP


@dataclass(frozen=True)
class AutoIntConfig(ModelConfig):
    """``attn_layers`` interacting layers of ``heads`` heads of width ``attn_dim``; ``attn_scale`` divides the
    scores by sqrt(attn_dim) (the paper does not); ``attn_residual`` adds W_res e_i, or e_i itself in the layers
    whose input already has the output's width with ``attn_identity_residual`` (FuxiCTR's reading);
    ``attn_layer_norm`` puts a layer norm before each layer's ReLU (not in the paper; FuxiCTR's option)."""

    attn_layers: int = 3
    heads: int = 2
    attn_dim: int = 32
    attn_residual: bool = True
    attn_scale: bool = False
    attn_layer_norm: bool = False
    attn_identity_residual: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.attn_layers, self.heads, self.attn_dim) < 1:
            raise ValueError("attn_layers, heads and attn_dim must be >= 1")


@register
class AutoInt(CTRModel):
    """logit = w^T flat(interacting layers(E)): interactions of any order learned as attention over fields."""

    name = "autoint"
    config_class = AutoIntConfig
    deep = False

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        super().__init__(spec, config)
        cfg: AutoIntConfig = self.config  # type: ignore[assignment]
        self.embedding = FeatureEmbedding(spec, cfg.embed_dim, sparse=bool(cfg.sparse_grad), init_std=cfg.init_std)
        layers, d = [], cfg.embed_dim
        for _ in range(cfg.attn_layers):
            layers.append(FieldSelfAttention(d, cfg.attn_dim, cfg.heads, cfg.attn_residual, cfg.attn_scale,
                                             cfg.attn_layer_norm, cfg.attn_identity_residual))
            d = layers[-1].out_features
        self.attention = nn.ModuleList(layers)
        self.out = nn.Linear(spec.n_fields * d, 1)
        self.mlp = MLP(spec.n_fields * cfg.embed_dim, cfg.hidden, 1, cfg.dropout, cfg.batch_norm) if self.deep else None

    def forward(self, batch: Batch) -> torch.Tensor:
        emb = self.embed_fields(batch)
        logit = self.out(attend(self.attention, emb, weights=False)[0].flatten(1)).squeeze(-1)
        return logit if self.mlp is None else logit + self.mlp_over_fields(emb, batch).squeeze(-1)

    def explain(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Attention of the first interacting layer, averaged over heads: pairs [B, F, F] (row i attends to j)."""
        return {"pairs": attend(self.attention, self.embedding(batch))[1][0].mean(dim=1)}


@register
class AutoIntPlus(AutoInt):
    """AutoInt+: AutoInt's attention logit plus an MLP over the flat field embeddings."""

    name = "autoint_plus"
    deep = True
