"""The fused CIN kernels (:mod:`ctrkit.nn.cin_gpu`) give the convolution's outputs and gradients: fp32 to float
rounding, bf16 within bf16's precision; run where Triton runs (a CUDA machine, or Triton's interpreter)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from ctrkit.nn import cin_gpu
from ctrkit.nn.interactions import CIN

pytestmark = pytest.mark.skipif(not cin_gpu.AVAILABLE, reason="needs Triton (a CUDA build of torch)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and cin_gpu.AVAILABLE and os.environ.get("TRITON_INTERPRET") != "1":
    pytestmark = pytest.mark.skip(reason="Triton without a GPU runs only with TRITON_INTERPRET=1")


def _reference(cin: CIN, x0: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The convolution form (the module's CPU path) on a CPU copy of the same weights: output and its layers'
    weights, to take gradients against."""
    ref = copy.deepcopy(cin).cpu()
    return ref(x0), [c.weight for c in ref.convs]


@pytest.mark.parametrize(("m", "sizes", "split", "n"), [(5, (8, 6), True, 7), (39, (32, 32), True, 70),
                                                        (17, (20,), False, 64), (3, (4, 10, 3), False, 1)])
def test_fused_cin_equals_the_convolution_in_fp32(m: int, sizes: tuple[int, ...], split: bool, n: int) -> None:
    torch.manual_seed(m)
    cin = CIN(m, sizes, split).to(DEVICE)
    x0 = torch.randn(n, m, 4, device=DEVICE, requires_grad=True)
    x0_cpu = x0.detach().cpu().requires_grad_()
    want, weights = _reference(cin, x0_cpu)
    grad = torch.randn_like(want)
    want_g = torch.autograd.grad(want, [x0_cpu, *weights], grad)
    got = cin_gpu.cin(x0, [c.weight for c in cin.convs], split)
    got_g = torch.autograd.grad(got, [x0, *[c.weight for c in cin.convs]], grad.to(DEVICE))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    for a, b in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 tensor-core products: on a GPU")
def test_fused_cin_in_bf16_under_autocast_is_within_bf16_precision() -> None:
    torch.manual_seed(0)
    cin = CIN(39, (32, 32), True).to(DEVICE)
    x0 = (torch.randn(4096, 39, 16, device=DEVICE) * 0.1).requires_grad_()
    x0_cpu = x0.detach().cpu().requires_grad_()
    want = _reference(cin, x0_cpu)[0]
    with torch.autocast("cuda", torch.bfloat16):
        got = cin(x0)  # the module's own GPU path
    assert got.dtype == torch.float32
    assert float((got.cpu() - want).abs().max() / want.abs().max()) < 2e-2
    g_want, = torch.autograd.grad(want.sum(), x0_cpu)
    g_got = torch.autograd.grad(got.sum(), x0)[0].cpu()
    assert float((g_got - g_want).abs().max() / g_want.abs().max()) < 2e-2


def test_bad_shapes_are_refused() -> None:
    x = torch.randn(4, 3, 2, device=DEVICE)
    with pytest.raises(ValueError, match="same B and D"):
        cin_gpu.cin_layer(x, torch.randn(5, 3, 2, device=DEVICE), torch.zeros(48, 16, 16, device=DEVICE), 8)
    with pytest.raises(ValueError, match="same B and D"):  # each row's [Hp, D] must be contiguous
        cin_gpu.cin_layer(x.transpose(1, 2).contiguous().transpose(1, 2), x, torch.zeros(4, 16, 16, device=DEVICE), 8)
    with pytest.raises(ValueError, match="padded weight"):
        cin_gpu.cin_layer(x, x, torch.zeros(3, 16, 16, device=DEVICE), 8)
