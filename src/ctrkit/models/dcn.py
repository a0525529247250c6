"""Deep & Cross networks: DCN (Wang et al., 2017) and DCN-V2 (Wang et al., 2021), stacked or parallel."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ctrkit.data.dataset import Batch
from ctrkit.models.base import CTRModel, ModelConfig, register
from ctrkit.nn.embedding import FeatureEmbedding, FeatureSpec
from ctrkit.nn.interactions import CrossNet, CrossNetMix, CrossNetV2
from ctrkit.nn.mlp import MLP

STRUCTURES = ("parallel", "stacked")


@dataclass(frozen=True)
class DCNConfig(ModelConfig):
    """``cross_layers``: depth of the cross network; DCN-V2 also reads ``structure`` (parallel: cross and MLP
    side by side; stacked: the MLP on top of the cross network), ``low_rank`` (0 = full-rank W, otherwise the
    rank of each expert of the mixture) and ``experts``."""

    cross_layers: int = 3
    structure: str = "parallel"
    low_rank: int = 0
    experts: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cross_layers < 1 or self.low_rank < 0 or self.experts < 1:
            raise ValueError(f"cross_layers and experts must be >= 1 and low_rank >= 0, got {self.cross_layers}, "
                             f"{self.experts}, {self.low_rank}")
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {self.structure!r}")


class _CrossModel(CTRModel):
    """x0 = flat field embeddings; parallel: w^T [cross(x0), MLP(x0)]; stacked: MLP(cross(x0)) -> logit."""

    config_class = DCNConfig

    def __init__(self, spec: FeatureSpec, config: ModelConfig, cross: nn.Module) -> None:
        super().__init__(spec, config)
        cfg = self.config
        self.embedding = FeatureEmbedding(spec, cfg.embed_dim, sparse=bool(cfg.sparse_grad), init_std=cfg.init_std)
        d = spec.n_fields * cfg.embed_dim
        self.cross = cross
        self.parallel = cfg.structure == "parallel"
        self.mlp = MLP(d, cfg.hidden, None, cfg.dropout, cfg.batch_norm)
        self.out = nn.Linear(d + self.mlp.out_features if self.parallel else self.mlp.out_features, 1)

    def forward(self, batch: Batch) -> torch.Tensor:
        x0 = self.embed_fields(batch).flatten(1)
        crossed = self.cross(x0)
        h = torch.cat([crossed, self.mlp(x0)], dim=1) if self.parallel else self.mlp(crossed)
        return self.out(h).squeeze(-1)

    def explain(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The cross layers' weights by field, the same for every row: DCN's |w_l| per field block ("fields"),
        DCN-V2's |W_l| per (output field, input field) block ("pairs"; for the mixture, sum_e |U_e C_e V_e^T|,
        the experts without their tanh), averaged over layers."""
        f, d, b = self.spec.n_fields, self.config.embed_dim, len(batch)
        if isinstance(self.cross, CrossNet):
            w = self.cross.weight.detach().view(-1, f, d)
            return {"fields": w.norm(dim=2).mean(dim=0).expand(b, f)}
        if isinstance(self.cross, CrossNetV2):
            w = torch.stack([layer.weight.detach() for layer in self.cross.layers])
        else:
            m = self.cross
            w = torch.einsum("leds,lers,lefr->ledf", m.u.detach(), m.c.detach(), m.v.detach()).abs().sum(dim=1)
        blocks = w.view(-1, f, d, f, d).norm(dim=(2, 4)).mean(dim=0)
        return {"pairs": blocks.expand(b, f, f)}


@register
class DCN(_CrossModel):
    """DCN: cross layers x_{l+1} = x0 (w_l^T x_l) + b_l + x_l beside an MLP (bit-wise, bounded-degree crosses)."""

    name = "dcn"

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        cfg = config.resolve(spec)
        super().__init__(spec, config, CrossNet(spec.n_fields * cfg.embed_dim, cfg.cross_layers))  # type: ignore[attr-defined]


@register
class DCNv2(_CrossModel):
    """DCN-V2: cross layers x0 * (W_l x_l + b_l) + x_l, full-rank or a low-rank mixture of experts."""

    name = "dcnv2"

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        cfg: DCNConfig = config.resolve(spec)  # type: ignore[assignment]
        d = spec.n_fields * cfg.embed_dim
        cross = (CrossNetMix(d, cfg.cross_layers, cfg.low_rank, cfg.experts) if cfg.low_rank
                 else CrossNetV2(d, cfg.cross_layers))
        super().__init__(spec, config, cross)
