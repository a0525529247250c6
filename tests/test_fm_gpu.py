"""The fused FM terms (:mod:`ctrkit.nn.fm_gpu`) against the literal pair loop and the torch path, with gradients.

Runs on a CUDA device, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, float32 only); skipped
without Triton.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctrkit.data.dataset import Batch
from ctrkit.models import build_model
from ctrkit.nn import fm_gpu
from ctrkit.nn.embedding import FeatureSpec
from ctrkit.nn.interactions import _PairwiseAndSquares

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not fm_gpu.AVAILABLE or (DEVICE == "cpu" and not INTERPRETED),
                                reason="the FM kernels need Triton on a CUDA device or its interpreter")


def pair_loop(emb: torch.Tensor) -> torch.Tensor:
    """sum over i < j of <e_i, e_j>, one pair at a time."""
    b, f, _ = emb.shape
    out = torch.zeros(b, dtype=torch.float64)
    for i in range(f):
        for j in range(i + 1, f):
            out += (emb[:, i].double() * emb[:, j].double()).sum(-1)
    return out


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 40), fields=st.integers(1, 9), dim=st.integers(1, 7), extra=st.booleans(),
       strided=st.booleans(), copy=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fm_terms_equal_the_pair_loop_with_gradients(rows: int, fields: int, dim: int, extra: bool, strided: bool,
                                                     copy: bool, seed: int) -> None:
    """Values against the literal loop over field pairs (the extra fields given by their sums, contiguous or as
    ``strided`` views of one wider tensor, count as fields); every gradient against the torch path's (float32)."""
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(rows, fields, dim, generator=gen)
    more = torch.randn(rows, 2, dim, generator=gen)
    sums = (more.sum(1), more.pow(2).sum((1, 2))) if extra else (None, None)
    x = emb.to(DEVICE).requires_grad_()
    if extra and strided:  # as numeric_sums gives them: columns of one [B, dim + 3] product
        wide = torch.cat([sums[0], sums[1][:, None], torch.zeros(rows, 2)], dim=1).to(DEVICE)
        ext = [wide[:, :dim].detach().requires_grad_(), wide[:, dim].detach().requires_grad_()]
        assert ext[0].stride(0) == ext[1].stride(0) == dim + 3
    else:
        ext = [None if t is None else t.to(DEVICE).requires_grad_() for t in sums]
    pair, sq, s, vectors = fm_gpu.fm_terms(x, ext[0], ext[1], torch.float32 if copy else None)
    whole = torch.cat([emb, more], 1) if extra else emb
    torch.testing.assert_close(pair.cpu().double(), pair_loop(whole), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sq.cpu(), whole.pow(2).sum((1, 2)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.cpu(), whole.sum(1), rtol=1e-5, atol=1e-5)
    assert vectors.shape == ((rows, fields, dim) if copy else (0,))
    if copy:
        assert torch.equal(vectors.cpu(), emb)
    w = torch.randn(3, rows, generator=gen).to(DEVICE)
    g_copy = torch.randn(rows, fields, dim, generator=gen).to(DEVICE)
    loss = (w[0] * pair + w[1] * sq).sum() + ((vectors * g_copy).sum() if copy else 0.0)
    live = [x] + [t for t in ext if t is not None]
    got = torch.autograd.grad(loss, live)
    y = emb.to(DEVICE).requires_grad_()
    ref_ext = [None if t is None else t.to(DEVICE).requires_grad_() for t in sums]
    rp, rsq = _PairwiseAndSquares.apply(y, *ref_ext)
    ref_loss = (w[0] * rp + w[1] * rsq).sum() + ((y * g_copy).sum() if copy else 0.0)
    want = torch.autograd.grad(ref_loss, [y] + [t for t in ref_ext if t is not None])
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_fm_terms_reject_a_layout_the_kernel_cannot_read() -> None:
    emb = torch.randn(4, 6, 3, device=DEVICE).transpose(1, 2)
    with pytest.raises(ValueError, match="contiguous"):
        fm_gpu.fm_terms(emb, None, None, None)
    with pytest.raises(ValueError, match=r"\[B, F, D\]"):
        fm_gpu.fm_terms(torch.randn(4, 6, device=DEVICE), None, None, None)


@pytest.mark.skipif(DEVICE == "cpu", reason="a model takes the fused path with its tensors on a GPU")
def test_deepfm_through_the_fused_terms_is_the_torch_deepfm() -> None:
    """A DeepFM's logits and gradients with the fused FM terms (a GPU's path) equal those of the torch path."""
    spec = FeatureSpec(n_ids=40, field_sizes=(15, 25), sparse_names=("a", "b"), dense_names=("x",))
    torch.manual_seed(0)
    model = build_model("deepfm", spec, embed_dim=4, hidden=(8,), dropout=0.0, batch_norm=False).to(DEVICE)
    gen = torch.Generator().manual_seed(2)
    batch = Batch(torch.stack([torch.randint(0, 15, (33,), generator=gen), torch.randint(15, 40, (33,),
                                                                                          generator=gen)], 1)
                  .to(DEVICE), torch.randn(33, 1, generator=gen).to(DEVICE))
    got = model(batch)
    got_g = torch.autograd.grad(got.sum(), list(model.parameters()), allow_unused=True)
    original = fm_gpu.AVAILABLE
    try:
        fm_gpu.AVAILABLE = False  # the torch path
        want = model(batch)
        want_g = torch.autograd.grad(want.sum(), list(model.parameters()), allow_unused=True)
    finally:
        fm_gpu.AVAILABLE = original
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_g, want_g, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
