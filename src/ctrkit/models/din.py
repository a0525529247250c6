"""Deep Interest Network (Zhou et al., KDD 2018): target attention over a behaviour sequence, then an MLP."""

from __future__ import annotations

import torch

from ctrkit.data.dataset import Batch
from ctrkit.models.base import CTRModel, ModelConfig, register
from ctrkit.nn.embedding import FeatureEmbedding, FeatureSpec, pool
from ctrkit.nn.mlp import MLP
from ctrkit.nn.sequence import TargetAttention


@register
class DIN(CTRModel):
    """Each sequence field that shares the vocabulary of a categorical field (``share_vocab: item_id``) is pooled
    by target attention with that field's id as the target, instead of by its mean; every other field is
    embedded as usual; an MLP reads the concatenated field vectors. One attention unit serves every attended
    sequence (they share the item space).
    """

    name = "din"
    target = True  # needs a sequence field with a candidate (share_vocab)
    attention_hidden = (80, 40)

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        super().__init__(spec, config)
        cfg = self.config
        pairs = [(j, spec.sparse_names.index(t)) for j, (k, t) in enumerate(zip(spec.seq_kinds, spec.seq_targets))
                 if k == "sequence" and t in spec.sparse_names]
        if not pairs:
            raise ValueError("din needs a sequence field with `share_vocab` naming a categorical field (the "
                             f"candidate); the list fields are {list(spec.seq_names)}")
        self.register_buffer("_seq_idx", torch.tensor([j for j, _ in pairs]), persistent=False)
        self.register_buffer("_target_idx", torch.tensor([t for _, t in pairs]), persistent=False)
        self.register_buffer("_mean", torch.tensor([p == "mean" for p in spec.seq_pooling]), persistent=False)
        # where each list field's attended vector comes from (a gather and a select, not an index_copy, which
        # torch 2.11's compiler could not lower in the backward pass on a GPU)
        slot = {j: k for k, (j, _) in enumerate(pairs)}
        self.register_buffer("_attended", torch.tensor([j in slot for j in range(spec.n_seq)]), persistent=False)
        self.register_buffer("_slot", torch.tensor([slot.get(j, 0) for j in range(spec.n_seq)]), persistent=False)
        self.embedding = FeatureEmbedding(spec, cfg.embed_dim, sparse=bool(cfg.sparse_grad), init_std=cfg.init_std)
        self.attention = TargetAttention(cfg.embed_dim, self.attention_hidden)
        self.mlp = MLP(spec.n_fields * cfg.embed_dim, cfg.hidden, 1, cfg.dropout, cfg.batch_norm)

    def forward(self, batch: Batch) -> torch.Tensor:
        items, mask = self.embedding.sequences(batch)
        pooled = pool(items, mask, self._mean)
        keys, m = items[:, self._seq_idx], mask[:, self._seq_idx]  # [B, Fa, L, D], [B, Fa, L]
        rows = self.embedding.table(batch.ids)  # [B, Fs, D], the candidates among them
        target = rows[:, self._target_idx]  # [B, Fa, D]
        b, fa, length, d = keys.shape
        attended = self.attention(keys.reshape(b * fa, length, d), target.reshape(b * fa, d),
                                  m.reshape(b * fa, length)).view(b, fa, d)
        pooled = torch.where(self._attended.view(1, -1, 1), attended[:, self._slot].to(pooled.dtype), pooled)
        emb = self.embedding.fields(batch, pooled, rows)
        self._remember_penalty(emb.pow(2).sum(dim=(1, 2)))
        return self.mlp_over_fields(emb, batch).squeeze(-1)
