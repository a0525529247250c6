"""The bf16 serving form: batch norm folded, dropout gone, linear layers in bf16, the rest of the model as trained."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ctrkit.data.dataset import Batch
from ctrkit.models import build_model, model_class, model_names
from ctrkit.nn.embedding import FeatureSpec
from ctrkit.nn.mlp import MLP
from ctrkit.serve.bf16 import Bf16Linear, Fp32Head, bf16_form, folded_bf16
from ctrkit.serve.fold import fold

SPEC = FeatureSpec(n_ids=12, field_sizes=(4, 4, 4), sparse_names=("a", "b", "c"), dense_names=("x",))


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def _trained_statistics(mlp: nn.Module) -> None:
    """Batch norms with running statistics and affine weights away from their initial values."""
    gen = torch.Generator().manual_seed(1)
    for m in mlp.modules():
        if isinstance(m, nn.BatchNorm1d):
            for t in (m.running_mean, m.weight, m.bias):
                t.data = torch.randn(t.shape, generator=gen) * 0.5
            m.running_var.data = torch.rand(m.running_var.shape, generator=gen) + 0.5


def test_an_mlp_matches_its_literal_bf16_formula() -> None:
    torch.manual_seed(0)
    mlp = MLP(6, [5, 4], dropout=0.3, batch_norm=True).eval()
    _trained_statistics(mlp)
    form = bf16_form(mlp)
    assert [type(m) for m in form] == [Bf16Linear, nn.ReLU, Bf16Linear, nn.ReLU, Fp32Head]  # the logit in fp32
    assert [m.keep for m in form if isinstance(m, Bf16Linear)] == [True, True]
    assert isinstance(form, MLP) and hasattr(form, "with_first_weight")
    assert isinstance(mlp[1], nn.BatchNorm1d) and mlp[0].weight.dtype == torch.float32  # the model is untouched
    x = torch.randn(64, 6)
    h = _bf16(x)
    layers = list(mlp)
    for lin, bn in ((layers[0], layers[1]), (layers[4], layers[5])):
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        w, b = lin.weight * scale[:, None], (lin.bias - bn.running_mean) * scale + bn.bias
        h = _bf16(torch.relu(h @ _bf16(w).T + _bf16(b)))  # each product rounded to bf16 for the next layer
    want = h @ layers[8].weight.T + layers[8].bias  # fp32 from the bf16 activation
    got = form(x)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=0.02, atol=0.02)
    assert torch.allclose(got, mlp(x), rtol=0.05, atol=0.05)


def test_a_training_model_is_refused() -> None:
    with pytest.raises(ValueError, match="evaluation mode"):
        bf16_form(MLP(3, [2]).train())


@pytest.mark.parametrize("name", [n for n in model_names() if not model_class(n).multi_head
                                  and not getattr(model_class(n), "target", False) and n != "gbdt_lr"])
def test_every_model_scores_in_bf16_close_to_fp32(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, SPEC, embed_dim=4, hidden=[8]).eval()
    gen = np.random.default_rng(0)
    ids = torch.from_numpy(gen.integers(0, 4, (32, 3)) + np.array([0, 4, 8]))
    dense = torch.from_numpy(gen.standard_normal((32, 1)).astype(np.float32))
    batch = Batch(ids, dense)
    with torch.no_grad():
        want = model(batch)
        got = bf16_form(model)(batch)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.allclose(got, want, rtol=0.05, atol=0.05), name


def test_the_folded_form_runs_its_mlp_in_bf16_over_the_shared_fp32_table() -> None:
    torch.manual_seed(0)
    model = build_model("deepfm", SPEC, embed_dim=4, hidden=[8, 6]).eval()
    _trained_statistics(model)
    folded = fold(model)
    form = folded_bf16(folded)
    assert form.table.data_ptr() == folded.table.data_ptr()  # hundreds of MB in a real bundle: not copied
    assert [type(m) for m in form.rest] == [nn.ReLU, Bf16Linear, nn.ReLU, Fp32Head]
    assert [m.keep for m in form.rest if isinstance(m, Bf16Linear)] == [True]
    assert all(m.weight.dtype == torch.float32 for m in folded.rest if isinstance(m, nn.Linear))  # left as it was
    x = torch.randn(16, 8)
    (w1, b1), (w2, b2) = [(m.weight, m.bias) for m in folded.rest if isinstance(m, nn.Linear)]
    h = _bf16(torch.relu(_bf16(torch.relu(x)) @ _bf16(w1).T + _bf16(b1)))  # the literal bf16 MLP
    assert torch.allclose(form.rest(x), h @ w2.T + b2, rtol=0.02, atol=0.02)
    gen = np.random.default_rng(0)
    ids = torch.from_numpy(gen.integers(0, 4, (32, 3)) + np.array([0, 4, 8]))
    dense = torch.from_numpy(gen.standard_normal((32, 1)).astype(np.float32))
    with torch.no_grad():
        want = model(Batch(ids, dense))
        assert torch.allclose(folded(ids, dense), want, atol=1e-5)
        assert torch.allclose(form(ids, dense), want, rtol=0.05, atol=0.05)
