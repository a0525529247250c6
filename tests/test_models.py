"""Model zoo: registry, typed configuration, output shapes, decomposition of the logit, regularisation."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from ctrkit.data.dataset import Batch, EncodedData
from ctrkit.nn.mlp import Dropout
from ctrkit.models import ModelConfig, build_model, default_config, model_class, model_names
from ctrkit.models.base import BATCH_L2, SMALL_TABLE, TABLE_L2
from ctrkit.nn.embedding import FeatureSpec
from ctrkit.nn.interactions import FactorizationMachine

SMALL_DEEP = {"hidden": (8, 4), "embed_dim": 4}


def make_spec(n_sparse: int = 3, n_dense: int = 2, field_size: int = 5) -> FeatureSpec:
    """``n_sparse`` fields of ``field_size`` ids each and ``n_dense`` numeric fields."""
    return FeatureSpec(n_ids=n_sparse * field_size, field_sizes=(field_size,) * n_sparse,
                       sparse_names=tuple(f"c{i}" for i in range(n_sparse)),
                       dense_names=tuple(f"x{j}" for j in range(n_dense)))


def make_batch(spec: FeatureSpec, batch: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random offset ids and dense values (some NaN) for ``spec``."""
    gen = torch.Generator().manual_seed(seed)
    size = spec.field_sizes[0] if spec.field_sizes else 1
    offsets = torch.arange(spec.n_sparse) * size
    ids = torch.randint(0, size, (batch, spec.n_sparse), generator=gen) + offsets
    dense = torch.randn(batch, spec.n_dense, generator=gen)
    dense[torch.rand(batch, spec.n_dense, generator=gen) < 0.2] = float("nan")
    return ids, dense


def randomise(model: nn.Module, seed: int = 0) -> None:
    """Give every parameter non-trivial values (several start at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)


def test_registry_names_and_unknown_model() -> None:
    names = model_names()
    assert {"lr", "fm", "deepfm"} <= set(names)
    assert names == sorted(names)
    with pytest.raises(ValueError, match="unknown model 'nope'") as err:
        build_model("nope", make_spec())
    for name in names:
        assert name in str(err.value)
    assert type(build_model("FM", make_spec())).name == "fm"


def test_default_config_applies_overrides() -> None:
    base = default_config("deepfm")
    cfg = default_config("deepfm", embed_dim=8, hidden=[32, 16], dropout=None)
    assert cfg.embed_dim == 8 and cfg.hidden == (32, 16)
    assert cfg.dropout == base.dropout and cfg.batch_norm == base.batch_norm
    assert (default_config("lr").emb_l2, default_config("lr").emb_l2_scope) == (1e-5, "table")
    with pytest.raises(ValueError, match="unknown model settings"):
        default_config("fm", embedding_size=8)


def test_build_model_applies_overrides_to_a_given_config() -> None:
    model = build_model("deepfm", make_spec(), ModelConfig(**SMALL_DEEP), dropout=0.5)
    assert model.config.dropout == 0.5 and model.config.hidden == (8, 4)


def test_resolve_small_and_large_id_spaces() -> None:
    small = make_spec()
    cfg = ModelConfig(embed_dim=4).resolve(small)
    assert (cfg.sparse_grad, cfg.emb_l2_scope, cfg.emb_l2) == (False, "table", TABLE_L2)
    assert TABLE_L2 == 0.05

    big = FeatureSpec(n_ids=SMALL_TABLE // 4 + 1, field_sizes=(SMALL_TABLE // 4 + 1,), sparse_names=("a",),
                      dense_names=())
    cfg = ModelConfig(embed_dim=4).resolve(big)
    assert (cfg.sparse_grad, cfg.emb_l2_scope, cfg.emb_l2) == (True, "batch", BATCH_L2)
    assert BATCH_L2 == 1e-5
    at_limit = FeatureSpec(n_ids=SMALL_TABLE // 4, field_sizes=(SMALL_TABLE // 4,), sparse_names=("a",),
                           dense_names=())
    assert ModelConfig(embed_dim=4).resolve(at_limit).sparse_grad is False


def test_resolve_keeps_explicit_values() -> None:
    small = make_spec()
    big = FeatureSpec(n_ids=SMALL_TABLE, field_sizes=(SMALL_TABLE,), sparse_names=("a",), dense_names=())
    assert ModelConfig(emb_l2=0.3).resolve(small).emb_l2 == 0.3
    assert ModelConfig(emb_l2=0.0).resolve(big).emb_l2 == 0.0
    cfg = ModelConfig(sparse_grad=True).resolve(small)
    assert (cfg.sparse_grad, cfg.emb_l2_scope, cfg.emb_l2) == (True, "batch", BATCH_L2)
    cfg = ModelConfig(sparse_grad=False).resolve(big)
    assert (cfg.sparse_grad, cfg.emb_l2_scope, cfg.emb_l2) == (False, "table", TABLE_L2)
    cfg = ModelConfig(table_l2=0.1).resolve(small)
    assert (cfg.emb_l2_scope, cfg.emb_l2) == ("table", 0.1)
    assert ModelConfig(table_l2=0.1).resolve(big).emb_l2 == BATCH_L2  # a large id space keeps the batch L2
    assert ModelConfig(table_l2=0.1, emb_l2=0.02).resolve(small).emb_l2 == 0.02
    cfg = ModelConfig(emb_l2_scope="table").resolve(big)
    assert (cfg.sparse_grad, cfg.emb_l2_scope) == (False, "table")
    cfg = ModelConfig(emb_l2_scope="batch").resolve(small)
    assert (cfg.sparse_grad, cfg.emb_l2_scope, cfg.emb_l2) == (False, "batch", BATCH_L2)
    assert ModelConfig(emb_l2_scope="batch").resolve(small).resolve(big) == cfg


@pytest.mark.parametrize("kwargs, match", [({"emb_l2_scope": "table", "sparse_grad": True}, "sparse_grad=False"),
                                           ({"emb_l2_scope": "rows"}, "emb_l2_scope"),
                                           ({"embed_dim": 0}, "embed_dim"),
                                           ({"hidden": (4, 0)}, "hidden"),
                                           ({"dropout": 1.0}, "dropout"),
                                           ({"emb_l2": -1.0}, "emb_l2")])
def test_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_config_dict_round_trip_and_unknown_keys() -> None:
    cfg = ModelConfig(embed_dim=8, hidden=(16, 8), emb_l2=0.1)
    d = cfg.to_dict()
    assert d["hidden"] == [16, 8]
    assert ModelConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match=r"unknown model settings \['dim', 'layers'\]"):
        ModelConfig.from_dict({"dim": 8, "layers": 2, "dropout": 0.1})


@pytest.mark.parametrize(("setting", "said"), [
    ({"hidden": "abc"}, "hidden must be a list of integers, got 'abc'"),
    ({"hidden": [200, "x"]}, "hidden must be a list of integers"), ({"dropout": "x"}, "dropout must be a number"),
    ({"batch_norm": 3}, "batch_norm must be true or false, got 3"), ({"embed_dim": 8.5}, "embed_dim must be an integer"),
    ({"embed_dim": True}, "embed_dim must be an integer"), ({"emb_l2": "big"}, "emb_l2 must be a number or null"),
    ({"emb_l2_scope": 1}, "emb_l2_scope must be a string")])
def test_a_setting_of_the_wrong_type_is_named(setting: dict[str, object], said: str) -> None:
    """Settings come from YAML (``--set``, config files): a value of the wrong type is named with the type its field
    wants, instead of failing somewhere in a comparison."""
    with pytest.raises(ValueError, match=re.escape(f"model setting {said}")):
        ModelConfig.from_dict(setting)
    assert ModelConfig.from_dict({"dropout": 0, "hidden": [8], "emb_l2": None}).dropout == 0  # an int is a number


SPECS = {"sparse": make_spec(n_dense=0), "dense": make_spec(n_sparse=0), "mixed": make_spec()}


# models of several labels or of a sequence field are tested with those in test_sequence_models.py
SINGLE = [n for n in model_names() if not model_class(n).multi_head and not getattr(model_class(n), "target", False)]


@pytest.mark.parametrize("kind", sorted(SPECS))
@pytest.mark.parametrize("name", SINGLE)
def test_every_model_returns_one_logit_per_row(name: str, kind: str) -> None:
    spec = SPECS[kind]
    torch.manual_seed(0)
    model = build_model(name, spec, **SMALL_DEEP)
    randomise(model)
    ids, dense = make_batch(spec)
    model.fit_features(EncodedData(ids.numpy(), dense.numpy(), (ids.sum(1) % 2).float().numpy()))
    for mode in (True, False):
        model.train(mode)
        out = model(Batch(ids, dense))
        assert out.shape == (7,) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
    model.train()
    model(Batch(ids, dense)).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_lr_logit_is_the_linear_term() -> None:
    spec = make_spec()
    model = build_model("lr", spec)
    randomise(model)
    ids, dense = make_batch(spec)
    assert torch.equal(model(Batch(ids, dense)), model.linear(Batch(ids, dense)))
    assert not any(isinstance(m, nn.Embedding) and m.embedding_dim > 1 for m in model.modules())


def test_fm_logit_is_linear_plus_pairwise_loop() -> None:
    spec = make_spec()
    model = build_model("fm", spec, embed_dim=3).double()
    randomise(model)
    ids, dense = make_batch(spec)
    dense = dense.double()
    emb = model.embedding(Batch(ids, dense))
    pairs = torch.zeros(len(ids), dtype=torch.float64)
    for i in range(spec.n_fields):
        for j in range(i + 1, spec.n_fields):
            pairs += (emb[:, i] * emb[:, j]).sum(dim=1)
    batch = Batch(ids, dense)
    torch.testing.assert_close(model(batch), model.linear(batch) + pairs, rtol=0, atol=1e-10)


def test_deepfm_logit_is_linear_plus_fm_plus_mlp() -> None:
    spec = make_spec()
    torch.manual_seed(0)
    model = build_model("deepfm", spec, **SMALL_DEEP).double()
    randomise(model)
    ids, dense = make_batch(spec)
    dense = dense.double()
    model.train()
    model(Batch(ids, dense))  # a training pass moves the batch-norm running statistics away from their start
    model.eval()
    emb = model.embedding(Batch(ids, dense))
    assert emb.shape == (7, spec.n_fields, 4)
    want = model.linear(Batch(ids, dense)) + FactorizationMachine()(emb) + model.mlp(emb.reshape(7, -1))[:, 0]
    torch.testing.assert_close(model(Batch(ids, dense)), want, rtol=0, atol=1e-10)
    assert model.mlp[0].in_features == spec.n_fields * 4
    assert isinstance(model.mlp[1], nn.BatchNorm1d) and isinstance(model.mlp[3], Dropout)
    assert model.embedding.table is not model.linear.table


def test_mlp_over_fields_without_the_numeric_vectors_under_any_first_layer() -> None:
    """Given the field vectors without the numeric fields, the MLP's output is the same whether its first layer
    is an nn.Linear (folded numeric columns) or another module (a serving form's), which reads every vector."""
    spec = make_spec()
    model = build_model("deepfm", spec, **SMALL_DEEP).double().eval()
    randomise(model)
    ids, dense = make_batch(spec)
    batch = Batch(ids, dense.double())
    emb = model.embedding.fields(batch, numeric=False)
    assert emb.shape[1] == spec.n_sparse
    want = model.mlp(model.embedding(batch).flatten(1))
    torch.testing.assert_close(model.mlp_over_fields(emb, batch, numeric=False), want, rtol=0, atol=1e-12)
    model.mlp[0] = nn.Sequential(model.mlp[0])
    torch.testing.assert_close(model.mlp_over_fields(emb, batch, numeric=False), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["fm", "deepfm"])
def test_table_regularization_is_half_lambda_squared_norm_of_every_table(name: str) -> None:
    spec = make_spec()
    model = build_model(name, spec, ModelConfig(embed_dim=4, hidden=(8,), emb_l2=0.2, emb_l2_scope="table"))
    randomise(model)
    ids, dense = make_batch(spec)
    model.train()
    model(Batch(ids, dense))
    reg = model.regularization()
    want = 0.5 * 0.2 * (model.embedding.table.weight.pow(2).sum() + model.linear.table.weight.pow(2).sum())
    torch.testing.assert_close(reg, want)
    reg.backward()
    untouched = torch.ones(spec.n_ids, dtype=torch.bool)
    untouched[ids.flatten()] = False
    if untouched.any():
        assert model.embedding.table.weight.grad[untouched].abs().sum() > 0
    model.eval()
    assert model.regularization() is None


@pytest.mark.parametrize("name", ["fm", "deepfm"])
def test_batch_regularization_is_lambda_mean_squared_norm_of_looked_up_vectors(name: str) -> None:
    spec = make_spec()
    model = build_model(name, spec, ModelConfig(embed_dim=4, hidden=(8,), emb_l2=0.3, emb_l2_scope="batch",
                                                sparse_grad=True))
    randomise(model)
    ids, dense = make_batch(spec)
    model.train()
    model(Batch(ids, dense))
    reg = model.regularization()
    emb = model.embedding
    total = torch.zeros(())
    for s in range(len(ids)):
        for f in range(spec.n_sparse):
            total = total + emb.table.weight[ids[s, f]].pow(2).sum()
        for j in range(spec.n_dense):
            x = float(dense[s, j])
            vec = emb.dense_missing[j] if math.isnan(x) else x * emb.dense_vec[j]
            total = total + vec.pow(2).sum()
    torch.testing.assert_close(reg, 0.3 * total / len(ids))
    assert model.regularization() is None  # handed over once: the model keeps no graph after
    reg.backward()
    assert emb.table.weight.grad.is_sparse
    model.eval()
    assert model.regularization() is None
    model(Batch(ids, dense))
    assert model.regularization() is None


def test_no_regularization_when_lambda_is_zero() -> None:
    spec = make_spec()
    ids, dense = make_batch(spec)
    for model in (build_model("fm", spec, ModelConfig(emb_l2=0.0)), build_model("lr", spec, ModelConfig(emb_l2=0.0))):
        model.train()
        model(Batch(ids, dense))
        assert model.regularization() is None
    lr = build_model("lr", spec)  # its default: a table L2 on the per-id weights
    weights = lr.linear.table.weight
    with torch.no_grad():
        weights.normal_()
    lr.train()
    lr(Batch(ids, dense))
    assert torch.allclose(lr.regularization(), 0.5 * 1e-5 * weights.pow(2).sum())


def test_sparse_parameters_follow_sparse_grad() -> None:
    spec = make_spec()
    sparse = build_model("fm", spec, ModelConfig(sparse_grad=True, embed_dim=4))
    assert {id(p) for p in sparse.sparse_parameters()} == {id(sparse.embedding.table.weight),
                                                           id(sparse.linear.table.weight)}
    assert build_model("fm", spec, ModelConfig(sparse_grad=False, embed_dim=4)).sparse_parameters() == []
