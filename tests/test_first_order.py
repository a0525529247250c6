"""The exact first-order fit of small logs: its design matrix, its objective, its solution and its choice of L2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from sklearn.linear_model import LogisticRegression

import ctrkit
from ctrkit.data.dataset import Batch, EncodedData
from ctrkit.data.synth import make_click_log, synth_schema, write_splits
from ctrkit.models.base import ModelConfig, build_model
from ctrkit.nn.embedding import FeatureLinear, FeatureSpec
from ctrkit.pipeline import SMALL_LOG, adaptive_settings
from ctrkit.training.first_order import L2_PATH, _objective, design_matrix, fit_first_order, load_first_order
from ctrkit.training.losses import weighted_bce

SPEC = FeatureSpec(n_ids=12, field_sizes=(4, 4, 4), sparse_names=("a", "b"), dense_names=("x", "z"),
                   seq_names=("tags",), seq_kinds=("multi",), seq_pooling=("mean",), seq_max=3)


def encoded(n: int, seed: int, spec: FeatureSpec = SPEC) -> EncodedData:
    """Rows of ``spec`` with planted first-order effects, missing numerics and ragged lists."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.integers(0, 4, n), rng.integers(4, 8, n)], axis=1).astype(np.int32)
    dense = rng.normal(size=(n, spec.n_dense)).astype(np.float32)
    dense[rng.random(dense.shape) < 0.2] = np.nan
    seq = rng.integers(8, 12, (n, 1, 3)).astype(np.int32)
    seq_len = rng.integers(0, 4, (n, 1)).astype(np.int32)
    effect = np.linspace(-1, 1, 12)
    z = effect[ids].sum(1) + np.nan_to_num(dense[:, 0]) - 1.0
    label = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.float32)
    return EncodedData(ids=ids, dense=dense, label=label, seq=seq, seq_len=seq_len)


def test_design_matrix_reproduces_the_first_order_term() -> None:
    data = encoded(64, 0)
    linear = FeatureLinear(SPEC)
    with torch.no_grad():
        for p in linear.parameters():
            p.normal_()
    batch = Batch(ids=torch.from_numpy(data.ids), dense=torch.from_numpy(data.dense),
                  seq=torch.from_numpy(data.seq), seq_len=torch.from_numpy(data.seq_len))
    with torch.no_grad():
        expected = linear(batch).double().numpy()
    w = np.concatenate([linear.table.weight.detach().numpy().ravel(), linear.dense_w.detach().numpy(),
                        linear.dense_missing.detach().numpy()])
    got = design_matrix(data, SPEC) @ w + linear.bias.item()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(pos_weight=st.floats(0.2, 5.0), l2=st.floats(0.0, 0.1), seed=st.integers(0, 1000))
def test_objective_and_gradient_match_the_training_loss(pos_weight: float, l2: float, seed: int) -> None:
    data = encoded(40, seed)
    rng = np.random.default_rng(seed)
    x = design_matrix(data, SPEC)
    params = rng.normal(size=x.shape[1] + 1)
    y, v = data.label.astype(np.float64), rng.uniform(0.1, 3.0, len(data))
    n_ids = SPEC.n_ids
    f, g = _objective(params, x, x.T.tocsr(), y, v, l2, n_ids, pos_weight)
    p = torch.tensor(params, requires_grad=True)
    xs = torch.from_numpy(x.toarray())
    ref = (weighted_bce(xs @ p[:-1] + p[-1], torch.from_numpy(y), torch.from_numpy(v), pos_weight=pos_weight)
           + 0.5 * l2 * p[:n_ids].pow(2).sum())
    ref.backward()
    assert f == pytest.approx(ref.item(), rel=1e-9)
    np.testing.assert_allclose(g, p.grad.numpy(), rtol=1e-7, atol=1e-10)


def test_fit_at_one_strength_is_scikit_learns_logistic_regression() -> None:
    data = encoded(3000, 1)
    k = 3.0
    fit = fit_first_order(SPEC, data, path=(k,))
    x = design_matrix(data, SPEC)
    ref = LogisticRegression(C=1.0 / k, tol=1e-10, max_iter=10_000)
    # scikit-learn penalises every column; ctrkit only the id weights: give the numerics room to match
    scale = np.ones(x.shape[1])
    scale[SPEC.n_ids:] = 1e3
    ref.fit(x.multiply(scale).tocsr(), data.label)
    w = np.concatenate([fit.state["table.weight"].numpy().ravel(), fit.state["dense_w"].numpy(),
                        fit.state["dense_missing"].numpy()])
    assert fit.l2 == pytest.approx(k / len(data))
    # the solve stops at a change of the loss below 1e-7: weights agree to a few thousandths, the loss to 1e-6
    np.testing.assert_allclose(w, ref.coef_.ravel() * scale, atol=5e-3)
    assert fit.state["bias"].item() == pytest.approx(ref.intercept_[0], abs=5e-3)
    y, v = data.label.astype(np.float64), np.ones(len(data))
    ours = _objective(np.append(w, fit.state["bias"].item()), x, x.T.tocsr(), y, v, fit.l2, SPEC.n_ids, 1.0)[0]
    theirs = _objective(np.append(ref.coef_.ravel() * scale, ref.intercept_), x, x.T.tocsr(), y, v, fit.l2,
                        SPEC.n_ids, 1.0)[0]
    assert ours == pytest.approx(theirs, abs=1e-6)


def test_the_path_chooses_by_out_of_fold_logloss_and_is_deterministic() -> None:
    data = encoded(2000, 2)
    path = (1000.0, 3.0, 0.001)
    fit = fit_first_order(SPEC, data, path=path, seed=5)
    losses = [r["oof_logloss"] for r in fit.path]
    assert [r["l2"] for r in fit.path] == pytest.approx([k / len(data) for k in path])
    assert fit.l2 == pytest.approx(path[int(np.argmin(losses))] / len(data))
    assert losses[1] < losses[0]  # 1000 / rows flattens planted effects
    again = fit_first_order(SPEC, data, path=path, seed=5)
    assert all(torch.equal(fit.state[k], again.state[k]) for k in fit.state)


def test_tiny_logs_take_the_middle_of_the_path_and_load_into_a_model() -> None:
    data = encoded(5, 3)
    fit = fit_first_order(SPEC, data, path=(30.0, 3.0, 0.3))
    assert fit.l2 == pytest.approx(3.0 / 5) and fit.path == []
    model = build_model("deepfm", SPEC, ModelConfig(embed_dim=4, hidden=(8,)))
    assert load_first_order(model, fit.state)
    assert torch.equal(model.linear.table.weight, fit.state["table.weight"])
    with pytest.raises(ValueError, match="one label"):
        fit_first_order(SPEC, EncodedData(ids=data.ids, dense=data.dense, label=np.zeros((5, 2), np.float32),
                                          seq=data.seq, seq_len=data.seq_len))


def test_linear_l2_penalises_the_first_order_table_alone() -> None:
    model = build_model("deepfm", SPEC, ModelConfig(embed_dim=4, hidden=(8,), emb_l2=0.2, emb_l2_scope="table",
                                                    linear_l2=0.03))
    with torch.no_grad():
        model.linear.table.weight.fill_(2.0)
    model.train()
    expected = 0.5 * 0.03 * model.linear.table.weight.pow(2).sum() + 0.5 * 0.2 * sum(
        m.weight.pow(2).sum() for m in model.modules()
        if isinstance(m, torch.nn.Embedding) and m is not model.linear.table)
    assert model.regularization().item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="linear_l2"):
        ModelConfig(linear_l2=-1.0)
    with pytest.raises(ValueError, match="table_l2"):
        ModelConfig(table_l2=-0.1)


def test_only_small_logs_get_the_fit() -> None:
    assert adaptive_settings("deepfm", SMALL_LOG - 1, 100, 1000)["first_order_fit"]
    large = adaptive_settings("gbdt_lr", SMALL_LOG, 100, 1000)  # no L2 of its own: the rows rule sets it
    assert not large["first_order_fit"] and large["model"]["emb_l2"] == pytest.approx(20.0 / SMALL_LOG)
    own = adaptive_settings("lr", SMALL_LOG, 100, 1000)  # lr's YAML L2 (1e-5) stands on large logs
    assert not own["first_order_fit"] and "emb_l2" not in own["model"]
    assert adaptive_settings("lr", SMALL_LOG - 1, 100, 1000)["first_order_fit"]


def test_a_small_log_the_run_cannot_fit_gets_the_rows_rule_on_its_first_order_weights() -> None:
    # downsampling, focal loss or several labels: no exact fit, so the first-order table gets 20 / rows
    lr = adaptive_settings("lr", 16_583, 100, 1000, fit=False)
    assert not lr["first_order_fit"] and lr["model"]["linear_l2"] == pytest.approx(20.0 / 16_583)
    deep = adaptive_settings("deepfm", 5000, 100, 1000, fit=False)
    assert deep["model"]["linear_l2"] == pytest.approx(20.0 / 5000) and "emb_l2" not in deep["model"]
    assert "linear_l2" not in adaptive_settings("lr", SMALL_LOG, 100, 1000, fit=False)["model"]
    model = build_model("lr", SPEC, linear_l2=0.03)  # lr's only table is its first-order one
    model.train()
    with torch.no_grad():
        model.linear.table.weight.fill_(2.0)
    assert model.regularization().item() == pytest.approx(0.5 * 0.03 * 4.0 * model.linear.table.weight.numel())


def test_train_fits_the_first_order_term_of_a_small_log(tmp_path: Path) -> None:
    write_splits(make_click_log(n_rows=4000, n_users=100, n_items=50, ctr=0.05, seed=4)[0], tmp_path)
    kw = {"schema": synth_schema(), "valid": tmp_path / "valid.csv", "test": tmp_path / "test.csv",
          "model": "lr", "progress": False, "epochs": 2}
    run = ctrkit.train(tmp_path / "train.csv", **kw)
    auto = run.metrics["train"]["auto"]
    assert [p["l2"] * run.metrics["train"]["rows"] for p in auto["first_order"]] == pytest.approx(list(L2_PATH))
    chosen = min(auto["first_order"], key=lambda p: p["oof_logloss"])["l2"]
    assert run.metrics["model"]["config"]["linear_l2"] == pytest.approx(chosen) == auto["model"]["linear_l2"]
    assert any("L-BFGS" in r for r in auto["reasons"])
    assert run.metrics["test"]["auc"] > 0.6
    fixed = ctrkit.train(tmp_path / "train.csv", model_options={"linear_l2": 0.01}, **kw)
    assert "first_order" not in fixed.metrics["train"]["auto"]
    assert fixed.metrics["model"]["config"]["linear_l2"] == 0.01
