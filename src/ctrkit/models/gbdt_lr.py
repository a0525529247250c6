"""GBDT + LR (He et al., 2014): the leaves a LightGBM forest puts a sample in become categorical fields of an LR.

LightGBM is an optional dependency: ``pip install 'ctrkit[gbdt]'``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ctrkit.data.dataset import Batch
from ctrkit.models.base import CTRModel, ModelConfig, register
from ctrkit.nn.embedding import FeatureLinear, FeatureSpec


def _lightgbm() -> Any:
    """The lightgbm module, or an ImportError that says how to install it."""
    try:
        import lightgbm
    except ImportError as err:
        raise ImportError("model gbdt_lr needs LightGBM: pip install 'ctrkit[gbdt]' (or pip install lightgbm)") from err
    return lightgbm


@dataclass(frozen=True)
class GBDTLRConfig(ModelConfig):
    """``trees`` boosting rounds of at most ``leaves`` leaves at learning rate ``tree_lr``, fitted on at most
    ``tree_rows`` training rows (drawn at random); ``with_ids`` keeps the raw ids in the LR beside the leaves."""

    trees: int = 100
    leaves: int = 31
    tree_lr: float = 0.1
    tree_rows: int = 1_000_000
    min_child_samples: int = 20
    with_ids: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.trees < 1 or self.leaves < 2 or self.tree_rows < 1 or self.min_child_samples < 1:
            raise ValueError("gbdt_lr needs trees >= 1, leaves >= 2, tree_rows >= 1 and min_child_samples >= 1")
        if self.tree_lr <= 0:
            raise ValueError(f"tree_lr must be > 0, got {self.tree_lr}")


@register
class GBDTLR(CTRModel):
    """logit = bias + sum over trees of w[tree, leaf] (+ the raw ids' and numerics' first-order weights).

    The forest is fitted on the training data (ids as LightGBM categorical features, numerics as they are)
    before the first step and is saved in the bundle with the weights; the leaf weights are what training
    then learns. Leaf look-ups run on the CPU.
    """

    name = "gbdt_lr"
    config_class = GBDTLRConfig

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        super().__init__(spec, config)
        _lightgbm()
        cfg: GBDTLRConfig = self.config  # type: ignore[assignment]
        self.leaf_weight = nn.Embedding(cfg.trees * cfg.leaves, 1)
        nn.init.zeros_(self.leaf_weight.weight)
        self.linear = FeatureLinear(spec, sparse=bool(cfg.sparse_grad)) if cfg.with_ids else None
        self.bias = nn.Parameter(torch.zeros(1))
        self.booster: Any = None
        self.register_buffer("tree_offsets", torch.arange(cfg.trees) * cfg.leaves, persistent=False)

    def fit_features(self, data: Any) -> None:
        """Fit the forest on ``data`` (an EncodedData), once: a model restored from a bundle keeps its trees."""
        if self.booster is not None:
            return
        cfg: GBDTLRConfig = self.config  # type: ignore[assignment]
        lgb = _lightgbm()
        n = len(data)
        rows = np.sort(np.random.default_rng(0).choice(n, cfg.tree_rows, replace=False)) if n > cfg.tree_rows \
            else np.arange(n)
        x = self._features(np.asarray(data.ids)[rows], np.asarray(data.dense)[rows])
        params = {"objective": "binary", "num_leaves": cfg.leaves, "learning_rate": cfg.tree_lr, "verbose": -1,
                  "min_child_samples": cfg.min_child_samples, "deterministic": True, "seed": 0,
                  "force_row_wise": True}
        cats = list(range(self.spec.n_sparse))
        train = lgb.Dataset(x, label=np.asarray(data.label)[rows], categorical_feature=cats, free_raw_data=True)
        self.booster = lgb.train(params, train, num_boost_round=cfg.trees)

    def _features(self, ids: np.ndarray, dense: np.ndarray) -> np.ndarray:
        """The tree input: ids (as categories) then numerics, float64 with NaN for missing numerics."""
        return np.concatenate([ids.astype(np.float64), dense.astype(np.float64)], axis=1)

    def leaves(self, batch: Batch) -> torch.Tensor:
        """Global leaf ids [B, trees] (tree t's leaf k is t * leaves + k)."""
        if self.booster is None:
            raise RuntimeError("gbdt_lr: the forest is not fitted yet; train the model (ctrkit train, or call "
                               "fit_features(train_data) first)")
        x = self._features(batch.ids.cpu().numpy(), batch.dense.detach().cpu().float().numpy())
        leaf = np.asarray(self.booster.predict(x, pred_leaf=True), dtype=np.int64).reshape(len(x), -1)
        out = torch.zeros(len(x), len(self.tree_offsets), dtype=torch.int64)
        out[:, :leaf.shape[1]] = torch.from_numpy(leaf)  # rounds that stopped early keep leaf 0 of their tree
        return out.to(self.tree_offsets.device) + self.tree_offsets

    def forward(self, batch: Batch) -> torch.Tensor:
        self._penalty = None
        logit = self.bias + self.leaf_weight(self.leaves(batch)).squeeze(-1).sum(dim=1)
        return logit if self.linear is None else logit + self.linear(batch)

    def get_extra_state(self) -> torch.Tensor:
        """The forest as LightGBM's text model in a uint8 tensor, so it travels with the weights."""
        text = b"" if self.booster is None else self.booster.model_to_string().encode()
        return torch.frombuffer(bytearray(text), dtype=torch.uint8) if text else torch.zeros(0, dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        """Restore the forest written by :meth:`get_extra_state`."""
        text = bytes(state.cpu().numpy().tobytes()) if isinstance(state, torch.Tensor) else b""
        self.booster = _lightgbm().Booster(model_str=text.decode()) if text else None
