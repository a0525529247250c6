"""Attention over the fields of one sample: AutoInt's interacting layer and FAT's field-aware attention."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ctrkit.nn.mlp import linear, traced

SDPA_ROWS = 32768  # rows per fused-attention call


class FieldSelfAttention(nn.Module):
    """AutoInt's interacting layer (Song et al., 2019): multi-head self-attention over field vectors [B, F, in].

    Head h: a_{ij} = softmax_j(<W_Q e_i, W_K e_j> [/ sqrt(d)]), e~_i = sum_j a_{ij} W_V e_j; the heads are
    concatenated and out_i = relu(e~_i + W_res e_i), or relu(LN(e~_i + W_res e_i)) with ``layer_norm`` (a layer
    norm over each field's heads * d values, as FuxiCTR offers): without it the output scales with the
    embeddings, which an embedding L2 keeps small, so the layers learn slowly. ``identity_residual``: where
    ``in_dim`` equals heads * d, add e_i itself instead of W_res e_i (FuxiCTR's AutoInt does), so that a stack of
    layers keeps a residual path from its first layer's output to its last.
    Returns (out [B, F, heads * d], attention [B, heads, F, F]); with ``weights=False`` (the training path) the
    attention is None and, on a GPU, the heads run as one fused attention kernel (:func:`fused_mix`), which never
    writes the [B, heads, F, F] scores to memory. On a CPU in float32 they run as :class:`_MixFields` (torch's
    fused CPU kernel took 26% longer on 10-field batches at two threads, and tied at 39 fields).
    """

    def __init__(self, in_dim: int, attn_dim: int, heads: int = 2, residual: bool = True, scale: bool = False,
                 layer_norm: bool = False, identity_residual: bool = False) -> None:
        super().__init__()
        if in_dim < 1 or attn_dim < 1 or heads < 1:
            raise ValueError(f"sizes must be >= 1, got in_dim={in_dim}, attn_dim={attn_dim}, heads={heads}")
        self.heads, self.attn_dim, self.scale = heads, attn_dim, scale
        self.qkv = nn.Linear(in_dim, 3 * heads * attn_dim, bias=False)
        self.identity = residual and identity_residual and in_dim == heads * attn_dim
        self.res = nn.Linear(in_dim, heads * attn_dim, bias=False) if residual and not self.identity else None
        self.out_features = heads * attn_dim
        self.norm = nn.LayerNorm(self.out_features) if layer_norm else None

    def forward(self, x: torch.Tensor, weights: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, f, _ = x.shape
        qkv = linear(x, self.qkv).view(b, f, 3, self.heads, self.attn_dim)
        scale = 1.0 / math.sqrt(self.attn_dim) if self.scale else 1.0
        attn = None
        if not weights and _plain_cpu(x):
            out = _MixFields.apply(qkv, scale)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            if weights or not x.is_cuda:
                attn = softmax((q @ k.transpose(-1, -2)) * scale)
                mixed = attn @ v
                attn = attn if weights else None
            else:
                mixed = fused_mix(q, k, v, scale)
            out = mixed.transpose(1, 2).reshape(b, f, -1)
        if self.res is not None:
            out = out + linear(x, self.res)
        elif self.identity:
            out = out + x
        if self.norm is not None:
            out = self.norm(out)
        return F.relu(out), attn


def _plain_cpu(x: torch.Tensor) -> bool:
    """float32 on a CPU, outside compiled, exported and traced code: where the hand-written passes here run."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not traced()


def _softmax_forward(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension, written over ``x``'s own temporaries."""
    e = (x - x.amax(-1, keepdim=True)).exp_()
    return e.div_(e.sum(-1, keepdim=True))


def _softmax_backward(a: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of the softmax ``a`` (last dimension) at ``grad``: a (g - sum(g a))."""
    ga = grad * a
    return ga.sub_(a * ga.sum(-1, keepdim=True))


class _Softmax(torch.autograd.Function):
    """Softmax over the last dimension in whole-tensor passes (max, exp, sum, divide; backward a (g - sum(g a))).
    torch's CPU kernel vectorises along that dimension, which over a handful of fields leaves its vector lanes
    mostly empty: [4096, 4, 10, 10] took 23 ms forward at one thread against 4 ms here, and 34 ms forward and
    backward against 9."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        a = _softmax_forward(x)
        ctx.save_for_backward(a)
        return a

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (a,) = ctx.saved_tensors
        return _softmax_backward(a, grad)


class _MixFields(torch.autograd.Function):
    """Per head, softmax(q k^T * scale) v over the fields, from and to the projection's own layout: ``qkv``
    [B, F, 3, H, d] in, [B, F, H * d] out. The backward writes the gradients of q, k and v straight into one
    [B, F, 3, H, d] tensor: through autograd, stacking them and permuting the stack back took two thirds of an
    AutoInt layer's backward on a CPU."""

    @staticmethod
    def forward(ctx: Any, qkv: torch.Tensor, scale: float) -> torch.Tensor:
        b, f, _, h, d = qkv.shape
        q, k, v = (qkv[:, :, i].transpose(1, 2).contiguous() for i in range(3))  # [B, H, F, d]
        a = _softmax_forward(torch.matmul(q, k.transpose(-1, -2)).mul_(scale))
        ctx.save_for_backward(q, k, v, a)
        ctx.scale = scale
        return torch.matmul(a, v).transpose(1, 2).reshape(b, f, h * d)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        q, k, v, a = ctx.saved_tensors
        b, h, f, d = q.shape
        g = grad.reshape(b, f, h, d).transpose(1, 2).contiguous()  # once, not in each product that reads it
        out = torch.empty(b, f, 3, h, d, dtype=grad.dtype)
        ds = _softmax_backward(a, torch.matmul(g, v.transpose(-1, -2))).mul_(ctx.scale)
        for i, part in enumerate((torch.matmul(ds, k), torch.matmul(ds.transpose(-1, -2), q),
                                  torch.matmul(a.transpose(-1, -2), g))):
            out[:, :, i].copy_(part.transpose(1, 2))
        return out, None


def softmax(x: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(x, -1)``; in float32 on a CPU (outside compiled, exported and traced code) by
    :class:`_Softmax`."""
    if _plain_cpu(x):
        return _Softmax.apply(x)
    return torch.softmax(x, dim=-1)


def fused_mix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v over [B, heads, F, d] by ``scaled_dot_product_attention``, in parts of
    ``SDPA_ROWS`` rows: cuDNN's fused attention fails at 65,536 or more rows in one call."""
    return torch.cat([F.scaled_dot_product_attention(*qkv, scale=scale) for qkv in
                      zip(q.split(SDPA_ROWS), k.split(SDPA_ROWS), v.split(SDPA_ROWS), strict=True)])


def attend(blocks: Iterable[nn.Module], x: torch.Tensor, weights: bool = True) -> tuple[torch.Tensor, list[Any]]:
    """Run attention blocks one after the other: (last output, each block's attention [B, heads, F, F]); with
    ``weights=False`` blocks that can skip their attention maps do (their entries are None)."""
    maps = []
    for block in blocks:
        x, a = block(x, weights=weights)
        maps.append(a)
    return x, maps


def _per_field(n_fields: int, d_in: int, d_out: int) -> nn.Parameter:
    """A stack of F weight matrices [F, d_in, d_out], one per field, with Xavier-scaled entries."""
    return nn.Parameter(torch.randn(n_fields, d_in, d_out) * math.sqrt(2.0 / (d_in + d_out)))


class FieldAwareAttention(nn.Module):
    """FAT's attention block over field vectors [B, F, D] (arXiv 2511.12081, as we read it; see ``ctrkit.models.fat``).

    Field i has its own projections (decomposed content alignment): q_i = e_i Q_i, k_i = e_i K_i, v_i = e_i V_i.
    Per head h the score of pair (i, j) is modulated by a learned field-pair term before the softmax
    (cross-field modulation): s_hij = g_hij <q_hi, k_hj> / sqrt(d) + c_hij, g starting at 1 and c at 0.
    Then o_i = concat_h(sum_j softmax_j(s_hij) v_hj) O_i, x_i = LN(e_i + o_i), and a per-field feed-forward
    y_i = LN(x_i + W2_i gelu(W1_i x_i)). Parameters grow with the fields, not the vocabulary.
    Returns (y [B, F, D], attention [B, heads, F, F]).
    """

    def __init__(self, n_fields: int, dim: int, heads: int = 2, attn_dim: int = 16, ffn_dim: int = 64,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if min(n_fields, dim, heads, attn_dim, ffn_dim) < 1:
            raise ValueError("FAT sizes (fields, dim, heads, attn_dim, ffn_dim) must be >= 1")
        self.heads, self.attn_dim = heads, attn_dim
        self.qkv = _per_field(n_fields, dim, 3 * heads * attn_dim)
        self.out = _per_field(n_fields, heads * attn_dim, dim)
        self.pair_scale = nn.Parameter(torch.ones(heads, n_fields, n_fields))
        self.pair_bias = nn.Parameter(torch.zeros(heads, n_fields, n_fields))
        self.ffn_in = _per_field(n_fields, dim, ffn_dim)
        self.ffn_in_bias = nn.Parameter(torch.zeros(n_fields, ffn_dim))
        self.ffn_out = _per_field(n_fields, ffn_dim, dim)
        self.ffn_out_bias = nn.Parameter(torch.zeros(n_fields, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, weights: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``weights`` is accepted for :func:`attend`; the per-pair modulation needs the maps, so they are always
        computed."""
        b, f, _ = x.shape
        qkv = torch.einsum("bfd,fde->bfe", x, self.qkv).view(b, f, 3, self.heads, self.attn_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        scores = self.pair_scale * (q @ k.transpose(-1, -2)) / math.sqrt(self.attn_dim) + self.pair_bias
        attn = softmax(scores)
        o = (attn @ v).transpose(1, 2).reshape(b, f, -1)
        x = self.norm1(x + self.dropout(torch.einsum("bfe,fed->bfd", o, self.out)))
        h = F.gelu(torch.einsum("bfd,fde->bfe", x, self.ffn_in) + self.ffn_in_bias)
        y = self.norm2(x + self.dropout(torch.einsum("bfe,fed->bfd", h, self.ffn_out) + self.ffn_out_bias))
        return y, attn
