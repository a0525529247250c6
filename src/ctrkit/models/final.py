"""FinalMLP (Mao et al., 2023) and FinalNet (Zhu et al., 2023), the BARS Frappe / Criteo / Avazu leaders."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ctrkit.data.dataset import Batch
from ctrkit.models.base import CTRModel, ModelConfig, register
from ctrkit.nn.embedding import FeatureEmbedding, FeatureSpec
from ctrkit.nn.gating import BilinearFusion, FactorizedInteraction, FeatureGate, FieldGate
from ctrkit.nn.mlp import MLP


@dataclass(frozen=True)
class FinalMLPConfig(ModelConfig):
    """Stream 1 is ``hidden`` (with ``dropout``), stream 2 ``hidden2`` (with ``dropout2``); ``gate_hidden`` sizes
    each stream's feature-selection MLP; ``fusion_heads`` chunks the bilinear fusion."""

    hidden2: tuple[int, ...] = (100,)
    dropout2: float = 0.1
    gate_hidden: tuple[int, ...] = (256,)
    fusion_heads: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.hidden or not self.hidden2:
            raise ValueError("FinalMLP needs at least one layer in each stream (hidden and hidden2)")
        if not 0.0 <= self.dropout2 < 1.0:
            raise ValueError(f"dropout2 must be in [0, 1), got {self.dropout2}")
        if self.fusion_heads < 1 or self.hidden[-1] % self.fusion_heads or self.hidden2[-1] % self.fusion_heads:
            raise ValueError(f"fusion_heads ({self.fusion_heads}) must divide both streams' output widths "
                             f"({self.hidden[-1]}, {self.hidden2[-1]})")


@register
class FinalMLP(CTRModel):
    """logit = BilinearFusion(MLP1(gate1 * x), MLP2(gate2 * x)), x the flat field embeddings.

    Each stream's gate is 2 sigmoid(MLP(c)) with c a learned context vector (no context fields), i.e. a
    learned per-feature scale that lets the two streams look at different features.
    """

    name = "finalmlp"
    config_class = FinalMLPConfig

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        super().__init__(spec, config)
        cfg: FinalMLPConfig = self.config  # type: ignore[assignment]
        d, x = cfg.embed_dim, spec.n_fields * cfg.embed_dim
        self.embedding = FeatureEmbedding(spec, d, sparse=bool(cfg.sparse_grad), init_std=cfg.init_std)
        self.context = nn.Parameter(torch.zeros(2, d))
        self.gate1, self.gate2 = FeatureGate(d, x, cfg.gate_hidden), FeatureGate(d, x, cfg.gate_hidden)
        self.mlp1 = MLP(x, cfg.hidden, None, cfg.dropout, cfg.batch_norm)
        self.mlp2 = MLP(x, cfg.hidden2, None, cfg.dropout2, cfg.batch_norm)
        self.fusion = BilinearFusion(self.mlp1.out_features, self.mlp2.out_features, cfg.fusion_heads)

    def forward(self, batch: Batch) -> torch.Tensor:
        x = self.embed_fields(batch).flatten(1)
        c1, c2 = self.context[0].expand(len(x), -1), self.context[1].expand(len(x), -1)
        return self.fusion(self.mlp1(self.gate1(x, c1)), self.mlp2(self.gate2(x, c2)))


@dataclass(frozen=True)
class FinalNetConfig(ModelConfig):
    """Block 1 (``hidden``) reads the field-gated embeddings when ``field_gate``; a second block (``hidden2``,
    empty = one block) reads the plain ones, and the two logits are averaged."""

    hidden2: tuple[int, ...] = ()
    field_gate: bool = True


@register
class FinalNet(CTRModel):
    """logit = w^T block([E, g * E]) (averaged with a second block over E when ``hidden2`` is set).

    A block is an MLP that replaces each linear layer of an MLP with a factorized interaction h2 + h1 * h2, which
    adds second-order terms at every depth.
    """

    name = "finalnet"
    config_class = FinalNetConfig

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        super().__init__(spec, config)
        cfg: FinalNetConfig = self.config  # type: ignore[assignment]
        f, d = spec.n_fields, cfg.embed_dim
        self.embedding = FeatureEmbedding(spec, d, sparse=bool(cfg.sparse_grad), init_std=cfg.init_std)
        self.gate = FieldGate(f) if cfg.field_gate else None
        self.block1 = MLP((2 * f if cfg.field_gate else f) * d, cfg.hidden or (d,), 1, cfg.dropout, cfg.batch_norm,
                          layer=FactorizedInteraction)
        self.block2 = (MLP(f * d, cfg.hidden2, 1, cfg.dropout, cfg.batch_norm, layer=FactorizedInteraction)
                       if cfg.hidden2 else None)

    def forward(self, batch: Batch) -> torch.Tensor:
        emb = self.embed_fields(batch)
        gated = self.gate(emb) if self.gate is not None else emb
        logit = self.block1(gated.flatten(1)).squeeze(-1)
        if self.block2 is None:
            return logit
        return 0.5 * (logit + self.block2(emb.flatten(1)).squeeze(-1))
