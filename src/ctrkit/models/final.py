"""FinalMLP (Mao et al., 2023) and FinalNet (Zhu et al., 2023), the BARS Frappe / Criteo / Avazu leaders."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

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
    each stream's feature-selection MLP; ``fusion_heads`` chunks the bilinear fusion. ``context1`` and
    ``context2`` name the fields whose embeddings condition each stream's gate (the paper's user and item
    context); empty, the gate reads a learned vector instead. "auto" (the shipped default) gives stream 2 the
    categorical field of most ids and stream 1 the next, which are the item and the user on logs such as
    Frappe's (4,082 items, 954 users): BARS's choice for FinalMLP there. A bundle saved before these settings
    existed has neither, so it loads with learned vectors, as it was trained."""

    hidden2: tuple[int, ...] = (100,)
    dropout2: float = 0.1
    gate_hidden: tuple[int, ...] = (256,)
    fusion_heads: int = 1
    context1: tuple[str, ...] | str = ()
    context2: tuple[str, ...] | str = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.hidden or not self.hidden2:
            raise ValueError("FinalMLP needs at least one layer in each stream (hidden and hidden2)")
        if not 0.0 <= self.dropout2 < 1.0:
            raise ValueError(f"dropout2 must be in [0, 1), got {self.dropout2}")
        if self.fusion_heads < 1 or self.hidden[-1] % self.fusion_heads or self.hidden2[-1] % self.fusion_heads:
            raise ValueError(f"fusion_heads ({self.fusion_heads}) must divide both streams' output widths "
                             f"({self.hidden[-1]}, {self.hidden2[-1]})")
        for key in ("context1", "context2"):
            if isinstance(value := getattr(self, key), str) and value != "auto":
                raise ValueError(f"{key} must be 'auto' or a list of field names, got {value!r}")

    def resolve(self, spec: FeatureSpec) -> ModelConfig:
        """The base settings resolved, and an "auto" context replaced by field names (see the class docstring)."""
        cfg = super().resolve(spec)
        largest = sorted(range(spec.n_sparse), key=lambda i: -spec.field_sizes[i])[:2]  # ties: field order
        auto = {"context2": tuple(spec.sparse_names[i] for i in largest[:1]),
                "context1": tuple(spec.sparse_names[i] for i in largest[1:])}
        chosen: dict[str, Any] = {k: auto[k] for k in auto if getattr(cfg, k) == "auto"}
        return replace(cfg, **chosen)


@register
class FinalMLP(CTRModel):
    """logit = BilinearFusion(MLP1(gate1 * x), MLP2(gate2 * x)), x the flat field embeddings.

    Each stream's gate is 2 sigmoid(MLP(c)): c is the concatenated embeddings of the stream's context fields,
    so that each sample's gate depends on who and what it is about, or, with no context fields, a learned
    vector, i.e. a learned per-feature scale that lets the two streams look at different features.
    """

    name = "finalmlp"
    config_class = FinalMLPConfig

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        super().__init__(spec, config)
        cfg: FinalMLPConfig = self.config  # type: ignore[assignment]
        d, x = cfg.embed_dim, spec.n_fields * cfg.embed_dim
        self.embedding = FeatureEmbedding(spec, d, sparse=bool(cfg.sparse_grad), init_std=cfg.init_std)
        names = spec.sparse_names + spec.seq_names + spec.dense_names  # the order of embed_fields
        for key in ("context1", "context2"):
            if unknown := [n for n in getattr(cfg, key) if n not in names]:
                raise ValueError(f"finalmlp {key}: no field named {unknown}; the fields are {list(names)}")
        self._ctx = ([names.index(n) for n in cfg.context1], [names.index(n) for n in cfg.context2])
        # the learned contexts of streams without context fields (none when both have them: no unused parameter)
        self.context = None if cfg.context1 and cfg.context2 else nn.Parameter(torch.zeros(2, d))
        self.gate1 = FeatureGate(d * max(len(cfg.context1), 1), x, cfg.gate_hidden)
        self.gate2 = FeatureGate(d * max(len(cfg.context2), 1), x, cfg.gate_hidden)
        self.mlp1 = MLP(x, cfg.hidden, None, cfg.dropout, cfg.batch_norm)
        self.mlp2 = MLP(x, cfg.hidden2, None, cfg.dropout2, cfg.batch_norm)
        self.fusion = BilinearFusion(self.mlp1.out_features, self.mlp2.out_features, cfg.fusion_heads)

    def forward(self, batch: Batch) -> torch.Tensor:
        emb = self.embed_fields(batch)
        x = emb.flatten(1)
        return self.fusion(self.mlp1(self.gate1(x, self.gate_context(emb, 0))),
                           self.mlp2(self.gate2(x, self.gate_context(emb, 1))))

    def gate_context(self, emb: torch.Tensor, stream: int) -> torch.Tensor:
        """What the gate of stream 1 (``stream=0``, ``context1``) or stream 2 (``stream=1``, ``context2``) reads
        [B, C]: its context fields' embeddings side by side, or its learned vector."""
        if fields := self._ctx[stream]:
            return emb[:, fields].flatten(1)
        assert self.context is not None
        return self.context[stream].expand(len(emb), -1)


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
