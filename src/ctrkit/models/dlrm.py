"""DLRM (Naumov et al., 2019): bottom MLP for the numerics, dot products of all vector pairs, top MLP."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctrkit.data.dataset import Batch
from ctrkit.models.base import CTRModel, ModelConfig, register
from ctrkit.nn.embedding import FeatureEmbedding, FeatureSpec
from ctrkit.nn.interactions import DotInteraction
from ctrkit.nn.mlp import MLP


@dataclass(frozen=True)
class DLRMConfig(ModelConfig):
    """``bottom``: hidden sizes of the numeric MLP (its output has ``embed_dim``); ``hidden`` is the top MLP."""

    bottom: tuple[int, ...] = (64,)


@register
class DLRM(CTRModel):
    """logit = top MLP([z, dots]) with z = bottom MLP(numerics, missing flags) and dots = <x_i, x_j> over all
    field vectors and z. Without numeric fields z is the flat field embeddings, so single fields still reach
    the top MLP (our choice; the paper's inputs always have numerics)."""

    name = "dlrm"
    config_class = DLRMConfig

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        super().__init__(spec, config)
        cfg: DLRMConfig = self.config  # type: ignore[assignment]
        d = cfg.embed_dim
        self.embedding = FeatureEmbedding(spec, d, sparse=bool(cfg.sparse_grad), init_std=cfg.init_std)
        self.bottom = MLP(2 * spec.n_dense, cfg.bottom, d) if spec.n_dense else None
        n_vectors = spec.n_fields + (1 if spec.n_dense else 0)
        self.dot = DotInteraction(n_vectors)
        z = d if spec.n_dense else spec.n_fields * d
        self.top = MLP(z + self.dot.n_pairs, cfg.hidden, 1, cfg.dropout, cfg.batch_norm)

    def forward(self, batch: Batch) -> torch.Tensor:
        emb = self.embed_fields(batch)
        if self.bottom is not None:
            dense = batch.dense
            z = self.bottom(torch.cat([torch.nan_to_num(dense, nan=0.0), torch.isnan(dense).to(dense.dtype)], 1))
            vectors = torch.cat([emb, z.unsqueeze(1)], dim=1)
        else:
            z, vectors = emb.flatten(1), emb
        return self.top(torch.cat([z, self.dot(vectors)], dim=1)).squeeze(-1)
