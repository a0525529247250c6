"""The folded serving form (first layer, first-order and FM sums read from one precomputed table) gives the
model's own logits, for every foldable model and layout, with missing numeric values; other models are refused
with the reason."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctrkit.data.dataset import Batch
from ctrkit.models import build_model
from ctrkit.nn.embedding import FeatureSpec
from ctrkit.schema import Field
from ctrkit.serve.fold import FoldError, fold

SIZES = (5, 7, 3)
OFFSETS = (10, 0, 7)  # the id space need not follow the field order (vocabulary fields come first)


def _spec(n_dense: int = 2) -> FeatureSpec:
    return FeatureSpec(n_ids=sum(SIZES), field_sizes=SIZES, sparse_names=("a", "b", "c"),
                       dense_names=tuple(f"x{i}" for i in range(n_dense)))


def _model(name: str, n_dense: int = 2, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, _spec(n_dense), embed_dim=4, **overrides)
    with torch.no_grad():  # trained-looking weights: nothing at its zero or one initial value
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _batch(rng: np.random.Generator, n: int, n_dense: int, missing: float) -> Batch:
    ids = np.stack([o + rng.integers(0, s, n) for o, s in zip(OFFSETS, SIZES)], axis=1).astype(np.int32)
    dense = rng.standard_normal((n, n_dense)).astype(np.float32)
    dense[rng.random(dense.shape) < missing] = np.nan
    return Batch(torch.from_numpy(ids), torch.from_numpy(dense))


CASES = [("lr", {}), ("fm", {}), ("deepfm", {}), ("deepfm", {"batch_norm": False, "hidden": [6]}),
         ("deepfm", {"fm": False}), ("deepfm", {"deep": False}), ("deepfm", {"hidden": []}),
         ("dnn", {"hidden": [8, 5], "dropout": 0.3}), ("wide_deep", {"batch_norm": True})]


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=[f"{n}-{o}" for n, o in CASES])
@pytest.mark.parametrize("n_dense", [0, 2])
def test_folded_logits_equal_the_model(name: str, overrides: dict[str, object], n_dense: int) -> None:
    model = _model(name, n_dense, **overrides)
    folded = fold(model, OFFSETS)
    batch = _batch(np.random.default_rng(1), 64, n_dense, missing=0.2)
    with torch.no_grad():
        want = model(batch)
    got = folded(batch.ids, batch.dense)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 40), missing=st.sampled_from([0.0, 0.5, 1.0]))
def test_folded_deepfm_equals_the_model_on_any_rows(seed: int, n: int, missing: float) -> None:
    model = _model("deepfm")
    batch = _batch(np.random.default_rng(seed), n, 2, missing)
    with torch.no_grad():
        want = model(batch)
    torch.testing.assert_close(fold(model, OFFSETS)(batch.ids, batch.dense), want, atol=1e-4, rtol=1e-4)


def test_a_first_layer_by_hand() -> None:
    """A DNN with one hidden unit and no batch norm: logit = w2 * relu(sum of the rows' projections + b1) + b2."""
    model = _model("dnn", n_dense=0, hidden=[1], batch_norm=False, dropout=0.0)
    emb = model.embedding.table.weight.detach()
    w1, b1 = model.mlp[0].weight.detach()[0], model.mlp[0].bias.detach()[0]
    w2, b2 = model.mlp[2].weight.detach()[0, 0], model.mlp[2].bias.detach()[0]
    ids = torch.tensor([[10, 0, 7], [14, 6, 9]], dtype=torch.int32)
    want = [w2 * torch.relu(sum(emb[int(i)] @ w1[4 * j:4 * j + 4] for j, i in enumerate(row)) + b1) + b2
            for row in ids]
    got = fold(model, OFFSETS)(ids, torch.zeros(2, 0))
    torch.testing.assert_close(got, torch.stack(want), atol=1e-6, rtol=1e-6)


def test_models_that_do_not_fold_say_why() -> None:
    with pytest.raises(FoldError, match="dcn is not an embedding-sum model"):
        fold(_model("dcn"))
    with pytest.raises(FoldError, match="evaluation mode"):
        fold(_model("deepfm").train())
    with pytest.raises(FoldError, match=r"would take .* GiB \(15 ids x 406 columns\)"):
        fold(_model("deepfm", hidden=[400]), max_bytes=1000)


def test_scorer_folds_a_bundle_with_hashed_bucketized_and_crossed_fields(tmp_path: Path) -> None:
    """Through a real encoder (hashed, bucketized and crossed fields beside vocabularies, a missing numeric
    value): the scorer's folded path scores raw records as the bundle does."""
    from ctrkit.data.synth import make_click_log, split_by_time, synth_schema
    from ctrkit.pipeline import train
    from ctrkit.serve.bundle import Bundle
    from ctrkit.serve.scorer import FOLDED, Scorer

    base = synth_schema()
    fields = [Field(name=f.name, kind=f.kind, hash_buckets=64) if f.name == "item_id" else
              Field(name=f.name, kind="numeric", transform="bucketize", n_buckets=4) if f.name == "price" else f
              for f in base.fields]
    schema = replace(base, fields=fields, crosses=[["genre", "device"]])
    log, _ = make_click_log(n_rows=2000, n_users=60, n_items=50, seed=3)
    tr, va, te = split_by_time(log.drop("p_click"))
    train(tr, schema=schema, valid=va, model="wide_deep", out=tmp_path / "m", epochs=1, batch_size=256,
          progress=False)
    bundle = Bundle.load(tmp_path / "m" / "bundle")
    scorer = Scorer(bundle, rows=100, reps=1, keep_paths=True)
    assert FOLDED in scorer.timings_ms and FOLDED not in scorer.skipped
    scorer.backend = FOLDED
    records = te.select(schema.input_columns).head(200).to_dicts()
    records[0]["price"] = None
    np.testing.assert_allclose(scorer.predict(records), bundle.predict(records), atol=1e-6)
