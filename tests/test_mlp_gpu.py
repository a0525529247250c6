"""On a GPU the MLP runs each Linear + ReLU pair as one fused product (:func:`ctrkit.nn.mlp.linear_relu`): the same
outputs and gradients as the layers one by one, within bf16's precision under autocast, eager and compiled."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ctrkit.nn import mlp as mlp_module
from ctrkit.nn.mlp import MLP

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_mlp_fuses_each_linear_relu_pair_and_keeps_the_layers_result(compiled: bool,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    net = MLP(24, (64, 32), out_dim=1, dropout=0.0).cuda()
    calls = []
    fused = mlp_module.linear_relu
    monkeypatch.setattr(mlp_module, "linear_relu", lambda x, layer: calls.append(layer) or fused(x, layer))
    x = torch.randn(4096, 24, device="cuda", requires_grad=True)
    grad = torch.randn(4096, 1, device="cuda")
    params = [x, *net.parameters()]
    run = torch.compile(net) if compiled else net
    with torch.autocast("cuda", torch.bfloat16):
        got = run(x)
        want = nn.Sequential.forward(net, x)  # the layers one by one
    assert got.dtype == want.dtype == torch.bfloat16
    if not compiled:
        assert calls == [net[0], net[2]]
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    got_g = torch.autograd.grad(got, params, grad.to(got.dtype))
    want_g = torch.autograd.grad(want, params, grad.to(want.dtype))
    for g, w in zip(got_g, want_g, strict=True):
        assert g.dtype == w.dtype == torch.float32
        assert float((g - w).abs().max()) <= 2e-2 * float(w.abs().max())
