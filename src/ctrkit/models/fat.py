"""FAT, a field-aware transformer for CTR prediction, after "From Scaling to Structured Expressivity: Rethinking
Transformers for CTR Prediction" (arXiv 2511.12081).

What follows the paper's description: attention over the field vectors of one sample in which every field has
its own query / key / value projections ("decomposed content alignment"), a learned term per field pair that
modulates each attention score before the softmax ("cross-field modulation"), and a feed-forward network per
field; the parameters grow with the number of fields, not with the vocabulary.
Our reading (the text of the paper was not at hand when this was written, so these are choices, not quotes):
the modulation is an affine map of the scaled score per head and pair, g_hij * s + c_hij (g from 1, c from 0);
each block is post-norm with residuals; the per-field output projection; GELU in the feed-forward; and the
head, an MLP over the flat output of the last block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ctrkit.data.dataset import Batch
from ctrkit.models.base import CTRModel, ModelConfig, register
from ctrkit.nn.attention import FieldAwareAttention, attend
from ctrkit.nn.embedding import FeatureEmbedding, FeatureSpec
from ctrkit.nn.mlp import MLP


@dataclass(frozen=True)
class FATConfig(ModelConfig):
    """``attn_layers`` blocks of ``heads`` heads of width ``attn_dim`` and a per-field FFN of width ``ffn_dim``;
    ``attn_dropout`` inside the blocks; ``hidden`` is the MLP head."""

    attn_layers: int = 2
    heads: int = 2
    attn_dim: int = 16
    ffn_dim: int = 64
    attn_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.attn_layers, self.heads, self.attn_dim, self.ffn_dim) < 1:
            raise ValueError("attn_layers, heads, attn_dim and ffn_dim must be >= 1")
        if not 0.0 <= self.attn_dropout < 1.0:
            raise ValueError(f"attn_dropout must be in [0, 1), got {self.attn_dropout}")


@register
class FAT(CTRModel):
    """logit = MLP(flat(FAT blocks(E))): field-aware attention with cross-field modulated scores."""

    name = "fat"
    config_class = FATConfig

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        super().__init__(spec, config)
        cfg: FATConfig = self.config  # type: ignore[assignment]
        f, d = spec.n_fields, cfg.embed_dim
        self.embedding = FeatureEmbedding(spec, d, sparse=bool(cfg.sparse_grad), init_std=cfg.init_std)
        self.blocks = nn.ModuleList(FieldAwareAttention(f, d, cfg.heads, cfg.attn_dim, cfg.ffn_dim, cfg.attn_dropout)
                                    for _ in range(cfg.attn_layers))
        self.mlp = MLP(f * d, cfg.hidden, 1, cfg.dropout, cfg.batch_norm)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.mlp(attend(self.blocks, self.embed_fields(batch))[0].flatten(1)).squeeze(-1)

    def explain(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Attention of the first block, averaged over heads: pairs [B, F, F] (row i attends to j)."""
        return {"pairs": attend(self.blocks, self.embedding(batch))[1][0].mean(dim=1)}
