"""On a GPU the MLP runs each Linear + ReLU pair as one fused product (:func:`ctrkit.nn.mlp.linear_relu`): the same
outputs and gradients as the layers one by one, within bf16's precision under autocast, eager and compiled."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ctrkit.data.dataset import Batch
from ctrkit.models import build_model
from ctrkit.nn import mlp as mlp_module
from ctrkit.nn.embedding import FeatureSpec
from ctrkit.nn.mlp import MLP

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_mlp_fuses_each_linear_relu_pair_and_keeps_the_layers_result(compiled: bool,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    net = MLP(24, (64, 32), out_dim=1, dropout=0.0).cuda()
    calls = []
    fused = mlp_module.linear_relu
    monkeypatch.setattr(mlp_module, "linear_relu",
                        lambda x, layer, weight=None, rest=None: calls.append(layer) or fused(x, layer, weight, rest))
    x = torch.randn(4096, 24, device="cuda", requires_grad=True)
    grad = torch.randn(4096, 1, device="cuda")
    params = [x, *net.parameters()]
    run = torch.compile(net) if compiled else net
    with torch.autocast("cuda", torch.bfloat16):
        got = run(x)
        want = nn.Sequential.forward(net, x)  # the layers one by one
    # the one-logit output layer is a float32 dot product (mlp._dot), where nn.Linear's product gives bf16
    assert got.dtype == torch.float32 and want.dtype == torch.bfloat16
    if not compiled:
        assert calls == [net[0], net[2]]
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    got_g = torch.autograd.grad(got, params, grad)
    want_g = torch.autograd.grad(want, params, grad.to(want.dtype))
    for g, w in zip(got_g, want_g, strict=True):
        assert g.dtype == w.dtype == torch.float32
        assert float((g - w).abs().max()) <= 2e-2 * float(w.abs().max())


@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_first_layer_reads_the_folded_numeric_columns_in_one_fused_product(compiled: bool) -> None:
    """DeepFM's MLP over its field vectors: the folded first layer (field vectors and numeric columns in one
    product, bias and ReLU in its epilogue) against the layers one by one over every field's vector, with
    gradients in float32 (in bf16 a pre-activation near zero may round to the other side of the ReLU)."""
    torch.manual_seed(0)
    spec = FeatureSpec(n_ids=300, field_sizes=(100, 200), sparse_names=("a", "b"), dense_names=("x", "y", "z"))
    model = build_model("deepfm", spec, embed_dim=8, hidden=(64, 32), dropout=0.0, batch_norm=False).cuda()
    with torch.no_grad():
        model.embedding.dense_missing.normal_()
    dense = torch.randn(2048, 3, device="cuda")
    dense[::7, 1] = float("nan")
    batch = Batch(torch.randint(0, 300, (2048, 2), device="cuda"), dense, torch.zeros(2048, device="cuda"))
    emb = model.embedding.fields(batch, numeric=False).detach().requires_grad_()
    params = [emb, *model.mlp.parameters(), model.embedding.dense_vec, model.embedding.dense_missing]
    run = torch.compile(model.mlp_over_fields) if compiled else model.mlp_over_fields

    def reference() -> torch.Tensor:
        return nn.Sequential.forward(model.mlp, torch.cat([emb, model.embedding.numeric_vectors(batch)], 1).flatten(1))

    got, want = run(emb, batch, numeric=False), reference()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(got)
    for g, w in zip(torch.autograd.grad(got, params, grad), torch.autograd.grad(want, params, grad), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    with torch.autocast("cuda", torch.bfloat16):
        got, want = run(emb, batch, numeric=False), reference()
    assert got.dtype == torch.float32 and want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
