"""Multi-layer perceptron used by the deep models."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ctrkit.devices import onednn_fp32


class Dropout(nn.Module):
    """Inverted dropout whose CPU mask costs a quarter of the random draws of ``nn.Dropout``.

    On a CPU, drawing one random number per element dominates a dropout layer (it cost more than the
    matrix products of a 400-wide MLP). Here each 64-bit draw is split into four 16-bit uniforms and an
    element is kept when its uniform is at least p (p resolved to 1/65536). On other devices, where random
    numbers are cheap, it is torch's dropout.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p
        self._threshold = round(p * 65536) - 32768

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        n = x.numel()
        bits = torch.randint(-(2**63), 2**63 - 1, (-(-n // 4),), dtype=torch.int64, device=x.device)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= self._threshold
        # one product with the scaled mask: one pass forward and one backward instead of two each, same bits
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


ONEDNN_WEIGHT_GRAD_MIN = 128  # input width from which a weight gradient goes through oneDNN (below it: MKL)


def exporting() -> bool:
    """Whether an ONNX export or tracing is recording the operations, which must then be ops the export knows (no
    custom GPU kernels)."""
    onnx = sys.modules.get("torch.onnx")  # not imported: no export runs (importing it costs 75 ms)
    return (onnx is not None and onnx.is_in_onnx_export()) or torch.jit.is_tracing()


def traced() -> bool:
    """Whether torch.compile, an ONNX export or tracing is recording the operations, which must then be plain
    torch operations (Inductor chooses its own kernels; exports need ops they know)."""
    return torch.compiler.is_compiling() or exporting()


def _onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this product goes through oneDNN (:func:`~ctrkit.devices.onednn_fp32`): float32 on a CPU, outside
    autocast, and outside torch.compile and exports (:func:`traced`)."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not traced() and onednn_fp32())


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """``x @ weight.T (+ bias) (then ReLU)`` by oneDNN, bias and ReLU in the product's epilogue; ``x`` and
    ``weight`` may be transposed views."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")


class _Linear(torch.autograd.Function):
    """``x @ w.T + b``, then the ReLU if ``relu``, as one matrix product whose epilogue adds the bias and applies
    the ReLU (cuBLASLt's on a GPU, oneDNN's on a CPU where :func:`_onednn`), so no separate pass reads and
    writes the layer's output; the backward masks by the saved output and, with oneDNN, runs its two products
    there too. ``rest`` [B, r] (or None) are more input columns after ``x``'s, such as an MLP's folded numeric
    inputs, whose input gradient is computed only if they need one: the layer's input gradient is then a product
    with ``x``'s columns of the weight alone (on an H100, 416 columns of a 65,536-row batch took half the time of
    448)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                relu: bool, rest: torch.Tensor | None) -> torch.Tensor:
        ctx.dtypes, ctx.relu = (x.dtype, weight.dtype, None if bias is None else bias.dtype), relu
        ctx.cols = x.shape[-1]
        if rest is not None:
            x = torch.cat([x, rest.to(x.dtype)], dim=-1)
        ctx.onednn = x.dim() == 2 and _onednn(x, weight)
        if ctx.onednn:
            y = _onednn_linear(x, weight, bias, relu)
        else:
            device = x.device.type
            if torch.is_autocast_enabled(device):  # the product in the autocast dtype, as nn.Linear's would be
                dtype = torch.get_autocast_dtype(device)
                x, weight = x.to(dtype), weight.to(dtype)
                bias = None if bias is None else bias.to(dtype)
            with torch.autocast(device, enabled=False):
                y = torch._addmm_activation(bias, x, weight.t()) if relu else F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight, y if relu else None)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None,
                                                         None, torch.Tensor | None]:
        x, weight, y = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g = grad.to(weight.dtype)
        if ctx.relu:  # ReLU's own backward: one pass (on a CPU, torch.where with a scalar 0 took 20x longer)
            g = torch.ops.aten.threshold_backward(g, y, 0)
        k = ctx.cols
        grads = [(part, ctx.needs_input_grad[i]) for i, part in ((0, weight[:, :k]), (4, weight[:, k:]))]
        if ctx.onednn:
            grad_x, grad_rest = (_onednn_linear(g, w.contiguous().t(), None, False) if need else None
                                 for w, need in grads)
            # oneDNN copies both transposed operands first, which costs more than it gains when the layer's input
            # is narrow (AutoInt's projections of 16-64 values: 11 ms against MKL's 4.5 at one thread)
            grad_w = _onednn_linear(g.t(), x.t(), None, False) if x.shape[1] >= ONEDNN_WEIGHT_GRAD_MIN else g.t() @ x
        else:
            grad_x, grad_rest = ((g @ w).to(x_dtype) if need else None for w, need in grads)
            grad_w = g.t() @ x
        return grad_x, grad_w.to(w_dtype), None if b_dtype is None else g.sum(0).to(b_dtype), None, grad_rest


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)`` for ``x`` [..., in], through oneDNN where :func:`_onednn` says so (a CPU's float32 products):
    for the linear layers of other blocks than an MLP (DCN-V2's cross layers, FinalNet's factorized
    interactions, AutoInt's projections)."""
    if x.dim() >= 2 and _onednn(x, layer.weight):
        return (_Linear.apply(x.reshape(-1, x.shape[-1]), layer.weight, layer.bias, False, None)
                .view(*x.shape[:-1], -1))
    return layer(x)


def linear_relu(x: torch.Tensor, layer: nn.Linear, weight: torch.Tensor | None = None,
                rest: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(layer(x))`` for a 2-D ``x`` and a ``layer`` with a bias, as one fused matrix product; ``weight``
    stands in for the layer's own (a folded form of it) where given, and ``rest`` are more input columns after
    ``x``'s (see :class:`_Linear`)."""
    return _Linear.apply(x, layer.weight if weight is None else weight, layer.bias, True, rest)


def _dot(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a one-row ``weight`` [1, in] as a row-wise dot product [B, 1] in float32: on a
    GPU its backward (the outer product of the logits' gradient and the weight) is then elementwise, and a compiled
    step fuses it with the ReLU mask of the layer below, where a matrix product with one column would write it out and
    the mask pass read it again."""
    out = (x * weight.to(torch.promote_types(x.dtype, torch.float32))).sum(-1, keepdim=True)
    return out if bias is None else out + bias


class MLP(nn.Sequential):
    """Linear -> [BatchNorm] -> ReLU -> [Dropout] per hidden layer, then an optional output layer.

    ``layer(in, out)`` builds each hidden layer's map (``nn.Linear``; FinalNet passes its factorized interaction).
    On a GPU, and on a CPU whose float32 products go through oneDNN, an ``nn.Linear`` followed directly by its
    ReLU runs as :func:`linear_relu`; on such a CPU the other ``nn.Linear`` layers run through oneDNN too.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int | None = 1, dropout: float = 0.0,
                 batch_norm: bool = False, layer: Callable[[int, int], nn.Module] = nn.Linear) -> None:
        if in_dim < 1:
            raise ValueError(f"MLP input size must be >= 1, got {in_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers.append(layer(d, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(Dropout(dropout))
            d = h
        if out_dim is not None:
            layers.append(nn.Linear(d, out_dim))
        super().__init__(*layers)
        self.out_features = out_dim if out_dim is not None else d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._layers(x)

    def with_first_weight(self, x: torch.Tensor, weight: torch.Tensor,
                          rest: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP over ``x`` (and the columns ``rest`` after it, which get an input gradient only if they need
        one) with ``weight`` in place of its first layer's (a folded form of it, such as
        :meth:`~ctrkit.nn.embedding.FeatureEmbedding.project_inputs` gives), the first layer's bias kept."""
        if type(self[0]) is not nn.Linear:
            raise ValueError(f"with_first_weight needs an nn.Linear first layer, this MLP starts with {self[0]}")
        return self._layers(x, weight, rest)

    def _layers(self, h: torch.Tensor, first_weight: torch.Tensor | None = None,
                rest: torch.Tensor | None = None) -> torch.Tensor:
        layers = list(self)
        i = 0
        while i < len(layers):
            layer = layers[i]
            if type(layer) is not nn.Linear:
                h = layer(h)
                i += 1
                continue
            w = first_weight if i == 0 and first_weight is not None else layer.weight
            fused = layer.bias is not None and h.dim() == 2
            relu = i + 1 < len(layers) and type(layers[i + 1]) is nn.ReLU
            onednn = _onednn(h, w)
            if rest is not None and not (fused and (onednn or (relu and h.is_cuda))):
                h, rest = torch.cat([h, rest.to(h.dtype)], dim=-1), None  # the paths below _Linear's read one input
            if fused and relu and (h.is_cuda or onednn):
                h = linear_relu(h, layer, w, rest)
                i += 2
            elif fused and onednn:
                h = _Linear.apply(h, w, layer.bias, False, rest)
                i += 1
            elif h.is_cuda and h.dim() == 2 and w.shape[0] == 1:  # a one-logit output layer: see _dot
                h = _dot(h, w, layer.bias)
                i += 1
            else:
                h = F.linear(h, w, layer.bias)
                i += 1
            rest = None
        return h
