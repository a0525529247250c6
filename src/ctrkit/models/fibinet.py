"""FiBiNET (Huang et al., 2019): SENet field weights and bilinear pair interactions, then an MLP."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctrkit.data.dataset import Batch
from ctrkit.models.base import CTRModel, ModelConfig, register
from ctrkit.nn.embedding import FeatureEmbedding, FeatureLinear, FeatureSpec
from ctrkit.nn.interactions import BILINEAR_KINDS, BilinearInteraction, SENet
from ctrkit.nn.mlp import MLP


@dataclass(frozen=True)
class FiBiNETConfig(ModelConfig):
    """``bilinear``: field_all / field_each / field_interaction; ``reduction``: SENet's bottleneck ratio."""

    bilinear: str = "field_interaction"
    reduction: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bilinear not in BILINEAR_KINDS:
            raise ValueError(f"bilinear must be one of {BILINEAR_KINDS}, got {self.bilinear!r}")
        if self.reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {self.reduction}")


@register
class FiBiNET(CTRModel):
    """logit = linear + MLP([bilinear(E), bilinear(SENet(E))]): learned field importance, then pair products."""

    name = "fibinet"
    config_class = FiBiNETConfig

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        super().__init__(spec, config)
        cfg: FiBiNETConfig = self.config  # type: ignore[assignment]
        f, d = spec.n_fields, cfg.embed_dim
        self.linear = FeatureLinear(spec, sparse=bool(cfg.sparse_grad))
        self.embedding = FeatureEmbedding(spec, d, sparse=bool(cfg.sparse_grad), init_std=cfg.init_std)
        self.senet = SENet(f, cfg.reduction)
        self.bilinear = BilinearInteraction(f, d, cfg.bilinear)
        self.bilinear_se = BilinearInteraction(f, d, cfg.bilinear)
        self.mlp = MLP(max(2 * self.bilinear.n_pairs * d, 1), cfg.hidden, 1, cfg.dropout, cfg.batch_norm)

    def forward(self, batch: Batch) -> torch.Tensor:
        emb = self.embed_fields(batch)
        pairs = torch.cat([self.bilinear(emb), self.bilinear_se(self.senet(emb))], dim=1).flatten(1)
        if pairs.shape[1] == 0:  # one field: no pairs, the MLP sees a zero
            pairs = emb.new_zeros(len(emb), 1)
        return self.linear(batch) + self.mlp(pairs).squeeze(-1)

    def explain(self, batch: Batch) -> dict[str, torch.Tensor]:
        """SENet's field weights [B, F]."""
        return {"fields": self.senet.gates(self.embedding(batch))}
