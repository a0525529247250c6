"""Multi-task models over the impression space: ESMM (Ma et al., SIGIR 2018) and MMoE (Ma et al., KDD 2018).

Both read a schema with several labels (``labels: [click, conversion]``) and return one logit per label,
[B, T]; the trainer sums a binary cross-entropy per head over every impression.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ctrkit.data.dataset import Batch
from ctrkit.models.base import CTRModel, ModelConfig, register
from ctrkit.nn.embedding import FeatureEmbedding, FeatureSpec
from ctrkit.nn.mlp import MLP
from ctrkit.nn.sequence import Experts


def logit_of_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """logit(sigmoid(a) * sigmoid(b)), computed in log space (no probability is formed and re-logged)."""
    log_p = F.logsigmoid(a) + F.logsigmoid(b)
    return log_p - torch.log(-torch.expm1(log_p.clamp_max(-1e-7)))


@register
class ESMM(CTRModel):
    """Entire Space Multi-task Model: a CTR tower and a CVR tower share the embeddings; the heads are
    pCTR = sigmoid(ctr) for the first label (click) and pCTCVR = pCTR * pCVR for the second (a conversion,
    which implies a click), both fitted on all impressions, so pCVR = sigmoid(cvr) is learned over the entire
    space without the sample selection bias of training it on clicks. :meth:`cvr` returns pCVR's logit.
    """

    name = "esmm"
    multi_head = True

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        super().__init__(spec, config)
        if spec.n_labels != 2:
            raise ValueError(f"esmm needs two labels, a click and a conversion (labels: [click, conversion]); "
                             f"the schema has {list(spec.label_names) or 1}")
        cfg = self.config
        self.embedding = FeatureEmbedding(spec, cfg.embed_dim, sparse=bool(cfg.sparse_grad), init_std=cfg.init_std)
        width = spec.n_fields * cfg.embed_dim
        self.ctr = MLP(width, cfg.hidden, 1, cfg.dropout, cfg.batch_norm)
        self.cvr = MLP(width, cfg.hidden, 1, cfg.dropout, cfg.batch_norm)

    def towers(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(CTR logit [B], CVR logit [B])."""
        emb = self.embedding(batch)
        self._remember_penalty(emb.pow(2).sum(dim=(1, 2)))
        x = emb.flatten(1)
        return self.ctr(x).squeeze(-1), self.cvr(x).squeeze(-1)

    def cvr_logit(self, batch: Batch) -> torch.Tensor:
        """pCVR's logit [B]: the conversion probability given a click."""
        return self.towers(batch)[1]

    def forward(self, batch: Batch) -> torch.Tensor:
        ctr, cvr = self.towers(batch)
        return torch.stack([ctr, logit_of_product(ctr.float(), cvr.float()).to(ctr.dtype)], dim=1)


@register
class MMoE(CTRModel):
    """Multi-gate Mixture-of-Experts: ``n_experts`` MLPs share the field embeddings; each label has a softmax
    gate over the experts and a tower on its mixture, so related tasks share what helps both."""

    name = "mmoe"
    multi_head = True
    n_experts = 4
    tower = (64,)

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        super().__init__(spec, config)
        cfg = self.config
        self.embedding = FeatureEmbedding(spec, cfg.embed_dim, sparse=bool(cfg.sparse_grad), init_std=cfg.init_std)
        width = spec.n_fields * cfg.embed_dim
        self.experts = Experts(self.n_experts, width, cfg.hidden)
        self.gates = nn.Linear(width, spec.n_labels * self.n_experts)
        self.towers = nn.ModuleList(MLP(self.experts.out_features, self.tower, 1, cfg.dropout)
                                    for _ in range(spec.n_labels))

    def mixtures(self, batch: Batch) -> torch.Tensor:
        """Each task's mixture of the experts' outputs [B, T, H]."""
        emb = self.embedding(batch)
        self._remember_penalty(emb.pow(2).sum(dim=(1, 2)))
        x = emb.flatten(1)
        gate = torch.softmax(self.gates(x).view(x.shape[0], -1, self.n_experts), dim=-1)  # [B, T, E]
        return torch.einsum("bte,beh->bth", gate, self.experts(x))

    def forward(self, batch: Batch) -> torch.Tensor:
        mix = self.mixtures(batch)
        return torch.cat([tower(mix[:, t]) for t, tower in enumerate(self.towers)], dim=1)
