"""Factorization machine (Rendle, 2010) and DeepFM (Guo et al., 2017) over one shared embedding table."""

from __future__ import annotations

from dataclasses import dataclass

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

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        super().__init__(spec, config)
        config = self.config
        self.linear = FeatureLinear(spec, sparse=bool(config.sparse_grad))
        self.embedding = FeatureEmbedding(spec, config.embed_dim, sparse=bool(config.sparse_grad),
                                          init_std=config.init_std)

    def _fm_terms(self, batch: Batch, copy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(first-order + pairwise logit, the field embeddings but the numeric fields' [B, Fs + Fq, D]), for this
        model and the ones built on it: the numeric fields enter the pairwise term through their sums
        (:meth:`~ctrkit.nn.embedding.FeatureEmbedding.numeric_sums`), so their [B, Fd, D] vectors, and the
        concatenation with them, are never built. ``copy``: the embeddings as an MLP over them reads them, from the
        same pass on a GPU (see :func:`~ctrkit.nn.interactions.pairwise_and_squares`)."""
        emb = self.embedding.fields(batch, numeric=False)
        extra = self.embedding.numeric_sums(batch) if self.spec.n_dense else None
        pairwise, squares, emb = pairwise_and_squares(emb, extra, copy=copy)
        self._remember_penalty(squares)
        return self.linear(batch) + pairwise, emb

    def forward(self, batch: Batch) -> torch.Tensor:
        return self._fm_terms(batch)[0]


@dataclass(frozen=True)
class DeepFMConfig(ModelConfig):
    """DeepFM's settings; ``fm`` and ``deep`` switch its two branches off one at a time, for ablations."""

    fm: bool = True
    deep: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.fm or self.deep):
            raise ValueError("DeepFM needs its FM or its deep branch: fm and deep cannot both be false")


@register
class DeepFM(FM):
    """FM plus an MLP over the concatenated field embeddings; both share the embedding table.

    With ``fm: false`` it is the first-order term plus the MLP; with ``deep: false`` it is an FM.
    """

    name = "deepfm"
    config_class = DeepFMConfig

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        super().__init__(spec, config)
        cfg = self.config
        self.mlp = MLP(spec.n_fields * cfg.embed_dim, cfg.hidden, 1, cfg.dropout, cfg.batch_norm) if cfg.deep else None

    def forward(self, batch: Batch) -> torch.Tensor:
        if not self.config.fm:
            logit, emb = self.linear(batch), self.embed_fields(batch)
            return logit if self.mlp is None else logit + self.mlp_over_fields(emb, batch).squeeze(-1)
        logit, emb = self._fm_terms(batch, copy=self.mlp is not None)
        return logit if self.mlp is None else logit + self.mlp_over_fields(emb, batch, numeric=False).squeeze(-1)
